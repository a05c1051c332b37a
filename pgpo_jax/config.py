"""The trainer's configuration surface: defaults (`base_config`) and validation before any compute.

Config files in `configs/` call `base_config()` and override what their experiment changes; every
key here is read by the trainer. `validate(config, num_devices)` names the offending key.
Defaults are the paper's DAPO/PGPO recipe (PGPO.md §4-5) wherever it is explicit.
"""
from __future__ import annotations

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
  c.model.tiny = ml_collections.ConfigDict(dict(
      hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, vision_depth=2, vision_hidden_size=64, vision_intermediate_size=128,
      vision_num_heads=2, vision_window_size=56, vision_fullatt_block_indexes=(1,)))
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.model.scan_layers = True
  c.model.attention_chunk_size = 0

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
  c.data.num_epochs = 2
  c.data.make_demo_data = False  # generate the synthetic task into data dir if files are missing
  c.data.demo_dir = ""
  c.data.demo_train_rows = 2000
  c.data.demo_eval_rows = 200
  c.data.demo_image_size = 84

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 384  # prompts drawn per rollout round
  c.rollout.group_size = 5  # G
  c.rollout.max_new_tokens = 2048
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.99
  c.rollout.top_k = 0

  c.dynamic_sampling = ml_collections.ConfigDict(dict(enabled=True, min_accuracy=0.01, max_accuracy=0.99,
                                                      max_rounds=3))

  c.updates = ml_collections.ConfigDict()
  c.updates.prompts_per_update = 128  # update (mini-)batch in prompts: 128 × 5 = 640 responses
  c.updates.micro_batch_prompts = 8  # gradient accumulation granularity
  c.updates.passes = 1  # epochs over a rollout batch

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, schedule="constant", warmup_steps=0, end_learning_rate=0.0, weight_decay=1e-2,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0, frozen_regex=""))

  c.loss = ml_collections.ConfigDict(dict(
      clip_low=0.2, clip_high=0.28, agg="token-mean", dual_clip=0.0, kl_coef=0.0, kl_estimator="k3",
      entropy_coef=0.0, logprob_chunk=256))

  c.pgpo = ml_collections.ConfigDict(dict(
      enabled=True, tau=0.4, beta=2.0, dependency_estimator="k3", mask_vision_markers=False,
      clamp_log_ratio=config_dict.placeholder(float), renormalize=True, threshold_mode="absolute",
      min_weight=0.0, max_weight=config_dict.placeholder(float), scoring_chunk=256,
      scoring_prompts=0))  # prompts per scoring call (0: updates.micro_batch_prompts)

  c.reward = ml_collections.ConfigDict(dict(name="pgpo_math"))

  # Supervised cold start on `target_template.format(answer=...)` (the demo; off for real models).
  c.warmup = ml_collections.ConfigDict(dict(sft_steps=0, learning_rate=1e-4, prompts_per_step=16,
                                            target_template="<think>I look at the image.</think> \\boxed{{{answer}}}"))

  # packing: score and train on padding-free rows of `packed_row_length` tokens (rl/packing.py)
  # instead of padding every sequence to the longest prompt + max_new_tokens.
  c.train = ml_collections.ConfigDict(dict(num_steps=0, log_every=1, eval_every=0, eval_prompts=64,
                                           eval_max_new_tokens=0, profile=False, packing=False,
                                           packed_row_length=4096))

  c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True))

  c.logging = ml_collections.ConfigDict(dict(tensorboard=True, wandb=False, wandb_project="pgpo-jax"))
  return c


def _require(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


def scoring_prompts_per_host(c: ml_collections.ConfigDict, num_processes: int = 1) -> int:
  """Prompts each host scores per call: `pgpo.scoring_prompts` (default: the micro-batch) split over
  the hosts, at least one."""
  return max(1, -(-(c.pgpo.scoring_prompts or c.updates.micro_batch_prompts) // num_processes))


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Fails fast with the key at fault. Called before any model is built or data is read.

  Batch sizes are global; with `num_processes` hosts each must split evenly (one share per host).
  """
  _require(c.model.random_init or bool(c.model.init_from), "model.init_from",
           "is required (an HF Qwen2.5-VL folder or a converted checkpoint), or set model.random_init=True")
  _require(c.model.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32|bfloat16, got {c.model.dtype!r}")
  _require(c.model.remat_policy in ("none", "full", "dots", "dots_no_batch"), "model.remat_policy",
           f"unknown policy {c.model.remat_policy!r}")
  _require(bool(c.data.train_files) or c.data.make_demo_data, "data.train_files", "is required")
  _require(c.data.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
  r = c.rollout
  _require(r.group_size >= 2, "rollout.group_size", f"must be >= 2 for group advantages, got {r.group_size}")
  _require(r.prompts_per_step > 0, "rollout.prompts_per_step", "must be > 0")
  _require(r.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
  _require(r.temperature >= 0, "rollout.temperature", "must be >= 0")
  _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
  u = c.updates
  _require(u.prompts_per_update > 0 and r.prompts_per_step % u.prompts_per_update == 0, "updates.prompts_per_update",
           f"({u.prompts_per_update}) must divide rollout.prompts_per_step ({r.prompts_per_step}): a rollout batch "
           "is split into whole update batches")
  _require(u.micro_batch_prompts > 0 and u.prompts_per_update % u.micro_batch_prompts == 0,
           "updates.micro_batch_prompts", f"({u.micro_batch_prompts}) must divide updates.prompts_per_update "
           f"({u.prompts_per_update})")
  _require(u.passes >= 1, "updates.passes", "must be >= 1")
  ds = c.dynamic_sampling
  _require(0 <= ds.min_accuracy < ds.max_accuracy <= 1, "dynamic_sampling.min_accuracy",
           "need 0 <= min_accuracy < max_accuracy <= 1")
  _require(ds.max_rounds >= 1, "dynamic_sampling.max_rounds", "must be >= 1")
  _require(c.loss.agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"), "loss.agg",
           f"unknown aggregation {c.loss.agg!r}")
  _require(c.loss.clip_low >= 0 and c.loss.clip_high >= 0, "loss.clip_low", "clip ranges must be >= 0")
  _require(c.loss.kl_estimator in ("k1", "k2", "k3"), "loss.kl_estimator", f"unknown {c.loss.kl_estimator!r}")
  p = c.pgpo
  _require(0.0 <= p.tau <= 1.0, "pgpo.tau", f"must be in [0, 1], got {p.tau}")
  _require(p.beta >= 0, "pgpo.beta", f"must be >= 0, got {p.beta}")
  _require(p.dependency_estimator in ("k3", "full_kl"), "pgpo.dependency_estimator",
           f"unknown estimator {p.dependency_estimator!r} (k3 | full_kl)")
  _require(p.scoring_prompts >= 0 and (p.scoring_prompts == 0 or r.prompts_per_step % p.scoring_prompts == 0),
           "pgpo.scoring_prompts", f"({p.scoring_prompts}) must divide rollout.prompts_per_step ({r.prompts_per_step})")
  _require(p.threshold_mode in ("absolute", "quantile"), "pgpo.threshold_mode", f"unknown {p.threshold_mode!r}")
  from pgpo_jax import rewards
  _require(c.reward.name in rewards.BATCH_REWARD_FNS, "reward.name",
           f"unknown reward {c.reward.name!r}; registered: {sorted(rewards.BATCH_REWARD_FNS)}")
  _require(c.train.num_steps > 0, "train.num_steps", "must be > 0")
  _require(not c.train.packing or c.train.packed_row_length >= c.data.max_prompt_length + r.max_new_tokens,
           "train.packed_row_length", f"({c.train.packed_row_length}) must hold the longest sequence: "
           f"data.max_prompt_length + rollout.max_new_tokens = {c.data.max_prompt_length + r.max_new_tokens}")
  _require(c.checkpoint.every > 0 and c.checkpoint.keep > 0, "checkpoint.every", "every and keep must be > 0")
  if num_processes > 1:
    for key, n in (("rollout.prompts_per_step", r.prompts_per_step), ("updates.prompts_per_update", u.prompts_per_update),
                   ("pgpo.scoring_prompts", p.scoring_prompts),
                   ("warmup.prompts_per_step", c.warmup.prompts_per_step if c.warmup.sft_steps > 0 else 0)):
      _require(n % num_processes == 0, key, f"({n}) must be a multiple of the {num_processes} hosts: each host "
               "holds an equal share of every batch")
    local = r.prompts_per_step // num_processes
    _require(local % scoring_prompts_per_host(c, num_processes) == 0, "pgpo.scoring_prompts",
             f"the default slice (updates.micro_batch_prompts = {u.micro_batch_prompts} over {num_processes} hosts) "
             f"does not divide the {local} prompts per host; set pgpo.scoring_prompts")
  if num_devices is not None:
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    fixed = 1
    for name, s in zip(("data", "fsdp", "tensor"), sizes):
      _require(s == -1 or s >= 1, f"mesh.{name}", f"must be -1 (fill) or >= 1, got {s}")
      fixed *= s if s > 0 else 1
    _require(sizes.count(-1) <= 1, "mesh", "at most one axis may be -1")
    _require(num_devices % fixed == 0 and (-1 in sizes or fixed == num_devices), "mesh",
             f"data×fsdp×tensor = {sizes} does not match the {num_devices} devices")
