"""The trainer's configuration surface: defaults (`base_config`) and validation before any compute.

Config files in `configs/` call `base_config()` and override what their experiment changes; every
key here is read by the trainer (`tests/test_config_keys.py` fails on a key that nothing reads).
`validate(config, num_devices)` names the offending key.
Defaults are the paper's DAPO/PGPO recipe (docs/method.md §4-5) wherever it is explicit.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # --workdir wins; else this; else runs/<config name>

  c.model = ml_collections.ConfigDict()
  c.model.init_from = ""  # HF Qwen2.5-VL folder or a converted Orbax checkpoint folder
  c.model.random_init = False  # True: build from `model.tiny` (demo) instead of init_from
  c.model.tiny = ml_collections.ConfigDict(
    dict(
      hidden_size=128,
      intermediate_size=256,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      vision_depth=2,
      vision_hidden_size=64,
      vision_intermediate_size=128,
      vision_num_heads=2,
      vision_window_size=56,
      vision_fullatt_block_indexes=(1,),
    )
  )
  c.model.dtype = "bfloat16"  # compute dtype: matmul inputs, activations, KV cache
  # Parameter (and AdamW moment) dtype; "" = model.dtype. "float32" keeps float32 master weights that
  # small updates can move, cast to model.dtype where each layer uses them.
  c.model.param_dtype = ""
  # What the backward pass of each scanned layer keeps (`layers.maybe_remat`): none (everything),
  # full (nothing: the layer runs again), dots_no_batch (the weight matmuls' outputs: attention runs
  # again), dots (also xla attention's scores and context).
  c.model.remat_policy = "full"
  c.model.scan_layers = True
  c.model.attention_chunk_size = 0
  # xla | splash (TPU) | cudnn (NVIDIA GPUs) | auto (splash on TPU, cudnn on GPUs, xla elsewhere,
  # by the platform of the mesh a program is built for). The fused kernels run per device under
  # shard_map. Default xla: the tiny default computes in float32, which cuDNN's kernel does not take.
  c.model.attention_impl = "xla"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ""  # comma-separated parquet/jsonl files or globs
  c.data.eval_files = ""
  c.data.processor_dir = ""  # tokenizer/processor folder (default: model.init_from)
  c.data.question_key = "problem"
  c.data.answer_key = "answer"
  c.data.image_key = "images"
  c.data.max_prompt_length = 1024
  c.data.min_pixels = config_dict.placeholder(int)
  c.data.max_pixels = config_dict.placeholder(int)
  # Passes over the training data (0: unlimited). The run ends at `train.num_steps` or when the data
  # runs out after `num_epochs` passes, whichever comes first; the step that runs out of prompts is
  # dropped (as a data loader's drop_last) and the run ends with a final checkpoint.
  c.data.num_epochs = 2
  c.data.make_demo_data = False  # generate the synthetic task into data dir if files are missing
  c.data.demo_dir = ""
  c.data.demo_train_rows = 2000
  c.data.demo_eval_rows = 200
  c.data.demo_image_size = 84
  c.data.demo_task = (
    "answer"  # "answer": synthetic.py (short answers); "chain": chain.py (reasoning)
  )

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 384  # prompts drawn per rollout round
  c.rollout.group_size = 5  # G
  c.rollout.max_new_tokens = 2048
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.99
  c.rollout.top_k = 0
  # Sampling runs on a copy of the weights in this dtype, cast once per rollout call (the float32
  # masters are untouched), with a KV cache in it; logits, sampling and log-probs stay float32.
  c.rollout.dtype = "bfloat16"
  # Slot refill (continuous batching): 0 decodes all prompts x G samples at once (a batch runs until
  # its longest sample ends); N > 0 decodes N samples at a time (a multiple of the batch shards),
  # a finished row taking the next pending sample. Samples are the same either way.
  c.rollout.decode_rows = 0

  # Keep groups with min_accuracy < accuracy < max_accuracy; sample more rounds of
  # `rollout.prompts_per_step` prompts until that many groups are kept, at most `max_rounds` rounds
  # (0: unlimited, verl's max_num_gen_batches). When the rounds run out with fewer groups,
  # `on_short="train"` trains on the groups kept (fewer update mini-batches, never an empty one) and
  # `on_short="error"` stops the run with an error naming `dynamic_sampling.max_rounds` (verl/EasyR1).
  c.dynamic_sampling = ml_collections.ConfigDict(
    dict(enabled=True, min_accuracy=0.01, max_accuracy=0.99, max_rounds=3, on_short="train")
  )

  c.updates = ml_collections.ConfigDict()
  c.updates.prompts_per_update = 128  # update (mini-)batch in prompts: 128 × 5 = 640 responses
  c.updates.micro_batch_prompts = 8  # gradient accumulation granularity
  c.updates.passes = 1  # epochs over a rollout batch

  c.optim = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-6,
      schedule="constant",
      warmup_steps=0,
      end_learning_rate=0.0,
      weight_decay=1e-2,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip_norm=1.0,
      frozen_regex="",
    )
  )

  # kl_coef > 0 adds kl_coef · agg(KL(π_θ‖π_ref)) to the loss, π_ref a frozen copy of the weights at the
  # start of RL (after any warm-up), logged as train/kl; kl_estimator: k1 = log π_θ - log π_ref,
  # k2 = ½(log π_θ - log π_ref)², k3 = verl/EasyR1 "low_var_kl" (r - log r - 1, r = π_ref/π_θ, log r
  # clamped to ±20, value to [-10, 10]). kl_coef = 0 (default, the paper): no reference model at all.
  c.loss = ml_collections.ConfigDict(
    dict(
      clip_low=0.2,
      clip_high=0.28,
      agg="token-mean",
      dual_clip=0.0,
      kl_coef=0.0,
      kl_estimator="k3",
      entropy_coef=0.0,
      logprob_chunk=256,
    )
  )

  # degenerate_rtol: a response whose spread of log(1 + S) is at most this share of its largest value
  # gets uniform weights (0: only an exactly constant S, as docs/method.md §3; why 1e-2: rl/advantages.py).
  c.pgpo = ml_collections.ConfigDict(
    dict(
      enabled=True,
      tau=0.4,
      beta=2.0,
      dependency_estimator="k3",
      mask_vision_markers=False,
      clamp_log_ratio=config_dict.placeholder(float),
      renormalize=True,
      threshold_mode="absolute",
      min_weight=0.0,
      max_weight=config_dict.placeholder(float),
      degenerate_rtol=1e-2,
      scoring_chunk=256,
      scoring_prompts=0,
    )
  )  # prompts per scoring call (0: updates.micro_batch_prompts)

  c.reward = ml_collections.ConfigDict(dict(name="pgpo_math"))

  # Supervised cold start on `target_template.format(answer=...)` (the demo; off for real models).
  # target_key: a column of the training files holding each row's target response instead (the chain
  # task's worked `solution`). cache_dir: warm up once and reuse — the params are saved there after
  # the warm-up and read back by any later run given the same folder (arms of one seed share it).
  # blind_fraction: the share of each warm-up batch trained under PGPO's blind view (visual tokens
  # removed, positions kept, same targets), so the blind view is in distribution (a language prior).
  # save_every: with cache_dir, save the warm-up's progress there every N steps (and when a signal
  # stops it); a rerun resumes from it (0: a stopped warm-up starts again).
  # labels_key + perception_weight: with target_key, a column of character-span labels of each
  # target (the chain task's `labels`: JSON [[start, end, label], ...]); tokens labelled perception
  # weigh `perception_weight` in the warm-up's weighted-mean NLL, all others 1 (1.0: unweighted, the
  # column is not read). The facts are a few % of a worked solution's tokens; this points the loss
  # at them.
  c.warmup = ml_collections.ConfigDict(
    dict(
      sft_steps=0,
      learning_rate=1e-4,
      prompts_per_step=16,
      target_template="<think>I look at the image.</think> \\boxed{{{answer}}}",
      target_key="",
      cache_dir="",
      blind_fraction=0.0,
      save_every=0,
      labels_key="",
      perception_weight=1.0,
    )
  )

  # Metrics of every step go to WORKDIR/metrics.jsonl (+ TensorBoard, W&B). profile=True writes a
  # jax.profiler trace of one step (the second this process runs: the first compiles) to WORKDIR/profile.
  # packing: score and train on padding-free rows of `packed_row_length` tokens (rl/packing.py)
  # instead of padding every sequence to the longest prompt + max_new_tokens.
  c.train = ml_collections.ConfigDict(
    dict(
      num_steps=0,
      eval_every=0,
      eval_prompts=64,
      eval_max_new_tokens=0,
      profile=False,
      packing=False,
      packed_row_length=4096,
    )
  )

  c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True))

  c.logging = ml_collections.ConfigDict(
    dict(tensorboard=True, wandb=False, wandb_project="pgpo-jax")
  )
  return c


def _require(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


# ------------------------------------------------------------------------------------------------
# Per-key value rules. Every numeric or enumerated key has one, so a new key of that kind gets a line
# here; relations between keys (divisibility, min < max, hosts) are checked in `validate`.
# ------------------------------------------------------------------------------------------------
Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what the message says it must be)


def _number(
  lo: float | None = None,
  hi: float | None = None,
  *,
  lo_open: bool = False,
  hi_open: bool = False,
  integer: bool = False,
  optional: bool = False,
) -> Rule:
  """A finite number (an int if `integer`) in [lo, hi] (open ends as asked); None too if `optional`."""

  def ok(v: Any) -> bool:
    if v is None:
      return optional
    if (
      isinstance(v, bool)
      or not isinstance(v, int if integer else (int, float))
      or not math.isfinite(v)
    ):
      return False
    return (lo is None or (v > lo if lo_open else v >= lo)) and (
      hi is None or (v < hi if hi_open else v <= hi)
    )

  kind = "an integer" if integer else "a number"
  if lo is not None and hi is not None:
    text = f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"{kind} {'>' if lo_open else '>='} {lo:g}"
  else:
    text = kind
  return ok, text + (" (or None)" if optional else "")


def _one_of(*choices: str) -> Rule:
  return (lambda v: v in choices), f"one of {list(choices)}"


def _dual_clip(v: Any) -> bool:
  return _number()[0](v) and (v == 0 or v > 1)


def _regex(v: Any) -> bool:
  try:
    re.compile(v)
  except (re.error, TypeError):
    return False
  return True


def _answer_template(v: Any) -> bool:
  try:
    return isinstance(v, str) and "{answer}" in v and bool(v.format(answer="1"))
  except (IndexError, KeyError, ValueError):
    return False


_POS_INT = _number(0, lo_open=True, integer=True)
_NONNEG_INT = _number(0, integer=True)
_NONNEG = _number(0)
_POSITIVE = _number(0, lo_open=True)
_PROBABILITY = _number(0, 1)

VALUE_RULES: dict[str, Rule] = {
  "model.dtype": _one_of("float32", "bfloat16"),
  "model.param_dtype": _one_of("", "float32", "bfloat16"),  # "" = model.dtype
  "model.remat_policy": _one_of("none", "full", "dots", "dots_no_batch"),
  "model.attention_chunk_size": _NONNEG_INT,
  "model.attention_impl": _one_of("auto", "xla", "splash", "cudnn"),  # layers.ATTENTION_IMPLS
  "data.max_prompt_length": _POS_INT,
  "data.min_pixels": _number(0, lo_open=True, integer=True, optional=True),
  "data.max_pixels": _number(0, lo_open=True, integer=True, optional=True),
  "data.demo_train_rows": _POS_INT,
  "data.demo_eval_rows": _POS_INT,
  "data.demo_image_size": _POS_INT,
  "data.demo_task": _one_of("answer", "chain"),  # tiny_tokenizer.TASKS
  "rollout.prompts_per_step": _POS_INT,
  "rollout.group_size": _number(2, integer=True),  # a group std needs two samples
  "rollout.max_new_tokens": _POS_INT,
  "rollout.temperature": _NONNEG,
  "rollout.top_p": _number(0, 1, lo_open=True),
  "rollout.top_k": _NONNEG_INT,  # 0 = off
  "rollout.dtype": _one_of("float32", "bfloat16"),
  "rollout.decode_rows": _NONNEG_INT,  # 0 = all samples at once; a multiple of the batch shards (trainer)
  "dynamic_sampling.min_accuracy": _PROBABILITY,
  "dynamic_sampling.max_accuracy": _PROBABILITY,
  "dynamic_sampling.max_rounds": _NONNEG_INT,  # 0 = unlimited
  "dynamic_sampling.on_short": _one_of("train", "error"),
  "data.num_epochs": _NONNEG_INT,  # 0 = unlimited
  "updates.prompts_per_update": _POS_INT,
  "updates.micro_batch_prompts": _POS_INT,
  "updates.passes": _POS_INT,
  "optim.learning_rate": _POSITIVE,
  "optim.schedule": _one_of("constant", "warmup_cosine", "linear"),  # train_step.SCHEDULES
  "optim.warmup_steps": _NONNEG_INT,
  "optim.end_learning_rate": _NONNEG,
  "optim.weight_decay": _NONNEG,
  "optim.b1": _number(0, 1, hi_open=True),
  "optim.b2": _number(0, 1, hi_open=True),
  "optim.eps": _POSITIVE,
  "optim.grad_clip_norm": _NONNEG,  # 0 = off
  "optim.frozen_regex": (_regex, "a Python regular expression ('' = nothing frozen)"),
  "loss.clip_low": _number(0, 1, hi_open=True),
  "loss.clip_high": _NONNEG,
  "loss.agg": _one_of("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
  "loss.dual_clip": (_dual_clip, "0 (off) or a number > 1 (verl's clip_ratio_c)"),
  "loss.entropy_coef": _NONNEG,
  "loss.kl_coef": _NONNEG,  # 0 = no reference model
  "loss.kl_estimator": _one_of("k1", "k2", "k3"),
  "loss.logprob_chunk": _POS_INT,
  "pgpo.tau": _PROBABILITY,
  "pgpo.beta": _NONNEG,
  "pgpo.dependency_estimator": _one_of("k3", "full_kl"),
  "pgpo.clamp_log_ratio": _number(0, lo_open=True, optional=True),
  "pgpo.threshold_mode": _one_of("absolute", "quantile"),
  "pgpo.min_weight": _PROBABILITY,
  "pgpo.max_weight": _number(1, optional=True),
  "pgpo.degenerate_rtol": _number(0, 1, hi_open=True),
  "pgpo.scoring_chunk": _POS_INT,
  "pgpo.scoring_prompts": _NONNEG_INT,  # 0 = updates.micro_batch_prompts
  "warmup.sft_steps": _NONNEG_INT,
  "train.num_steps": _POS_INT,
  "train.eval_every": _NONNEG_INT,  # 0 = off
  "train.eval_max_new_tokens": _NONNEG_INT,  # 0 = rollout.max_new_tokens
  "train.packed_row_length": _POS_INT,
  "checkpoint.every": _POS_INT,
  "checkpoint.keep": _POS_INT,
}
# Only read when their feature is on (warmup.sft_steps > 0, train.eval_every > 0).
WARMUP_RULES: dict[str, Rule] = {
  "warmup.learning_rate": _POSITIVE,
  "warmup.prompts_per_step": _POS_INT,
  "warmup.target_template": (_answer_template, "a str.format template with an {answer} field"),
  "warmup.blind_fraction": _PROBABILITY,
  "warmup.save_every": _NONNEG_INT,
  "warmup.perception_weight": _POSITIVE,
}
EVAL_RULES: dict[str, Rule] = {"train.eval_prompts": _POS_INT}


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    c = c[part]
  return c


def _check_values(c: ml_collections.ConfigDict, rules: dict[str, Rule]) -> None:
  for key, (ok, text) in rules.items():
    value = _get(c, key)
    _require(ok(value), key, f"must be {text}, got {value!r}")


def scoring_prompts_per_host(c: ml_collections.ConfigDict, num_processes: int = 1) -> int:
  """Prompts each host scores per call: `pgpo.scoring_prompts` (default: the micro-batch) split over
  the hosts, at least one."""
  return max(1, -(-(c.pgpo.scoring_prompts or c.updates.micro_batch_prompts) // num_processes))


def _check_init_from(c: ml_collections.ConfigDict) -> None:
  """`model.init_from`, when it is a local path that exists, must be a checkpoint folder (not a file).

  Paths that do not exist here are left to the loader (they may be on another filesystem).
  """
  path = c.model.init_from
  if c.model.random_init or not path or not os.path.exists(path):
    return
  from pgpo_jax import checkpoint  # the layouts the loader accepts

  try:
    checkpoint.checkpoint_layout(path)
  except FileNotFoundError:
    what = "a file" if os.path.isfile(path) else "a folder with neither layout"
    _require(
      False,
      "model.init_from",
      f"{path!r} is {what}; expected an HF Qwen2.5-VL folder (config.json + model.safetensors or "
      f"model.safetensors.index.json) or a converted folder (config.json + an Orbax '{checkpoint.PARAMS_ITEM}/' "
      f"item), as written by scripts/convert_hf.py",
    )


# The platforms (`jax.default_backend()`) each fused attention kernel runs on.
ATTENTION_PLATFORMS = {"splash": ("tpu",), "cudnn": ("gpu",)}


def _check_attention(c: ml_collections.ConfigDict, platform: str) -> None:
  """`model.attention_impl` against the platform the run computes on (`auto` resolved for it)."""
  from pgpo_jax.models.qwen2_5_vl import layers

  impl = c.model.attention_impl
  runs_on = ATTENTION_PLATFORMS.get(impl)
  _require(
    runs_on is None or platform in runs_on,
    "model.attention_impl",
    f"{impl!r} needs a {'/'.join(p.upper() for p in runs_on or ())} backend, but this run's JAX "
    f"backend is {platform!r}; use 'xla' (any platform) or 'auto' (splash on TPU, cudnn on GPU, "
    "xla elsewhere)",
  )
  resolved = layers.resolve_attention_impl(impl, platform)
  _require(
    resolved != "cudnn" or c.model.dtype in ("bfloat16", "float16"),
    "model.attention_impl",
    f"{impl!r} runs cuDNN flash attention here ({platform!r}), which takes bfloat16/float16 inputs "
    f"only, but model.dtype is {c.model.dtype!r}; set model.dtype=bfloat16 or "
    "model.attention_impl=xla",
  )


def validate(
  c: ml_collections.ConfigDict,
  num_devices: int | None = None,
  num_processes: int = 1,
  platform: str | None = None,
) -> None:
  """Fails fast with the key at fault. Called before any model is built or data is read.

  Batch sizes are global; with `num_processes` hosts each must split evenly (one share per host).
  Every numeric or enumerated key is checked against its rule in `VALUE_RULES` (the warm-up and
  evaluation keys only when that feature is on). `platform`: the JAX backend the run computes on
  (the trainer passes `jax.default_backend()`); given, `model.attention_impl` must run there.
  `compile_check`, which builds TPU programs on a CPU host, passes none.
  """
  _require(
    c.model.random_init or bool(c.model.init_from),
    "model.init_from",
    "is required (an HF Qwen2.5-VL folder or a converted checkpoint), or set model.random_init=True",
  )
  _check_init_from(c)
  _require(bool(c.data.train_files) or c.data.make_demo_data, "data.train_files", "is required")
  _check_values(c, VALUE_RULES)
  if c.warmup.sft_steps > 0:
    _check_values(c, WARMUP_RULES)
    _require(
      not c.warmup.labels_key or bool(c.warmup.target_key),
      "warmup.labels_key",
      "labels a target column: set warmup.target_key too",
    )
    _require(
      c.warmup.perception_weight == 1.0 or bool(c.warmup.labels_key),
      "warmup.perception_weight",
      "needs warmup.labels_key (the targets' span labels) to know the perception tokens",
    )
  if c.optim.schedule == "warmup_cosine":  # the cosine needs steps left after its linear warm-up
    for what, steps in (
      ("train.num_steps", c.train.num_steps),
      ("warmup.sft_steps", c.warmup.sft_steps),
    ):
      _require(
        steps <= 0 or c.optim.warmup_steps < steps,
        "optim.warmup_steps",
        f"must be < {what} ({steps}) with optim.schedule='warmup_cosine' (the warm-up uses the "
        f"schedule too), got {c.optim.warmup_steps}",
      )
  if c.train.eval_every > 0:
    _check_values(c, EVAL_RULES)
  _require(
    c.data.min_pixels is None
    or c.data.max_pixels is None
    or c.data.min_pixels <= c.data.max_pixels,
    "data.min_pixels",
    f"({c.data.min_pixels}) must be <= data.max_pixels ({c.data.max_pixels})",
  )
  r = c.rollout
  u = c.updates
  _require(
    r.prompts_per_step % u.prompts_per_update == 0,
    "updates.prompts_per_update",
    f"({u.prompts_per_update}) must divide rollout.prompts_per_step ({r.prompts_per_step}): a rollout batch "
    "is split into whole update batches",
  )
  _require(
    u.prompts_per_update % u.micro_batch_prompts == 0,
    "updates.micro_batch_prompts",
    f"({u.micro_batch_prompts}) must divide updates.prompts_per_update ({u.prompts_per_update})",
  )
  ds = c.dynamic_sampling
  _require(
    0 <= ds.min_accuracy < ds.max_accuracy <= 1,
    "dynamic_sampling.min_accuracy",
    "need 0 <= min_accuracy < max_accuracy <= 1",
  )
  p = c.pgpo
  _require(
    p.scoring_prompts == 0 or r.prompts_per_step % p.scoring_prompts == 0,
    "pgpo.scoring_prompts",
    f"({p.scoring_prompts}) must divide rollout.prompts_per_step ({r.prompts_per_step})",
  )
  from pgpo_jax import rewards

  _require(
    c.reward.name in rewards.BATCH_REWARD_FNS,
    "reward.name",
    f"unknown reward {c.reward.name!r}; registered: {sorted(rewards.BATCH_REWARD_FNS)}",
  )
  if c.train.packing:
    _require(
      c.train.packed_row_length >= c.data.max_prompt_length + r.max_new_tokens,
      "train.packed_row_length",
      f"({c.train.packed_row_length}) must hold the longest sequence: "
      f"data.max_prompt_length + rollout.max_new_tokens = {c.data.max_prompt_length + r.max_new_tokens}",
    )
  if num_processes > 1:
    for key, n in (
      ("rollout.prompts_per_step", r.prompts_per_step),
      ("updates.prompts_per_update", u.prompts_per_update),
      ("pgpo.scoring_prompts", p.scoring_prompts),
      ("warmup.prompts_per_step", c.warmup.prompts_per_step if c.warmup.sft_steps > 0 else 0),
    ):
      _require(
        n % num_processes == 0,
        key,
        f"({n}) must be a multiple of the {num_processes} hosts: each host "
        "holds an equal share of every batch",
      )
    local = r.prompts_per_step // num_processes
    _require(
      local % scoring_prompts_per_host(c, num_processes) == 0,
      "pgpo.scoring_prompts",
      f"the default slice (updates.micro_batch_prompts = {u.micro_batch_prompts} over {num_processes} hosts) "
      f"does not divide the {local} prompts per host; set pgpo.scoring_prompts",
    )
  if platform is not None:
    _check_attention(c, platform)
  if num_devices is not None:
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    fixed = 1
    for name, s in zip(("data", "fsdp", "tensor"), sizes):
      _require(s == -1 or s >= 1, f"mesh.{name}", f"must be -1 (fill) or >= 1, got {s}")
      fixed *= s if s > 0 else 1
    _require(sizes.count(-1) <= 1, "mesh", "at most one axis may be -1")
    _require(
      num_devices % fixed == 0 and (-1 in sizes or fixed == num_devices),
      "mesh",
      f"data×fsdp×tensor = {sizes} does not match the {num_devices} devices",
    )


def sibling(name: str, config_file: str):
  """The config module `name` from the folder of `config_file` (pass `__file__`).

  Config files build on each other by path (`pgpo_7b = sibling("pgpo_7b", __file__)`), so they load
  from any working directory and from installed commands, without `configs/` on `sys.path`.
  """
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{config_file}: builds on config {name!r}, but {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"pgpo_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
