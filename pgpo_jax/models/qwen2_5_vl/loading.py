"""Building models: random init, abstract (shape-only) models, and loading checkpoints.

Two on-disk layouts load with `from_pretrained`:
- an HF folder: `config.json` + `model.safetensors` (or shards + `model.safetensors.index.json`),
  read through the one key table of `weights.py`;
- an Orbax parameter item (`CKPT/params` written by the converter, or a training checkpoint's
  `params` item) with the HF `config.json` it belongs to. Which folder is which, where its config
  is and every Orbax call are `pgpo_jax.checkpoint`'s business; this module only builds the model.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpo_jax import checkpoint
from pgpo_jax.models.qwen2_5_vl import weights
from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from pgpo_jax.models.qwen2_5_vl.model import Qwen25VL

Path = tuple[str, ...]


def _param_dtype(dtype, param_dtype):
  return jnp.dtype(dtype if param_dtype is None or param_dtype == "" else param_dtype)


def init_model(
  cfg: Qwen25VLConfig, dtype="float32", seed: int = 0, *, param_dtype=None
) -> Qwen25VL:
  """A randomly initialised model (normal(0.02) weights, unit norms, zero biases).

  `dtype` is the compute dtype, `param_dtype` the parameters' (default `dtype`; see `Qwen25VL`)."""
  return Qwen25VL(
    cfg, dtype=jnp.dtype(dtype), param_dtype=_param_dtype(dtype, param_dtype), rngs=nnx.Rngs(seed)
  )


def abstract_model(cfg: Qwen25VLConfig, dtype="float32", *, param_dtype=None) -> Qwen25VL:
  """The model with `jax.ShapeDtypeStruct` leaves: no memory, usable for 72B on a laptop."""
  pdt = _param_dtype(dtype, param_dtype)
  return nnx.eval_shape(
    lambda: Qwen25VL(cfg, dtype=jnp.dtype(dtype), param_dtype=pdt, rngs=nnx.Rngs(0))
  )


def flat_params(model_or_state) -> dict[Path, object]:
  """{('language_model', 'layers', 'wq'): array, ...} of every nnx.Param."""
  state = (
    model_or_state
    if isinstance(model_or_state, nnx.State)
    else nnx.state(model_or_state, nnx.Param)
  )
  pure = nnx.to_pure_dict(state)
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, prefix + (str(k),))
      else:
        out[prefix + (str(k),)] = v

  walk(pure, ())
  return out


def count_params(model: Qwen25VL) -> int:
  return int(sum(np.prod(v.shape) for v in flat_params(model).values()))


def model_from_flat(abstract: Qwen25VL, params: dict[Path, object]) -> Qwen25VL:
  """Merges concrete arrays into an abstract model's graph."""
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  for path, value in params.items():
    d = pure
    for k in path[:-1]:
      d = d[k]
    d[path[-1]] = value
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def sharded_put(
  shardings: Mapping[Path, jax.sharding.Sharding],
) -> Callable[[Path, np.ndarray], jax.Array]:
  """A `put` for `load_hf_params` that writes each host array straight into its sharding.

  `jax.make_array_from_callback` copies to each addressable device only its own slice, so no
  device ever holds a full replicated copy (and it is multi-host safe: each host fills its
  devices from the same file).
  """

  def put(path: Path, a: np.ndarray) -> jax.Array:
    sharding = shardings[path]
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return put


def from_pretrained(
  path: str | os.PathLike,
  dtype="float32",
  *,
  param_dtype=None,
  put: Callable[[Path, np.ndarray], object] | None = None,
  config: Qwen25VLConfig | None = None,
  shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
) -> Qwen25VL:
  """Loads a Qwen2.5-VL checkpoint: an HF folder or an Orbax parameter item (`checkpoint.checkpoint_layout`).

  Args:
    path: HF folder; converted folder `CKPT` (with `CKPT/params`); or an Orbax params item.
    dtype: compute dtype ("float32" or "bfloat16"): matmul inputs, activations, KV cache.
    param_dtype: the parameters' dtype (default `dtype`); stored weights are cast to it. Training
      uses `dtype="bfloat16", param_dtype="float32"`: float32 master weights (an AdamW step at lr
      1e-6 is far below bfloat16's resolution) cast to bfloat16 where each layer uses them.
    put: HF only: places each converted parameter (default: `jax.device_put` on the default
      device). Ignored when `shardings` is given.
    config: overrides the config read from `config.json` (e.g. remat/scan settings).
    shardings: {param path: Sharding} (e.g. `sharding.flat_shardings(sharding.param_shardings(...))`):
      every parameter is written straight into its sharding, from either layout.
  """
  path = os.fspath(path)
  layout, where = checkpoint.checkpoint_layout(path)
  cfg = config or Qwen25VLConfig.from_json(checkpoint.find_config(path))
  abstract = abstract_model(cfg, dtype, param_dtype=param_dtype)
  shapes = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat_params(abstract).items()}
  if layout == "orbax":
    if put is not None and shardings is None:
      host = checkpoint.restore_orbax_params(where, shapes, as_numpy=True)
      params = {p: put(p, a) for p, a in host.items()}
    else:
      params = checkpoint.restore_orbax_params(where, shapes, shardings=shardings)
    return model_from_flat(abstract, params)
  if shardings is not None:
    put = sharded_put(shardings)
  put = put or (lambda p, a: jax.device_put(a))
  try:
    params = weights.load_hf_params(weights.iter_safetensors(where), cfg, shapes, put)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return model_from_flat(abstract, params)
