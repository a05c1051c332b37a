"""Building models: random init, abstract (shape-only) models, and loading checkpoints.

Two on-disk layouts load with `from_pretrained`:
- an HF folder: `config.json` + `model.safetensors` (or shards + `model.safetensors.index.json`);
- our Orbax layout (written by `scripts/convert_hf.py` and by the trainer):

      CKPT/config.json            the HF config (plus tokenizer/processor files, copied as is)
      CKPT/params/                Orbax StandardCheckpointer item: a nested dict of arrays, keys =
                                  our parameter paths, i.e. `nnx.to_pure_dict(nnx.state(model, nnx.Param))`

  The trainer writes `WORKDIR/config.json` once and `WORKDIR/checkpoints/<step>/params` per
  checkpoint; `from_pretrained(WORKDIR/checkpoints/<step>/params)` finds the config two levels
  above `<step>` (see `find_config`). A params tree saved from an `nnx.State` (leaves wrapped in
  `{'value': ...}`) is accepted too.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pgpo_jax.models.qwen2_5_vl import weights
from pgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from pgpo_jax.models.qwen2_5_vl.model import Qwen25VL

Path = tuple[str, ...]


def _param_dtype(dtype, param_dtype):
  return jnp.dtype(dtype if param_dtype is None or param_dtype == "" else param_dtype)


def init_model(cfg: Qwen25VLConfig, dtype="float32", seed: int = 0, *, param_dtype=None) -> Qwen25VL:
  """A randomly initialised model (normal(0.02) weights, unit norms, zero biases).

  `dtype` is the compute dtype, `param_dtype` the parameters' (default `dtype`; see `Qwen25VL`)."""
  return Qwen25VL(cfg, dtype=jnp.dtype(dtype), param_dtype=_param_dtype(dtype, param_dtype), rngs=nnx.Rngs(seed))


def abstract_model(cfg: Qwen25VLConfig, dtype="float32", *, param_dtype=None) -> Qwen25VL:
  """The model with `jax.ShapeDtypeStruct` leaves: no memory, usable for 72B on a laptop."""
  pdt = _param_dtype(dtype, param_dtype)
  return nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=jnp.dtype(dtype), param_dtype=pdt, rngs=nnx.Rngs(0)))


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


PARAMS_ITEM = "params"  # the Orbax item directory of the parameters
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def is_orbax_params_dir(path: str | os.PathLike) -> bool:
  """True if `path` is an Orbax checkpoint item directory (a finished save)."""
  path = os.fspath(path)
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS)


def checkpoint_layout(path: str | os.PathLike) -> tuple[str, str]:
  """("hf", folder) | ("orbax", params_dir) for a checkpoint path, or FileNotFoundError."""
  path = os.fspath(path)
  if os.path.isdir(path):
    if (os.path.exists(os.path.join(path, "model.safetensors"))
        or os.path.exists(os.path.join(path, "model.safetensors.index.json"))):
      return "hf", path
    if is_orbax_params_dir(os.path.join(path, PARAMS_ITEM)):
      return "orbax", os.path.join(path, PARAMS_ITEM)
    if is_orbax_params_dir(path):
      return "orbax", path
  raise FileNotFoundError(
      f"{path}: not a Qwen2.5-VL checkpoint: expected an HF folder (model.safetensors or "
      f"model.safetensors.index.json), a converted folder with an Orbax '{PARAMS_ITEM}/' item, "
      f"or an Orbax params item directory")


def find_config(path: str | os.PathLike) -> str:
  """The `config.json` that belongs to a checkpoint path.

  Looked up in order: `path/`, its parent (`CKPT/params` -> `CKPT/config.json`), two levels up
  (trainer step folder `WORKDIR/checkpoints/<step>` -> `WORKDIR/config.json`) and three levels up
  (trainer layout `WORKDIR/checkpoints/<step>/params` -> `WORKDIR/config.json`).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path):
    return path
  up1 = os.path.dirname(path)
  up2 = os.path.dirname(up1)
  candidates = [path, up1, up2, os.path.dirname(up2)]
  for c in candidates:
    f = os.path.join(c, "config.json")
    if os.path.isfile(f):
      return f
  raise FileNotFoundError(f"no config.json for {path}: looked in {candidates}; pass the config explicitly")


def _walk_tree(tree, prefix=()):
  """(key path, leaf) of a nested dict (Orbax metadata or restored values)."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _walk_tree(v, prefix + (str(k),))
  else:
    yield prefix, tree


def _ours(stored: Path) -> Path:
  return stored[:-1] if stored and stored[-1] == "value" else stored


def _nest(items: Mapping[Path, object]) -> dict:
  out: dict = {}
  for path, v in items.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def orbax_param_metadata(params_dir: str | os.PathLike) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{stored key path: (shape, dtype)} of an Orbax params item, read from its metadata only."""
  import orbax.checkpoint as ocp
  meta = ocp.PyTreeCheckpointer().metadata(os.fspath(params_dir))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if isinstance(tree, Mapping) and "train" in tree and "rng" in tree:
    # The trainer's `state` item (parameters + optimizer state + RNG); its sibling holds the parameters.
    sibling = os.path.join(os.path.dirname(os.path.abspath(os.fspath(params_dir))), PARAMS_ITEM)
    raise ValueError(f"{params_dir} is a trainer checkpoint's 'state' item (parameters with the optimizer "
                     f"state); use the parameters item next to it, {sibling}, or the step folder above it")
  out = {}
  for p, m in _walk_tree(tree):
    if not hasattr(m, "shape"):
      raise ValueError(f"{params_dir}: not a parameters checkpoint: {'/'.join(p) or '<root>'} is a "
                       f"{type(m).__name__}, not an array; expected an Orbax item of parameter arrays "
                       f"(CKPT/{PARAMS_ITEM} or WORKDIR/checkpoints/<step>/{PARAMS_ITEM})")
    out[p] = (tuple(m.shape), np.dtype(m.dtype))
  return out


def check_orbax_params(params_dir: str, shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]]
                       ) -> dict[Path, Path]:
  """Compares stored params with the expected shapes; returns {our path: stored path}.

  Raises a ValueError listing missing, unexpected and mis-shaped parameters.
  """
  stored = orbax_param_metadata(params_dir)
  by_ours = {_ours(p): p for p in stored}
  missing = ["/".join(p) for p in shapes if p not in by_ours]
  unexpected = ["/".join(p) for p in by_ours if p not in shapes]
  misshaped = [f"{'/'.join(p)}: got {stored[by_ours[p]][0]}, expected {shapes[p][0]}"
               for p in shapes if p in by_ours and tuple(stored[by_ours[p]][0]) != tuple(shapes[p][0])]
  if missing or unexpected or misshaped:
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        more = " …" if len(items) > 20 else ""
        lines.append(f"{len(items)} {label} parameter(s): " + ", ".join(items[:20]) + more)
    raise ValueError(f"{params_dir}: Orbax params do not match the Qwen2.5-VL config:\n  " + "\n  ".join(lines))
  return {p: by_ours[p] for p in shapes}


def restore_orbax_params(params_dir: str | os.PathLike, shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
                         *, shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
                         as_numpy: bool = False, paths: list[Path] | None = None) -> dict[Path, object]:
  """Restores (a subset of) an Orbax params item, cast to the dtypes of `shapes`.

  Args:
    params_dir: the Orbax item directory (`CKPT/params`).
    shapes: {our path: (shape, dtype)} of every parameter the model expects (checked first).
    shardings: {our path: Sharding}; each array is restored straight into its sharding (every
      host reads only its shards). Default: the first local device.
    as_numpy: restore host numpy arrays instead (used by the streaming HF export).
    paths: restore only these parameters (Orbax partial restore); default all.
  Returns:
    {our path: jax.Array or np.ndarray}.
  """
  import orbax.checkpoint as ocp
  params_dir = os.path.abspath(os.fspath(params_dir))
  stored_of = check_orbax_params(params_dir, shapes)
  wanted = list(shapes) if paths is None else list(paths)
  target, restore_args = {}, {}
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for p in wanted:
    shape, dtype = shapes[p]
    sp = stored_of[p]
    if as_numpy:
      target[sp] = np.zeros((0,), dtype)  # structure only
      restore_args[sp] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    else:
      sharding = (shardings or {}).get(p, default)
      target[sp] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
      restore_args[sp] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)
  args = ocp.args.PyTreeRestore(item=_nest(target), restore_args=_nest(restore_args),
                                partial_restore=paths is not None)
  restored = ocp.PyTreeCheckpointer().restore(params_dir, args=args)
  flat = {_ours(p): v for p, v in _walk_tree(restored)}
  return {p: flat[p] for p in wanted}


def save_orbax_params(params_dir: str | os.PathLike, params: Mapping[Path, object]) -> None:
  """Writes {our path: array} as an Orbax StandardCheckpointer item (a nested dict). Blocks.

  Orbax stages arrays on the host before writing; its default budget (96 GB) stages a whole 7B
  model a second time during a conversion, so the budget is the largest parameter (min 1 GB).
  """
  import math
  import orbax.checkpoint as ocp
  params_dir = os.path.abspath(os.fspath(params_dir))
  largest = max((int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values()), default=0)
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, math.ceil(largest / 1e9)))
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(params_dir, args=ocp.args.StandardSave(_nest(params)))


def sharded_put(shardings: Mapping[Path, jax.sharding.Sharding]) -> Callable[[Path, np.ndarray], jax.Array]:
  """A `put` for `load_hf_params` that writes each host array straight into its sharding.

  `jax.make_array_from_callback` copies to each addressable device only its own slice, so no
  device ever holds a full replicated copy (and it is multi-host safe: each host fills its
  devices from the same file).
  """
  def put(path: Path, a: np.ndarray) -> jax.Array:
    sharding = shardings[path]
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  return put


def from_pretrained(path: str | os.PathLike, dtype="float32", *, param_dtype=None,
                    put: Callable[[Path, np.ndarray], object] | None = None,
                    config: Qwen25VLConfig | None = None,
                    shardings: Mapping[Path, jax.sharding.Sharding] | None = None) -> Qwen25VL:
  """Loads a Qwen2.5-VL checkpoint: an HF folder or our Orbax layout (see the module docstring).

  Args:
    path: HF folder; converted folder `CKPT` (with `CKPT/params`); or an Orbax params item.
    dtype: compute dtype ("float32" or "bfloat16"): matmul inputs, activations, KV cache.
    param_dtype: the parameters' dtype (default `dtype`); stored weights are cast to it. Training
      uses `dtype="bfloat16", param_dtype="float32"`: float32 master weights (an AdamW step at lr
      1e-6 is far below bfloat16's resolution) cast to bfloat16 where each layer uses them.
    put: HF only: places each converted parameter (default: `jax.device_put` on the default
      device). Ignored when `shardings` is given.
    config: overrides the config read from `config.json` (e.g. remat/scan settings).
    shardings: {param path: Sharding} (e.g. `sharding.flat_shardings(param_shardings(...))`):
      every parameter is written straight into its sharding, from either layout.
  """
  path = os.fspath(path)
  layout, where = checkpoint_layout(path)
  cfg = config or Qwen25VLConfig.from_json(find_config(path))
  abstract = abstract_model(cfg, dtype, param_dtype=param_dtype)
  shapes = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat_params(abstract).items()}
  if layout == "orbax":
    if put is not None and shardings is None:
      host = restore_orbax_params(where, shapes, as_numpy=True)
      params = {p: put(p, a) for p, a in host.items()}
    else:
      params = restore_orbax_params(where, shapes, shardings=shardings)
    return model_from_flat(abstract, params)
  if shardings is not None:
    put = sharded_put(shardings)
  put = put or (lambda p, a: jax.device_put(a))
  try:
    params = weights.load_hf_params(weights.iter_safetensors(where), cfg, shapes, put)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return model_from_flat(abstract, params)
