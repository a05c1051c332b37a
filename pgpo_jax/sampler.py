"""Running the rollout programs: `rollout` (the trainer's and the evaluator's) and `generate` (host API).

    from pgpo_jax import sampler
    out = sampler.generate(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                           max_new_tokens=256, temperature=1.0, num_samples=8, seed=0)
    out.tokens  # [B*G, max_new_tokens], prompt-major: prompt b's samples are rows b*G .. b*G+G-1

The programs themselves (prefill + first token, the decode loop, packing) are defined in `rollout.py`
and jitted in `programs.py`; this module places the inputs (on a mesh: rows over the logical `batch`
axis, host-local rows joined into global arrays on a multi-host run) and runs (cast ->) start ->
decode -> finish. RNG streams and log-prob semantics: `rollout.py`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pgpo_jax import multihost, programs, sharding
from pgpo_jax.models import qwen2_5_vl as qwen
from pgpo_jax.rollout import (
  RolloutInputs,
  RolloutOutput,
  RolloutStatic,
  SamplingConfig,
  batch_shards,
  logical_axes,
  needs_cast,
  prepare_inputs,
  tree_shardings,
)

Array = jax.Array


def rollout(
  graphdef,
  state,
  inputs: RolloutInputs,
  key: Array | int,
  *,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  num_samples: int = 1,
  pad_token_id: int,
  mesh: Mesh | None = None,
  rules: sharding.Rules | None = None,
  decode_rows: int = 0,
  compute_dtype=None,
) -> RolloutOutput:
  """Samples `num_samples` completions of every prompt; no array leaves the devices.

  Args:
    graphdef, state: `nnx.split(model)`; under a mesh, `state` already placed (e.g. SAMPLE_RULES).
    inputs: `RolloutInputs` [B, T]: device arrays (global), or host numpy holding this host's
      prompts (in a multi-process run each host passes its own, equally many; `multihost`).
      With a mesh, the global B must be a multiple of `batch_shards(mesh, rules)`.
    key: a PRNG key or an int seed.
    max_new_tokens: N, the length of the output buffers.
    sampling: temperature / top-k / top-p.
    num_samples: G completions per prompt.
    pad_token_id: written after the stop token.
    mesh, rules: shard the rows over the mesh axes of the logical `batch` axis (and the KV heads
      of the cache over `act_kv_heads`). Default: the `sharding.use_rules` context if one is
      active, else unsharded; `rules` defaults to SAMPLE_RULES.
    decode_rows: 0 decodes all B*G samples at once (a batch runs until its longest sample ends).
      R > 0 (a multiple of the batch shards) decodes R samples at a time; a row whose sample ends
      takes the next pending sample of its shard (slot refill / continuous batching), so rows stay
      busy while samples are pending. A sample's tokens do not depend on R.
    compute_dtype: e.g. "bfloat16": sample with a copy of the parameters cast to it, made once per
      call (`state` is untouched), and a KV cache in it; logits, sampling and log-probs stay
      float32. None: the parameters' own dtype.
  Returns:
    `RolloutOutput` with B*G rows (batch-padding rows included: length 0, mask all False), global
    arrays; `multihost.to_local(out, logical_axes(out), mesh, rules)` gives this host's rows.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if decode_rows < 0:
    raise ValueError(f"decode_rows must be >= 0 (0 = all samples at once), got {decode_rows}")
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  mesh, rules = _resolve_mesh(mesh, rules)
  n = batch_shards(mesh, rules)
  if decode_rows % n:
    raise ValueError(
      f"decode_rows={decode_rows} does not split over the {n} shards of the 'batch' axis"
    )
  if mesh is not None:
    on_device = all(isinstance(x, jax.Array) for x in jax.tree.leaves(inputs))
    # Host numpy inputs are this host's prompts (all of them in a single-process run).
    B = inputs.batch_size * (1 if on_device else jax.process_count())
    if B % n:
      raise ValueError(
        f"a batch of {B} prompts does not split over the {n} shards of the 'batch' axis "
        f"({rules['batch']!r}); use prepare_inputs(batch_multiple={n}) (per host: "
        f"{n} / number of hosts)"
      )
    if on_device:
      inputs = jax.device_put(inputs, tree_shardings(inputs, mesh, rules))
    else:
      inputs = multihost.to_global(inputs, logical_axes(inputs), mesh, rules, what="rollout inputs")
    key = multihost.replicated(key, mesh)
  static = RolloutStatic.make(
    sampling,
    max_new_tokens,
    num_samples,
    pad_token_id,
    mesh,
    rules,
    decode_rows=decode_rows,
    compute_dtype=compute_dtype,
  )
  prog = programs.rollout_programs(graphdef, static)
  if needs_cast(static, state):
    state = prog.cast(state)  # once per call; the caller's (float32) parameters stay as they are
  dstate = prog.start(state, inputs, key)
  if max_new_tokens > 1:  # with N = 1 the first token is all there is (no decode program)
    dstate = prog.decode(state, dstate)
  return prog.finish(dstate)


def generate(
  model: qwen.Qwen25VL,
  input_ids,
  attention_mask=None,
  pixel_values=None,
  image_grid_thw=None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int = 0,
  num_samples: int = 1,
  eos_token_ids: Sequence[int] | np.ndarray | None = None,
  pad_token_id: int | None = None,
  seed: int | Array = 0,
  prompt_ids: Sequence[int] | None = None,
  mesh: Mesh | None = None,
  rules: sharding.Rules | None = None,
  decode_rows: int = 0,
  compute_dtype=None,
  length_limits: Sequence[int] | None = None,
) -> RolloutOutput:
  """Samples completions for prompts exactly as the HF processor returns them.

  Args:
    model: a `Qwen25VL`.
    input_ids, attention_mask: [B, T] (left or right padded).
    pixel_values, image_grid_thw: [N_patches, 1176] and [N_images, 3], or None (text only).
    max_new_tokens: N; temperature (0 = greedy), top_p (1 = off), top_k (0 = off).
    num_samples: G completions per prompt (each prompt is prefilled once).
    eos_token_ids: stop ids (default: `<|im_end|>`, `<|endoftext|>` from the config), or [B, E].
    pad_token_id: fills the tokens after the stop token (default: the config's pad id).
    seed: int or PRNG key. prompt_ids: [B] RNG stream ids (default: 0..B-1).
    mesh, rules: shard the rows over the mesh (see `rollout`); parameters not yet on the mesh are
      placed with `sharding.shard_model`'s layout for `rules` (default SAMPLE_RULES).
    decode_rows: decode that many samples at a time with slot refill (0 = all at once; `rollout`).
    compute_dtype: e.g. "bfloat16" to sample with a cast copy of the weights (`rollout`).
    length_limits: [B] max new tokens per prompt (the rest are truncated there), or None.
  Returns:
    `RolloutOutput` of host numpy arrays with B*G rows, prompt-major.
  """
  cfg = model.cfg
  sampling = SamplingConfig(float(temperature), float(top_p), int(top_k))
  mesh, rules = _resolve_mesh(mesh, rules)
  inputs = prepare_inputs(
    cfg,
    input_ids,
    attention_mask,
    pixel_values,
    image_grid_thw,
    eos_token_ids=eos_token_ids,
    prompt_ids=prompt_ids,
    batch_multiple=batch_shards(mesh, rules),
    length_limits=length_limits,
  )
  B = np.asarray(input_ids).shape[0]
  graphdef, state = nnx.split(model)
  if mesh is not None and not _on_mesh(state, mesh):
    state = jax.device_put(state, _state_shardings(state, mesh, rules))
  out = rollout(
    graphdef,
    state,
    inputs,
    seed,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    num_samples=num_samples,
    pad_token_id=cfg.pad_token_id if pad_token_id is None else pad_token_id,
    mesh=mesh,
    rules=rules,
    decode_rows=decode_rows,
    compute_dtype=compute_dtype,
  )
  rows = B * num_samples  # prompt-major: the real prompts' rows come first
  return jax.tree.map(lambda x: np.asarray(x)[:rows] if np.ndim(x) else np.asarray(x), out)


def _on_mesh(state, mesh: Mesh) -> bool:
  leaves = jax.tree.leaves(state)
  return all(
    isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
    for x in leaves
  )


def _state_shardings(state, mesh: Mesh, rules: sharding.Rules):
  """Every parameter by its logical axes (the model holds only `nnx.Param`s)."""
  return sharding.param_shardings(state, mesh, rules)


def _resolve_mesh(
  mesh: Mesh | None, rules: sharding.Rules | None
) -> tuple[Mesh | None, sharding.Rules]:
  """Explicit arguments win; else the active `sharding.use_rules` context; rules default SAMPLE."""
  ctx = sharding.current_rules()
  if mesh is None and ctx is not None:
    mesh = ctx[0]
    rules = ctx[1] if rules is None else rules
  return mesh, sharding.SAMPLE_RULES if rules is None else rules
