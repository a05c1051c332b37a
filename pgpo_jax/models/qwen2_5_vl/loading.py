"""Building models: random init, abstract (shape-only) models, and loading HF checkpoints."""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpo_jax.models.qwen2_5_vl import weights
from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from pgpo_jax.models.qwen2_5_vl.model import Qwen25VL

Path = tuple[str, ...]


def init_model(cfg: Qwen25VLConfig, dtype="float32", seed: int = 0) -> Qwen25VL:
  """A randomly initialised model (normal(0.02) weights, unit norms, zero biases)."""
  return Qwen25VL(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))


def abstract_model(cfg: Qwen25VLConfig, dtype="float32") -> Qwen25VL:
  """The model with `jax.ShapeDtypeStruct` leaves: no memory, usable for 72B on a laptop."""
  return nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))


def flat_params(model_or_state) -> dict[Path, object]:
  """{('language_model', 'layers', 'wq'): array, ...} of every nnx.Param."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
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


def from_pretrained(path: str | os.PathLike, dtype="float32", *,
                    put: Callable[[Path, np.ndarray], object] | None = None,
                    config: Qwen25VLConfig | None = None) -> Qwen25VL:
  """Loads an HF Qwen2.5-VL folder (config.json + safetensors, sharded or not).

  Args:
    path: the folder.
    dtype: parameter and compute dtype ("float32" or "bfloat16").
    put: places each converted parameter (default: `jax.device_put` on the default device); pass
      a function that puts it into its `NamedSharding` to load straight into a mesh.
    config: overrides the config read from `config.json` (e.g. remat/scan settings).
  """
  path = os.fspath(path)
  cfg = config or Qwen25VLConfig.from_json(path)
  abstract = abstract_model(cfg, dtype)
  shapes = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat_params(abstract).items()}
  put = put or (lambda p, a: jax.device_put(a))
  try:
    params = weights.load_hf_params(weights.iter_safetensors(path), cfg, shapes, put)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return model_from_flat(abstract, params)
