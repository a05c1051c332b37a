"""Ahead-of-time compile of the trainer's device programs for a TPU slice, on a CPU-only host.

    python scripts/compile_check.py --config=configs/pgpo_7b.py --topology=v5p-64

libtpu (the `tpu` extra: `pip install 'jax[tpu]==0.10.2'`) provides abstract TPU devices for a named
topology (`jax.experimental.topologies.get_topology_desc`); the mesh is built on them and the
trainer's own programs (`programs.py`: `rollout_programs(training_rollout_static(c))` and
`trainer_programs(c)`, the same builders and arguments as `Trainer`) are lowered on abstract arguments
with the trainer's shardings and compiled:

  step            program                                        layout        resident besides args
  --------------  ---------------------------------------------  ------------  ---------------------
  rollout_start   rollout `start`: vision + prefill of the       SAMPLE_RULES  train state (params +
                  rollout batch (prompt KV once per prompt),   AdamW moments)
                  in `rollout.dtype`
  rollout_decode  rollout `decode`: the while loop over the      SAMPLE_RULES  train state
                  samples (state donated)
  score           `score`: image + blind views of one scoring    TRAIN_RULES   AdamW moments (+ π_ref)
                  slice (`pgpo.scoring_prompts`), no grad
  reference       `reference` (`loss.kl_coef > 0` only): log     TRAIN_RULES   train state
                  π_ref of the same slice (packed as score's
                  with `train.packing`), no grad
  train           `train_step`: one optimizer update (state      TRAIN_RULES   -
                  donated)

Per step the report gives per-device bytes from `compiled.memory_analysis()` (arguments, outputs,
aliased outputs, temporaries, generated code) plus the train state that stays on the devices while
the step runs ("resident"), their total against the chip's HBM, and FLOPs. XLA does not fail a
compile until it is far over HBM, so the verdict is ours: total <= HBM. FLOPs are analytic (the
model's matmul + attention FLOPs as implemented: dense masked attention, remat recompute included)
because `cost_analysis()` counts a loop body (layer scan, micro-batch scan, decode loop) once; its
raw number is shown too, marked "loops once". `t@peak` is FLOPs / (devices x the MXU peak of the dtype
the matmuls run in: `matmul_peak`), and for the memory-bound decode loop max(that, HBM bytes per
decode step x steps / HBM bandwidth), the bytes per step analytic (`decode_bytes_per_step`: weights
once, the prompt's KV once per prompt, the rows' filled slots in whole attention chunks) and printed
against the minimum. The programs compile at JAX's default matmul precision, under which a TPU
computes a float32 matmul as one bfloat16 pass (bf16-rounded inputs, float32 accumulation):
`model.dtype=float32` moves twice the bytes of bfloat16 but runs its matmuls at the bf16 peak.

Against the physical minimum. Each step also gets `min s`: its model FLOPs (`model_flops`: 2 per
weight per token for a forward pass, the lm head only on the tokens whose logits are used, 3x for an
update = 6·N·tokens; no attention, no recompute) at the bf16 peak, or the HBM bytes each device must
move (weights once; decode: weights and filled KV slots once per step; update: the train state read
and written) at bandwidth, whichever is larger; `x min` = t@peak / min s. The RL step line sums
every step x its runs per step (`calls_per_rl_step`: one rollout, the scoring slices, the optimizer
updates), at t@peak and at the minimum.

Crashes. The TPU compiler aborts the process on some internal failed checks. `run(isolate=True)`
(the CLI's default) compiles each step in its own spawned child process, which rebuilds the
context from (config, topology) and sends its report back; a child that dies is reported as that
step "crashed (signal N: NAME)", the other steps still compile, and the exit code is 1 with a line
naming the step and the config keys that size it (`KNOBS`), as for a step that does not fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pgpo_jax import buckets, programs, sharding
from pgpo_jax import config as config_lib
from pgpo_jax import rollout as rollout_lib
from pgpo_jax import train_step as train_step_lib
from pgpo_jax.keypaths import path_str
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.models.qwen2_5_vl import layers
from pgpo_jax.rl import packing, sequences

GiB = 2**30
logging.getLogger("jax._src.compilation_cache").setLevel(
  logging.WARNING
)  # reset_cache() logs at INFO


# ------------------------------------------------------------------------------------------------
# Topologies
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-device (= per chip; v4/v5p as megacore) HBM, peak dense bf16 FLOP/s and HBM bandwidth."""

  name: str
  prefix: str  # get_topology_desc's chip prefix
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  cores_per_chip: int  # "v5p-64" counts TensorCores: 64 cores = 32 chips
  dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
  chip_config_name: str | None = None


CHIPS: dict[str, Chip] = {
  "v4": Chip("v4", "v4", 32 * GiB, 275e12, 1.2e12, 2, 3, "megacore"),
  "v5p": Chip("v5p", "v5", 95 * GiB, 459e12, 2.765e12, 2, 3),
  "v5e": Chip("v5e", "v5e", 16 * GiB, 197e12, 0.819e12, 1, 2),
  "v6e": Chip("v6e", "v6e", 32 * GiB, 918e12, 1.64e12, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # e.g. "v5p-64"
  chip: Chip
  desc: str  # e.g. "v5:2x4x4"
  num_chips: int


# bfloat16 MXU passes per matmul by (input dtype, matmul precision): a float32 matmul is 1 pass at
# "default"/"bfloat16" (inputs rounded to bf16), 3 at "high"/"tensorfloat32" (bf16_3x), 6 at
# "highest"/"float32" (bf16_6x); bfloat16 inputs are always 1 pass.
MATMUL_PRECISION = "default"  # the trainer's (JAX's default); the programs compile under it

_F32_PASSES = {
  "default": 1,
  "bfloat16": 1,
  "fastest": 1,
  "high": 3,
  "tensorfloat32": 3,
  "bfloat16_3x": 3,
  "highest": 6,
  "float32": 6,
}


def matmul_peak(chip: "Chip", dtype, precision: str | None = "default") -> float:
  """Peak matmul FLOP/s of `chip` for matmuls whose inputs are `dtype` at `precision`."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return chip.peak_flops
  return chip.peak_flops / _F32_PASSES[str(precision or "default").lower()]


def _torus(chips: int, dims: int) -> str:
  """Balanced power-of-two torus: 32 chips in 3-D -> '2x4x4', 4 -> '2x2x1', 256 in 2-D -> '16x16'."""
  if chips & (chips - 1):
    raise ValueError(f"{chips} chips: only power-of-two slices are supported")
  shape = [1] * dims
  while math.prod(shape) < chips:
    shape[shape.index(min(shape))] *= 2
  shape.sort()
  if dims == 3 and shape[0] == 1:  # TPU names put the size-1 axis last (v4-8 = 2x2x1)
    shape = shape[1:] + [1]
  return "x".join(map(str, shape))


class TopologyError(ValueError):
  """The topology names no TPU slice this check can build; the message says why (a usage error:
  `pgpo-compile-check` exits `common.USAGE_ERROR`, not the 1 of a program that does not fit)."""


def parse_topology(name: str) -> Topology:
  """'v5p-64' | 'v5e-256' | 'v4-128' | 'v6e-16' (cores for v4/v5p, chips for v5e/v6e), or a raw
  topology string 'v5e:2x2' / 'v5:2x4x4' / 'v4:2x2x1'. Raises `TopologyError`."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if m:
    chip = CHIPS[m.group(1)]
    n = int(m.group(2))
    if n % chip.cores_per_chip:
      raise TopologyError(
        f"{name}: {chip.name}-N counts TensorCores ({chip.cores_per_chip} per chip)"
      )
    chips = n // chip.cores_per_chip
    if chips < 1:
      raise TopologyError(f"{name}: a slice has at least one chip")
    try:
      torus = _torus(chips, chip.dims)
    except ValueError as e:
      raise TopologyError(f"{name}: {e}") from None
    return Topology(name, chip, f"{chip.prefix}:{torus}", chips)
  m = re.fullmatch(r"(v4|v5p?|v5e|v6e):(\d+(?:x\d+){1,2})", name.strip().lower())
  if m and any(int(x) < 1 for x in m.group(2).split("x")):
    raise TopologyError(f"{name}: every dimension of a slice is at least 1")
  if m:
    prefix = m.group(1)
    chip = {
      "v4": CHIPS["v4"],
      "v5": CHIPS["v5p"],
      "v5p": CHIPS["v5p"],
      "v5e": CHIPS["v5e"],
      "v6e": CHIPS["v6e"],
    }[prefix]
    chips = math.prod(int(x) for x in m.group(2).split("x"))
    return Topology(name, chip, f"{chip.prefix}:{m.group(2)}", chips)
  raise TopologyError(
    f"unknown topology {name!r}; use e.g. v5p-64, v5e-256, v4-128, v6e-16 or v5e:2x2"
  )


def ensure_libtpu() -> None:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(
      "compile_check needs libtpu for TPU topologies on this host: "
      "pip install 'jax[tpu]==0.10.2' (the `tpu` extra of pgpo-jax)"
    ) from None


def topology_devices(topo: Topology) -> list:
  """Abstract TPU devices of the slice (one per chip: v4/v5p as megacore)."""
  ensure_libtpu()
  # Read when libtpu initialises (here, not at import): lets tests and parallel checks share a host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")
  from jax.experimental import topologies

  kw = {"chip_config_name": topo.chip.chip_config_name} if topo.chip.chip_config_name else {}
  try:
    devices = topologies.get_topology_desc(topo.desc, "tpu", **kw).devices
  except (
    Exception
  ) as e:  # jax raises JaxRuntimeError (INVALID_ARGUMENT) for a slice it cannot lay out
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise TopologyError(
      f"{topo.name} ({topo.desc}): libtpu cannot build this slice: {first}. Use a slice that "
      "exists, e.g. v5p-8 or larger, v5e-4 / v5e:2x2 or larger, v4-8, v6e-4"
    ) from None
  if len(devices) != topo.num_chips:
    raise RuntimeError(
      f"{topo.desc}: expected {topo.num_chips} devices, libtpu gave {len(devices)}"
    )
  return list(devices)


# ------------------------------------------------------------------------------------------------
# Shapes from the config
# ------------------------------------------------------------------------------------------------
def model_config(c: ml_collections.ConfigDict) -> qwen.Qwen25VLConfig:
  """The architecture: `model.init_from`'s config.json if it exists, else `model.preset`
  (3b/7b/32b/72b or 'tiny' = the trainer's random-init `model.tiny`)."""
  m = c.model
  compute = dict(
    remat_policy=m.remat_policy,
    scan_layers=m.scan_layers,
    attention_chunk_size=m.attention_chunk_size,
    attention_impl=m.attention_impl,
  )
  init = m.get("init_from", "")
  if init and os.path.exists(os.path.join(init, "config.json")):
    return qwen.Qwen25VLConfig.from_json(init).replace(**compute)
  preset = m.get("preset", "")
  if preset in qwen.PRESETS:
    return qwen.PRESETS[preset].replace(**compute)
  if preset == "tiny" or m.get("random_init", False):
    t = dict(m.tiny)
    vision = {
      k: (tuple(v) if isinstance(v, (list, tuple)) else v)
      for k, v in t.items()
      if k.startswith("vision_")
    }
    text = {k: v for k, v in t.items() if not k.startswith("vision_")}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    quarter = head_dim // 2
    section = (quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8)
    return qwen.tiny_config(head_dim=head_dim, mrope_section=section, **text, **vision).replace(
      **compute
    )
  raise ValueError(
    f"config.model: set init_from to a folder with config.json or preset to one of "
    f"{sorted(qwen.PRESETS) + ['tiny']} (got init_from={init!r}, preset={preset!r})"
  )


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The static shapes the trainer compiles for (worst case of every bucket)."""

  rollout_prompts: int  # B: the rollout call's prompt batch (bucketed as the trainer does)
  group_size: int  # G
  prompt_len: int  # Tp: largest prompt bucket
  response_len: int  # L = N: max_new_tokens
  patches: int  # per prompt (one image of max_pixels)
  score_prompts: int  # prompts per scoring call
  update_prompts: int  # prompts per optimizer update
  micro_prompts: int  # prompts per micro-batch

  @property
  def num_microbatches(self) -> int:
    return self.update_prompts // self.micro_prompts


def shapes_from_config(
  c: ml_collections.ConfigDict, batch_shards: int, score_prompts: int | None = None
) -> Shapes:
  """Shapes of the trainer's programs (worst-case buckets); `score_prompts` (what-if) scores in calls
  of that many prompts instead of the trainer's slice (`pgpo.scoring_prompts`, default the micro-batch)."""
  u = c.updates
  patch_area = 14 * 14
  max_pixels = c.data.max_pixels
  if not max_pixels:
    raise ValueError("config.data.max_pixels must be set: it fixes the per-image patch budget")
  patches = max(4, int(max_pixels) // patch_area // 4 * 4)
  prompts = int(c.rollout.prompts_per_step)
  s = Shapes(
    rollout_prompts=buckets.batch_bucket(prompts, batch_shards),
    group_size=int(c.rollout.group_size),
    prompt_len=int(c.data.max_prompt_length),
    response_len=int(c.rollout.max_new_tokens),
    patches=patches,
    score_prompts=int(score_prompts or config_lib.scoring_prompts_per_host(c, 1)),
    update_prompts=int(u.prompts_per_update),
    micro_prompts=int(u.micro_batch_prompts),
  )
  checks = [("updates.micro_batch_prompts", s.micro_prompts)]  # also the default scoring slice
  if score_prompts or c.pgpo.scoring_prompts:
    checks.append(("--score_prompts" if score_prompts else "pgpo.scoring_prompts", s.score_prompts))
  for key, n in checks:
    if n % batch_shards:
      raise ValueError(
        f"config.{key}={n} does not split over the {batch_shards} shards of the batch axis "
        f"(data x fsdp); pick a multiple of {batch_shards} or change config.mesh"
      )
  if s.update_prompts % s.micro_prompts:
    raise ValueError(
      f"config.updates.micro_batch_prompts={s.micro_prompts} must divide "
      f"updates.prompts_per_update={s.update_prompts}"
    )
  return s


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (as implemented: dense masked attention, float32 logits)
# ------------------------------------------------------------------------------------------------
def text_flops(
  cfg: qwen.Qwen25VLConfig, tokens: float, context: float, logits_tokens: float
) -> float:
  """Decoder forward: `tokens` new tokens attending to `context` keys each; lm head on `logits_tokens`."""
  t = cfg.text
  per_layer = (
    2 * t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
  )
  per_layer += 2 * 3 * t.hidden_size * t.intermediate_size
  attn = 4 * t.num_attention_heads * t.head_dim * context
  return (
    t.num_hidden_layers * tokens * (per_layer + attn)
    + 2 * t.hidden_size * t.vocab_size * logits_tokens
  )


def vision_attention_flops(
  cfg: qwen.Qwen25VLConfig, images: float, patches: int
) -> tuple[float, float]:
  """The vision blocks' attention (q·kᵀ and P·V) on `images` rows of `patches` patches: (the
  full-attention layers, dense N x N; the windowed layers, Nb blocks of S x S)."""
  v = cfg.vision
  n_full = len([i for i in v.fullatt_block_indexes if i < v.depth])
  S = qwen.vision.window_block(v)
  slots = qwen.vision.num_window_blocks(patches, v) * S
  per_pair = 4 * v.hidden_size
  return (
    images * per_pair * n_full * patches * patches,
    images * per_pair * (v.depth - n_full) * slots * S,
  )


def vision_flops(
  cfg: qwen.Qwen25VLConfig, images: float, patches: int, attention: bool = True
) -> float:
  """Vision tower forward on `images` rows of `patches` patches (full layers: dense N x N masked
  attention; windowed layers: Nb blocks of S x S). `attention=False`: the weight matmuls only."""
  v = cfg.vision
  D, I = v.hidden_size, v.intermediate_size
  per_patch = 2 * v.patch_dim * D + v.depth * (2 * 4 * D * D + 2 * 3 * D * I)
  attn = sum(vision_attention_flops(cfg, 1, patches))
  merger = (
    (patches // v.merge_unit)
    * 2
    * (v.merge_unit * D * v.merge_unit * D + v.merge_unit * D * v.out_hidden_size)
  )
  return images * (patches * per_patch + (attn if attention else 0) + merger)


def remat_recompute_flops(
  cfg: qwen.Qwen25VLConfig, tokens: float, context: float, images: float = 0, patches: int = 0
) -> float:
  """FLOPs an update's backward pass runs again (beyond the backward's own 2x the forward), for
  `tokens` decoder tokens attending to `context` keys each and `images` x `patches` vision
  patches, by `cfg.remat_policy` (`layers.maybe_remat`; what each saves: `layers.REMAT_SAVED`):

  none: nothing.
  full: every decoder layer's and vision block's forward but its last matmul (mlp_down: the layer's
    own backward never reads its output); never what lies outside the layers (embedding, patch
    embedding, merger, lm head).
  dots_no_batch: the attention of every layer (q·kᵀ and P·V, or the fused kernel's forward).
  dots: nothing under xla attention; a fused kernel's forward (the decoder's, and the vision
    tower's full-attention layers'; windowed attention is always xla) as under dots_no_batch.

  Plus, under any policy, the scores (q·kᵀ, half the attention) once more where xla attention runs
  in query chunks: each chunk is its own checkpoint, whose backward needs its probabilities.
  Attention is dense, as `text_flops` counts it. tests/tools/test_compile_check.py checks this
  against the matmuls in the gradient's program on the tiny decoder.
  """
  t, v = cfg.text, cfg.vision
  text_attention = text_flops(cfg, tokens, context, 0) - text_flops(cfg, tokens, 0, 0)
  vision_full, vision_window = vision_attention_flops(cfg, images, patches)
  fused = layers.resolve_attention_impl(cfg.attention_impl, "tpu") != "xla"
  policy = cfg.remat_policy
  if policy == "full":
    D, I = t.hidden_size, t.intermediate_size
    text_layers = text_flops(cfg, tokens, context, 0) - 2 * D * I * t.num_hidden_layers * tokens
    Dv, Iv = v.hidden_size, v.intermediate_size  # q/k/v/o and gate/up, per patch and block:
    vision_blocks = images * patches * v.depth * (2 * 4 * Dv * Dv + 2 * 2 * Dv * Iv)
    again = text_layers + vision_blocks + vision_full + vision_window
  elif policy == "dots_no_batch":
    again = text_attention + vision_full + vision_window
  elif policy == "dots":
    again = text_attention + vision_full if fused else 0.0
  else:
    again = 0.0
  chunk = cfg.attention_chunk_size
  chunked = lambda n: not fused and 0 < chunk < n and n % chunk == 0  # noqa: E731
  if chunked(context):
    again += text_attention / 2
  if patches and chunked(patches):
    again += vision_full / 2
  return again


def model_flops(
  cfg: qwen.Qwen25VLConfig,
  *,
  tokens: float,
  logits_tokens: float,
  images: float = 0,
  patches: int = 0,
) -> float:
  """The physical minimum of one forward pass: 2 FLOPs per weight per token (2·N·tokens: every
  decoder weight matmul on `tokens`, the lm head on `logits_tokens` only, the vision tower's
  weights on `images` x `patches`), no attention scores, no recompute, no padding. An update is 3x
  (forward + backward, 6·N·tokens)."""
  return text_flops(cfg, tokens, 0, logits_tokens) + vision_flops(
    cfg, images, patches, attention=False
  )


def minimum_seconds(
  chip: Chip, devices: int, min_flops: float, min_bytes_per_device: float
) -> float:
  """Lower bound on a program's time: its model FLOPs over the slice at the bf16 peak, or the HBM
  bytes each device must move at its bandwidth, whichever is larger."""
  return max(min_flops / (devices * chip.peak_flops), min_bytes_per_device / chip.hbm_bandwidth)


def calls_per_rl_step(c: ml_collections.ConfigDict, s: Shapes) -> dict[str, int]:
  """How often the trainer runs each program in one RL step: one rollout (start + decode) of the
  whole batch, scoring in slices of `s.score_prompts` up to the last prompt an update reads (π_ref
  on each of them with a KL term), and prompts_per_step // prompts_per_update x passes optimizer
  updates (`Trainer`); the steps of `config_steps(c)`."""
  u = c.updates
  updates = int(c.rollout.prompts_per_step) // int(u.prompts_per_update)
  used = updates * int(u.prompts_per_update)
  slices = -(-used // s.score_prompts)
  calls = {
    "rollout_start": 1,
    "rollout_decode": 1,
    "score": slices,
    "reference": slices,
    "train": updates * int(u.passes),
  }
  return {st: calls[st] for st in config_steps(c)}


def rl_step_seconds(reports: Sequence["StepReport"]) -> tuple[float, float]:
  """(estimate, minimum): each program's t@peak and minimum time x its calls per RL step, summed."""
  est = sum(r.calls * r.seconds_at_peak for r in reports)
  low = sum(r.calls * r.min_seconds for r in reports)
  return est, low


# ------------------------------------------------------------------------------------------------
# Abstract arguments
# ------------------------------------------------------------------------------------------------
def _sds(shape, dtype, mesh, rules, axes) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(
    tuple(shape),
    jnp.dtype(dtype),
    sharding=sharding.logical_sharding(axes, mesh, rules, tuple(shape)),
  )


def _rows(shape, dtype, mesh, rules) -> jax.ShapeDtypeStruct:
  """A row-aligned batch leaf: leading dim over `batch`, the rest replicated."""
  return _sds(shape, dtype, mesh, rules, ("batch",) + (None,) * (len(shape) - 1))


def _attach(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` with the sharding of the same leaf in `shardings` (a prefix tree)."""
  flat = {
    path_str(p): s
    for p, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )[0]
  }
  return jax.tree_util.tree_map_with_path(
    lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat[path_str(p)]), tree
  )


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total


def vision_rows(
  cfg: qwen.Qwen25VLConfig, rows: int, patches: int, mesh, rules
) -> qwen.VisionInputs:
  """Per-row VisionInputs ([rows, N, ...], `prepare_vision_rows`), rows over `batch`."""
  return qwen.VisionInputs(
    **{
      k: _rows((rows,) + shape, jnp.dtype(dt), mesh, rules)
      for k, (shape, dt) in qwen.vision.input_shapes(cfg.vision, patches).items()
    }
  )


def sequence_batch(cfg: qwen.Qwen25VLConfig, prompts: int, s: Shapes, mesh, rules):
  """An abstract `rl.sequences.SequenceBatch` of `prompts` rows, rows over the batch axis."""
  G, Tp, L = s.group_size, s.prompt_len, s.response_len
  r = lambda shape, dt: _rows((prompts,) + shape, dt, mesh, rules)  # noqa: E731
  return sequences.SequenceBatch(
    prompt_ids=r((Tp,), jnp.int32),
    prompt_mask=r((Tp,), bool),
    prompt_pos=r((3, Tp), jnp.int32),
    prompt_visual=r((Tp,), bool),
    next_pos=r((), jnp.int32),
    blind_index=r((Tp,), jnp.int32),  # worst case: a prompt without images keeps every token
    vision=vision_rows(cfg, prompts, s.patches, mesh, rules),
    response=r((G, L), jnp.int32),
    response_mask=r((G, L), bool),
  )


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
  """One of the trainer's programs (from `programs.py`) and the abstract arguments it is compiled on."""

  name: str
  rules: str
  program: Any  # a jitted function
  args: tuple  # its arguments: ShapeDtypeStructs with the trainer's shardings
  resident_bytes: int
  flops: float  # analytic, all devices
  hbm_read_bytes: float = 0.0  # per device, for memory-bound loops (decode)
  hbm_per_step: dict | None = (
    None  # decode: analytic HBM bytes per step by part (`decode_bytes_per_step`)
  )
  note: str = ""
  min_flops: float = 0.0  # the physical minimum, all devices (`model_flops`)
  min_bytes: float = 0.0  # HBM bytes one device must move at least

  def lower(self) -> jax.stages.Lowered:
    return self.program.lower(*self.args)


@dataclasses.dataclass
class StepReport:
  name: str
  rules: str
  verdict: str  # fits | does not fit | error
  hbm_bytes: int
  compile_s: float = 0.0
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  code: int = 0
  resident: int = 0
  flops_per_device: float = 0.0
  xla_flops: float = 0.0
  xla_bytes: float = 0.0  # cost_analysis "bytes accessed" (loop bodies counted once)
  hbm_per_step: dict | None = None
  seconds_at_peak: float = 0.0
  note: str = ""
  traceback: str = ""  # a compile error's (not a crash's, not an out-of-memory's)
  min_seconds: float = 0.0  # `minimum_seconds` of the step's model FLOPs and HBM bytes
  calls: int = 0  # runs per RL step (`calls_per_rl_step`)

  @property
  def ratio(self) -> float:
    """t@peak over the physical minimum: what the implementation (attention, recompute, padding
    to the worst case, memory traffic) costs beyond the model FLOPs."""
    return self.seconds_at_peak / self.min_seconds if self.min_seconds else float("nan")

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code + self.resident


class Context:
  """Everything the steps share: config, mesh, model graph, abstract params and train state, and the
  trainer's programs built from them exactly as `Trainer` builds them (`programs.trainer_programs`).

  `devices`: the mesh's devices (a topology's abstract TPUs, or local devices in tests); `topo`: the
  slice, for the report (None: no HBM verdicts); `model_cfg`: the model (default: `model_config(c)`).
  """

  def __init__(
    self,
    c: ml_collections.ConfigDict,
    devices: Sequence,
    *,
    topo: Topology | None = None,
    score_prompts: int | None = None,
    model_cfg: qwen.Qwen25VLConfig | None = None,
  ):
    if score_prompts:  # what-if: the trainer with this scoring slice
      c = c.copy_and_resolve_references()
      with c.unlocked():
        c.pgpo.scoring_prompts = int(score_prompts)
    self.c, self.topo = c, topo
    self.cfg = model_cfg or model_config(c)
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    self.batch_shards = rollout_lib.batch_shards(self.mesh, sharding.SAMPLE_RULES)
    self.shapes = shapes_from_config(c, self.batch_shards, score_prompts)
    self.dtype = jnp.dtype(c.model.dtype)  # compute dtype (activations, KV cache)
    self.param_dtype = jnp.dtype(c.model.param_dtype or c.model.dtype)
    abstract = qwen.abstract_model(self.cfg, self.dtype, param_dtype=self.param_dtype)
    self.model_graphdef, params = nnx.split(abstract)
    self.train_sh = sharding.param_shardings(abstract, self.mesh, sharding.TRAIN_RULES)
    self.sample_sh = sharding.param_shardings(abstract, self.mesh, sharding.SAMPLE_RULES)
    self.train_params = _attach(params, self.train_sh)
    self.sample_params = _attach(params, self.sample_sh)
    self.fallbacks = sharding.sharding_fallbacks(abstract, self.mesh, sharding.TRAIN_RULES)
    updates_per_step = c.rollout.prompts_per_step // c.updates.prompts_per_update * c.updates.passes
    self.optimizer = programs.make_optimizer(c, max(1, c.train.num_steps) * updates_per_step)
    self.train_graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    state = jax.eval_shape(
      lambda: train_step_lib.init_train_state(
        qwen.Qwen25VL(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=nnx.Rngs(0)),
        self.optimizer,
      )[1]
    )
    self.state_sh = programs.train_state_shardings(state, self.train_sh, self.mesh)
    self.train_state = _attach(state, self.state_sh)
    self.param_bytes = per_device_bytes(self.train_params)
    self.state_bytes = per_device_bytes(self.train_state)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    self.programs = programs.trainer_programs(
      c,
      model_graphdef=self.model_graphdef,
      train_graphdef=self.train_graphdef,
      optimizer=self.optimizer,
      mesh=self.mesh,
      state_sharding=self.state_sh,
    )
    self.rollout_static = programs.training_rollout_static(c, self.cfg.pad_token_id, self.mesh)


def rollout_compute_dtype(static: rollout_lib.RolloutStatic, param_dtype) -> jnp.dtype:
  """The dtype the trainer samples in: the static's compute dtype (`rollout.dtype`), else the parameters'."""
  return jnp.dtype(static.compute_dtype or param_dtype)


def decode_bytes_per_step(
  cfg: qwen.Qwen25VLConfig,
  s: Shapes,
  *,
  param_bytes: float,
  kv_itemsize: int,
  batch_shards: int,
  kv_heads_per_device: int,
  chunk: int,
) -> dict[str, float]:
  """HBM bytes one device moves per decode step (analytic), averaged over the N steps.

  Weights are read once per step. Keys/values: the prompt's T slots once per prompt (its G samples
  share them), each row's own filled slots (rounded up to the attention chunk, as the decode loop
  reads them) and one slot written. `minimum` reads weights once plus exactly the filled slots.
  With slot refill the rows stay full, so per generated token the same estimate holds.
  """
  t = cfg.text
  slot = (
    2 * t.num_hidden_layers * kv_heads_per_device * t.head_dim * kv_itemsize
  )  # k and v, one token
  B, W = s.rollout_prompts / batch_shards, s.rollout_prompts * s.group_size / batch_shards
  N, T = s.response_len, s.prompt_len
  mean_filled = (N - 1) / 2  # response slots filled, averaged over the steps
  S = max(N - 1, 1)
  if 0 < chunk < S:
    S = -(-S // chunk) * chunk
    steps = np.arange(1, N)
    read = float(np.mean(np.minimum(-(-steps // chunk) * chunk, S)))
  else:
    read = S
  return {
    "weights": param_bytes,
    "prompt_kv": B * T * slot,
    "row_kv": W * read * slot,
    "write": W * slot,
    "minimum": param_bytes + B * T * slot + W * mean_filled * slot,
  }


def rollout_steps(ctx: Context, shapes: Shapes | None = None) -> list[Step]:
  """The trainer's rollout programs on abstract inputs of `shapes` (default: the worst-case buckets)."""
  cfg, s, mesh = ctx.cfg, shapes or ctx.shapes, ctx.mesh
  rules = sharding.SAMPLE_RULES
  B, G, T, N = s.rollout_prompts, s.group_size, s.prompt_len, s.response_len
  W = B * G
  static = ctx.rollout_static
  R = rollout_lib.decode_rows_for(W, static.decode_rows)
  dtype = rollout_compute_dtype(static, ctx.dtype)
  prog = programs.rollout_programs(ctx.model_graphdef, static)
  # The parameters as the trainer hands them to start / decode: cast to the compute dtype (the cast
  # program is elementwise), SAMPLE layout.
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding
    ),
    ctx.sample_params,
  )
  E = len(rollout_lib.default_eos_ids(cfg))
  # The inputs exactly as `rollout.prepare_inputs` builds them (per-row vision, rows over `batch`).
  inputs = rollout_lib.RolloutInputs(
    input_ids=_rows((B, T), jnp.int32, mesh, rules),
    attention_mask=_rows((B, T), bool, mesh, rules),
    position_ids=_sds((3, B, T), jnp.int32, mesh, rules, (None, "batch", "length")),
    vision=vision_rows(cfg, B, s.patches, mesh, rules),
    prompt_ids=_rows((B,), jnp.uint32, mesh, rules),
    valid=_rows((B,), bool, mesh, rules),
    eos_ids=_rows((B, E), jnp.int32, mesh, rules),
  )
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
  # The decode state exactly as the start program returns it, in the rollout's layout.
  dstate = jax.eval_shape(prog.start, params, inputs, key)
  dstate = _attach(dstate, rollout_lib.tree_shardings(dstate, mesh, rules))
  prefill_flops = text_flops(cfg, B * T, T, B) + vision_flops(cfg, B, s.patches)
  # Decode: at most W * N tokens; a token attends to its prompt and, on average, half its response.
  decode_flops = text_flops(cfg, W * N, T + N / 2, W * N)
  prefill_min = model_flops(cfg, tokens=B * T, logits_tokens=B, images=B, patches=s.patches)
  t = cfg.text
  kv_spec = sharding.logical_to_spec(("act_kv_heads",), rules, mesh, (t.num_key_value_heads,))
  kv_split = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(kv_spec)) if a is not None]))
  per_step = decode_bytes_per_step(
    cfg,
    s,
    param_bytes=per_device_bytes(params),
    kv_itemsize=dtype.itemsize,
    batch_shards=ctx.batch_shards,
    kv_heads_per_device=t.num_key_value_heads // kv_split,
    chunk=static.chunk,
  )
  moved = per_step["weights"] + per_step["prompt_kv"] + per_step["row_kv"] + per_step["write"]
  refill = f", {R} rows refilled" if R < W else ""
  return [
    Step(
      "rollout_start",
      "sample",
      prog.start,
      (params, inputs, key),
      ctx.state_bytes,
      prefill_flops,
      min_flops=prefill_min,
      min_bytes=per_device_bytes(params),  # the weights, read once
      note=f"B={B} prompts x T={T}, {s.patches} patches per prompt, {dtype.name}",
    ),
    Step(
      "rollout_decode",
      "sample",
      prog.decode,
      (params, dstate),
      ctx.state_bytes,
      decode_flops,
      hbm_read_bytes=N * moved,
      hbm_per_step=per_step,
      min_flops=model_flops(cfg, tokens=W * N, logits_tokens=W * N),
      min_bytes=N * per_step["minimum"],
      note=f"W={W} samples x N={N} steps{refill}, prompt KV T={T} shared by G={G}, {dtype.name}",
    ),
  ]


def packed_batch(ctx: Context, prompts: int, units: int, s: Shapes, blind: bool):
  """train.packing: an abstract PackedBatch of `prompts` prompts in `units` units, at the sizes
  that hold any batch (every response at max_new_tokens: as much work as the padded layout)."""
  row = ctx.c.train.packed_row_length
  sizes = packing.worst_case_sizes(
    prompts // units, s.group_size, s.prompt_len, s.response_len, row, blind=blind
  )
  leaf = lambda shape, dt: _rows(shape, dt, ctx.mesh, sharding.TRAIN_RULES)  # noqa: E731
  return packing.abstract_batch(ctx.cfg, units, prompts // units, sizes, row, s.patches, leaf)


def scoring_slice(ctx: Context, s: Shapes):
  """The abstract scoring slice of `s.score_prompts` prompts the trainer hands the score and π_ref
  programs: a SequenceBatch, or with train.packing one PackedBatch (one unit per batch shard, the
  blind view with PGPO)."""
  if ctx.c.train.packing:
    units = programs.packing_units(ctx.c, ctx.mesh)[0]
    return packed_batch(ctx, s.score_prompts, units, s, blind=ctx.c.pgpo.enabled)
  return sequence_batch(ctx.cfg, s.score_prompts, s, ctx.mesh, sharding.TRAIN_RULES)


def score_step(ctx: Context, shapes: Shapes | None = None) -> Step:
  """The trainer's scoring program on one abstract slice of `shapes.score_prompts` prompts (with
  train.packing: packed into one unit per batch shard, as the trainer)."""
  cfg, s = ctx.cfg, shapes or ctx.shapes
  seq = scoring_slice(ctx, s)
  fn = ctx.programs.score
  rows, T = s.score_prompts * s.group_size, s.prompt_len + s.response_len
  views = 2 if ctx.c.pgpo.enabled else 1  # image view (+ blind view, worst case as long)
  flops = views * text_flops(cfg, rows * T, T, rows * s.response_len) + vision_flops(
    cfg, s.score_prompts, s.patches
  )
  min_flops = views * model_flops(cfg, tokens=rows * T, logits_tokens=rows * s.response_len)
  min_flops += model_flops(
    cfg, tokens=0, logits_tokens=0, images=s.score_prompts, patches=s.patches
  )
  # AdamW moments (params are an argument), + π_ref with a KL term (`reference.py`).
  resident = ctx.state_bytes - ctx.param_bytes + (ctx.param_bytes if ctx.c.loss.kl_coef else 0)
  return Step(
    "score",
    "train",
    fn,
    (ctx.train_params, seq),
    resident,
    flops,
    note=f"{rows} sequences x T={T}, {views} view(s)",
    min_flops=min_flops,
    min_bytes=ctx.param_bytes,  # the weights, read once
  )


def reference_step(ctx: Context, shapes: Shapes | None = None) -> Step:
  """The trainer's π_ref program (`loss.kl_coef > 0`) on the abstract scoring slice the score
  program gets (packed alike with train.packing): π_ref's weights (the policy's layout) are its
  argument, the whole train state stays resident."""
  if ctx.programs.reference is None:
    raise ValueError("no π_ref program: loss.kl_coef is 0")
  cfg, s = ctx.cfg, shapes or ctx.shapes
  rows, T, L = s.score_prompts * s.group_size, s.prompt_len + s.response_len, s.response_len
  images = dict(images=s.score_prompts, patches=s.patches)
  return Step(
    "reference",
    "train",
    ctx.programs.reference,
    (ctx.train_params, scoring_slice(ctx, s)),
    ctx.state_bytes,
    text_flops(cfg, rows * T, T, rows * L) + vision_flops(cfg, s.score_prompts, s.patches),
    note=f"{rows} sequences x T={T}, the image view",
    min_flops=model_flops(cfg, tokens=rows * T, logits_tokens=rows * L, **images),
    min_bytes=ctx.param_bytes,  # π_ref's weights, read once
  )


def train_step_step(ctx: Context, shapes: Shapes | None = None) -> Step:
  """The trainer's update program on an abstract update batch of `shapes.update_prompts` prompts (with
  train.packing: packed into one unit per micro-batch and batch shard, as the trainer)."""
  cfg, s, mesh = ctx.cfg, shapes or ctx.shapes, ctx.mesh
  rules = sharding.TRAIN_RULES
  Pu, G, L = s.update_prompts, s.group_size, s.response_len
  rep = NamedSharding(mesh, P())
  batch = {
    "seq": sequence_batch(cfg, Pu, s, mesh, rules),
    "adv": _rows((Pu, G, L), jnp.float32, mesh, rules),
    "old_logp": _rows((Pu, G, L), jnp.float32, mesh, rules),
    "token_normalizer": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    "seq_normalizer": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
  }
  if ctx.c.loss.kl_coef:  # log π_ref of the KL term
    batch["ref_logp"] = _rows((Pu, G, L), jnp.float32, mesh, rules)
  if ctx.c.train.packing:  # the layout of `packed_passes.update_batch`
    pb = packed_batch(ctx, Pu, programs.packing_units(ctx.c, mesh)[1], s, blind=False)
    per_token = lambda: _rows(pb.target.shape, jnp.float32, mesh, rules)  # noqa: E731
    batch = {
      "packed": pb,
      **{k: per_token() for k in ("adv", "old_logp", "ref_logp") if k in batch},
      "token_normalizer": batch["token_normalizer"],
      "seq_normalizer": batch["seq_normalizer"],
      "loss_horizon": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    }
  step = ctx.programs.train_step
  rows, T = Pu * G, s.prompt_len + L
  fwd = text_flops(cfg, rows * T, T, rows * L) + vision_flops(cfg, Pu, s.patches)
  recompute = remat_recompute_flops(cfg, rows * T, T, Pu, s.patches)
  fwd_min = model_flops(cfg, tokens=rows * T, logits_tokens=rows * L, images=Pu, patches=s.patches)
  ref_bytes = ctx.param_bytes if ctx.c.loss.kl_coef else 0  # π_ref stays on the devices
  return Step(
    "train",
    "train",
    step,
    (ctx.train_state, batch),
    ref_bytes,
    3 * fwd + recompute,
    note=f"{rows} sequences x T={T} in {s.num_microbatches} micro-batches, remat={cfg.remat_policy}",
    min_flops=3 * fwd_min,  # 6·N·tokens
    min_bytes=2 * ctx.state_bytes,  # the train state read and written once
  )


ALL_STEPS = ("rollout_start", "rollout_decode", "score", "reference", "train")


def config_steps(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The steps the trainer of config `c` runs: `ALL_STEPS`, without "reference" when
  loss.kl_coef == 0 (no KL term: no π_ref program)."""
  return tuple(st for st in ALL_STEPS if st != "reference" or c.loss.kl_coef)


# ------------------------------------------------------------------------------------------------
# Compile and report
# ------------------------------------------------------------------------------------------------
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds .*memory|Ran out of memory")


def _base_report(step: Step, ctx: Context) -> StepReport:
  """The report of `step` before (or without) compiling it: analytic FLOPs and t@peak."""
  chip = ctx.topo.chip
  rep = StepReport(
    step.name,
    step.rules,
    "error",
    chip.hbm_bytes,
    resident=step.resident_bytes,
    note=step.note,
    hbm_per_step=step.hbm_per_step,
  )
  rep.flops_per_device = step.flops / ctx.mesh.size
  peak = matmul_peak(chip, ctx.dtype, MATMUL_PRECISION)
  rep.seconds_at_peak = max(rep.flops_per_device / peak, step.hbm_read_bytes / chip.hbm_bandwidth)
  rep.min_seconds = minimum_seconds(chip, ctx.mesh.size, step.min_flops, step.min_bytes)
  rep.calls = calls_per_rl_step(ctx.c, ctx.shapes)[step.name]
  return rep


def compile_step(step: Step, ctx: Context) -> StepReport:
  """Compiles `step` in this process; an exception (not a crash) is reported, not raised."""
  chip = ctx.topo.chip
  rep = _base_report(step, ctx)
  t0 = time.time()
  # The trainer's numerics (not a test suite's "highest" matmul precision), and no persistent
  # compilation cache: a topology executable cannot be reloaded without a TPU client.
  from jax.experimental.compilation_cache import compilation_cache

  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # the "is the cache used" decision is memoised per process
  try:
    with (
      sharding.use_rules(ctx.mesh, sharding.RULES[step.rules]),
      jax.default_matmul_precision(MATMUL_PRECISION),
    ):
      compiled = step.lower().compile()  # traced (and `constrain`ed) here
  except Exception as e:  # noqa: BLE001 - reported, not raised
    rep.compile_s = time.time() - t0
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if _OOM.search(str(e)):
      rep.verdict, rep.note = "does not fit", f"XLA: {msg[:300]}"
    else:
      rep.note = f"{type(e).__name__}: {msg[:300]}"
      rep.traceback = traceback.format_exc()
    return rep
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    compilation_cache.reset_cache()
  rep.compile_s = time.time() - t0
  m = compiled.memory_analysis()
  rep.argument, rep.output, rep.alias = (
    m.argument_size_in_bytes,
    m.output_size_in_bytes,
    m.alias_size_in_bytes,
  )
  rep.temp, rep.code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  rep.xla_flops = float((cost or {}).get("flops", 0.0))
  rep.xla_bytes = float((cost or {}).get("bytes accessed", 0.0))
  rep.verdict = "fits" if rep.total <= chip.hbm_bytes else "does not fit"
  return rep


def build_steps(ctx: Context, steps: Sequence[str]) -> list[Step]:
  """The named programs on their abstract arguments, in `ALL_STEPS` order ("reference" only where
  the config has a π_ref program: `config_steps`)."""
  built: list[Step] = []
  if any(s.startswith("rollout") for s in steps):
    built += [st for st in rollout_steps(ctx) if st.name in steps]
  if "score" in steps:
    built.append(score_step(ctx))
  if "reference" in steps and "reference" in config_steps(ctx.c):
    built.append(reference_step(ctx))
  if "train" in steps:
    built.append(train_step_step(ctx))
  return built


# Test hook: a child compiling the step named here aborts (SIGABRT) before compiling, as the TPU
# compiler does on a failed internal check. Lets tests see a crash reported without a TPU compile.
ABORT_ENV = "PGPO_COMPILE_CHECK_ABORT_IN"


def _compile_child(conn, c, topology: str, name: str, score_prompts: int | None) -> None:
  """Child process: rebuilds the context, compiles one step, sends its StepReport through `conn`."""
  if os.environ.get(ABORT_ENV) == name:
    os.abort()
  try:
    topo = parse_topology(topology)
    ctx = Context(c, topology_devices(topo), topo=topo, score_prompts=score_prompts)
    (step,) = build_steps(ctx, [name])
    rep = compile_step(step, ctx)
  except Exception as e:  # noqa: BLE001 - sent back, reported by the parent
    rep = StepReport(name, "", "error", 0, note=f"{type(e).__name__}: {str(e)[:300]}")
    rep.traceback = traceback.format_exc()
  conn.send(rep)
  conn.close()


def compile_isolated(
  step: Step, ctx: Context, topology: str, score_prompts: int | None = None
) -> StepReport:
  """Compiles `step` in a child process (spawned: a fresh interpreter and libtpu), so that a
  compiler crash (abort, segfault) becomes this step's "crashed" report instead of ending the
  check. The child rebuilds the context from (config, topology) and sends back its report."""
  import multiprocessing
  import signal

  mp = multiprocessing.get_context("spawn")
  recv, send = mp.Pipe(duplex=False)
  proc = mp.Process(
    target=_compile_child,
    args=(send, ctx.c, topology, step.name, score_prompts),
    name=f"compile_check:{step.name}",
  )
  t0 = time.time()
  proc.start()
  send.close()  # the child holds the only writer: EOF as soon as it dies
  try:
    rep: StepReport | None = recv.recv()
  except EOFError:
    rep = None
  proc.join()
  if rep is not None:
    return rep
  rep = _base_report(step, ctx)
  rep.compile_s = time.time() - t0
  code = proc.exitcode
  if code is not None and code < 0:
    rep.note = f"crashed (signal {-code}: {signal.Signals(-code).name})"
  else:
    rep.note = f"crashed (exit status {code})"
  rep.note += "; the compiler's message is in stderr above"
  rep.verdict = "crashed"
  return rep


def run(
  c: ml_collections.ConfigDict,
  topology: str,
  steps: Sequence[str] = ALL_STEPS,
  log: Callable[[str], None] = print,
  *,
  score_prompts: int | None = None,
  isolate: bool = False,
) -> tuple[Context, list[StepReport]]:
  """Compiles `steps` of config `c` for `topology`; returns the context and one report per step.

  `score_prompts`: what-if, score in calls of that many prompts (default: the trainer's slice).
  `isolate`: compile each step in its own child process (`compile_isolated`; the CLI's default), so
  that a compiler crash is reported as that step's failure.
  """
  unknown = [s for s in steps if s not in ALL_STEPS]
  if unknown:
    raise ValueError(f"unknown steps {unknown}; valid: {list(ALL_STEPS)}")
  topo = parse_topology(topology)
  ctx = Context(c, topology_devices(topo), topo=topo, score_prompts=score_prompts)
  if "reference" in steps and "reference" not in config_steps(c):
    log("reference: not compiled, loss.kl_coef = 0 (no KL term, no π_ref program)")
  reports = []
  for st in build_steps(ctx, steps):
    log(f"compiling {st.name} ({st.note}) ...")
    if isolate:
      reports.append(compile_isolated(st, ctx, topology, score_prompts))
    else:
      reports.append(compile_step(st, ctx))
    r = reports[-1]
    log(f"  {r.verdict} in {r.compile_s:.1f} s" + ("" if r.verdict == "fits" else f": {r.note}"))
  return ctx, reports


def _gib(x: float) -> str:
  return f"{x / GiB:7.2f}"


def _timing(r: StepReport) -> str:
  return f"{r.min_seconds:7.2f}{r.ratio:5.2f}x{r.calls:6d}"


def rl_step_line(reports: Sequence[StepReport], expected: Sequence[str] = ALL_STEPS) -> str:
  """The whole RL step: every program x its runs per step, at t@peak and at the minimum; names the
  `expected` steps (the config's: `config_steps`) that were not compiled."""
  est, low = rl_step_seconds(reports)
  parts = " + ".join(f"{r.calls} x {r.seconds_at_peak:.2f} {r.name}" for r in reports)
  missing = [s for s in expected if s not in {r.name for r in reports}]
  line = (
    f"RL step at peak: {parts} = {est:.1f} s; minimum {low:.1f} s "
    f"({est / low if low else float('nan'):.2f}x)"
  )
  return line + (f" (without {', '.join(missing)}: not compiled)" if missing else "")


def _attention_desc(cfg: qwen.Qwen25VLConfig) -> str:
  impl = layers.resolve_attention_impl(cfg.attention_impl, "tpu")
  if impl == "xla":
    return f"xla (query chunks of {cfg.attention_chunk_size})"
  return f"{impl} (Pallas kernel per device under shard_map; cached decode steps: xla)"


def format_report(ctx: Context, reports: Sequence[StepReport]) -> str:
  chip, mesh, s, cfg = ctx.topo.chip, ctx.mesh, ctx.shapes, ctx.cfg
  lines = [
    f"topology {ctx.topo.name} ({ctx.topo.desc}, {mesh.size} x TPU {chip.name}, "
    f"{chip.hbm_bytes / GiB:.0f} GiB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per device)",
    f"mesh {dict(mesh.shape)}; model {ctx.num_params / 1e9:.2f}B params in {ctx.param_dtype.name}, "
    f"compute in {ctx.dtype.name} (t@peak at {matmul_peak(chip, ctx.dtype, MATMUL_PRECISION) / 1e12:.0f} "
    f"TFLOP/s: {MATMUL_PRECISION!r} matmul precision), "
    f"remat={cfg.remat_policy}, attention={_attention_desc(cfg)}",
    f"shapes: rollout {s.rollout_prompts} prompts x G={s.group_size}, prompt {s.prompt_len} + response "
    f"{s.response_len} tokens, {s.patches} patches/prompt; update {s.update_prompts} prompts in "
    f"{s.num_microbatches} micro-batches of {s.micro_prompts}",
    f"per device: params {ctx.param_bytes / GiB:.2f} GiB, train state (params + AdamW) "
    f"{ctx.state_bytes / GiB:.2f} GiB",
    "",
    f"{'step':<15}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'resid':>8}{'total':>8} / HBM  {'use':>5}"
    f"  {'TFLOP/dev':>10}{'t@peak s':>9}{'min s':>7}{'x min':>6}{'/step':>6}{'XLA TF*':>9}"
    f"{'compile':>8}  verdict",
  ]
  for r in reports:
    if r.verdict in ("error", "crashed") or (
      r.verdict == "does not fit" and not r.argument and not r.temp
    ):
      lines.append(
        f"{r.name:<15}{'-':>8}{'-':>8}{'-':>8}{'-':>8}{_gib(r.resident)}{'-':>8}"
        f" / {chip.hbm_bytes / GiB:.0f}"
        f"  {'-':>5}  {r.flops_per_device / 1e12:10.1f}{r.seconds_at_peak:9.2f}{_timing(r)}{'-':>9}"
        f"{r.compile_s:7.0f}s  {r.verdict.upper()}"
      )
      lines.append(f"{'':<15}{r.note}")
      continue
    lines.append(
      f"{r.name:<15}{_gib(r.argument)} {_gib(r.output)} {_gib(r.alias)} {_gib(r.temp)} {_gib(r.resident)} "
      f"{_gib(r.total)} / {chip.hbm_bytes / GiB:.0f}  {100 * r.total / chip.hbm_bytes:4.0f}%"
      f"  {r.flops_per_device / 1e12:10.1f}{r.seconds_at_peak:9.2f}{_timing(r)}"
      f"{r.xla_flops / 1e12:9.2f}"
      f"{r.compile_s:7.0f}s  {r.verdict.upper() if r.verdict != 'fits' else 'fits'}"
    )
  lines += [
    "",
    "GiB per device. total = args + out - alias + temp + generated code + resident (train state held "
    "on the devices besides the step's own arguments). TFLOP/dev: analytic; XLA TF*: cost_analysis, loop "
    "bodies counted once. min s: the physical minimum (model FLOPs, 2·N·tokens per forward and "
    "6·N·tokens per update, at the bf16 peak; or the HBM bytes that must move, at bandwidth); x min: "
    "t@peak / min s; /step: runs per RL step.",
    rl_step_line(reports, config_steps(ctx.c)),
  ]
  if ctx.fallbacks:
    lines.append("TRAIN_RULES fallbacks (dims the mesh axis does not divide, replicated instead):")
    lines += [f"  {f}" for f in ctx.fallbacks[:12]]
  for r in reports:
    if r.hbm_per_step:
      h = r.hbm_per_step
      moved = h["weights"] + h["prompt_kv"] + h["row_kv"] + h["write"]
      lines.append(
        f"{r.name}: HBM per decode step per device (analytic, mean over the N steps): {moved / GiB:.2f} GiB "
        f"= weights {h['weights'] / GiB:.2f} + prompt KV {h['prompt_kv'] / GiB:.2f} + row KV read "
        f"{h['row_kv'] / GiB:.2f} + written {h['write'] / GiB:.4f}; minimum (weights once + filled "
        f"slots) {h['minimum'] / GiB:.2f} GiB ({moved / h['minimum']:.2f}x)"
      )
  return "\n".join(lines)


# What to turn when a step does not fit (or its compiler crashes): the config keys that size it.
KNOBS: dict[str, str] = {
  "rollout_start": "rollout.prompts_per_step, data.max_prompt_length or data.max_pixels",
  "rollout_decode": "rollout.decode_rows (rows decoded at once, slot refill), "
  "rollout.prompts_per_step or rollout.max_new_tokens",
  "score": "pgpo.scoring_prompts (prompts per scoring call; 0 = updates.micro_batch_prompts) "
  "or model.attention_chunk_size",
  "reference": "pgpo.scoring_prompts (π_ref scores each scoring slice), loss.logprob_chunk or "
  "model.attention_chunk_size",
  "train": "updates.micro_batch_prompts (prompts per micro-batch), model.remat_policy or "
  "model.attention_chunk_size",
}


def failures(reports: Sequence[StepReport]) -> list[str]:
  """One line per step that does not fit, crashed or failed to compile, naming the knob to turn."""
  lines = []
  for r in reports:
    if r.verdict == "error":
      lines.append(f"{r.name}: compile error: {r.note[:200]}")
    elif r.verdict == "crashed":  # the note says how: "crashed (signal 6: SIGABRT); ..."
      lines.append(f"{r.name} {r.note}. Turn {KNOBS[r.name]}.")
    elif r.verdict == "does not fit":
      size = (
        f" ({r.total / GiB:.1f} of {r.hbm_bytes / GiB:.0f} GiB)" if r.argument or r.temp else ""
      )
      lines.append(f"{r.name} does not fit{size}: {r.note[:200]}. Turn {KNOBS[r.name]}.")
  return lines


EXIT_DOES_NOT_FIT = 1  # a step does not fit, or its compiler crashed
EXIT_COMPILE_ERROR = (
  3  # another compile error (2 is the commands' usage error: `common.USAGE_ERROR`)
)


def exit_code(reports: Sequence[StepReport]) -> int:
  """0 all fit; `EXIT_DOES_NOT_FIT` (1) a step does not fit or its compiler crashed;
  `EXIT_COMPILE_ERROR` (3) a compile error that is neither."""
  if any(r.verdict == "error" for r in reports):
    return EXIT_COMPILE_ERROR
  return EXIT_DOES_NOT_FIT if any(r.verdict in ("does not fit", "crashed") for r in reports) else 0
