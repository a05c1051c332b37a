"""Every Orbax call lives here: training checkpoints, and parameter items (conversion, loading).

A training checkpoint at `WORKDIR/checkpoints/<step>/` has four items:
- `state`:  the `TrainState` pytree (params, optimizer state, step, skip counter) + the RNG key;
- `params`: the policy parameters alone (what `scripts/convert_hf.py --to_hf` exports);
- `data`:   the data iterator state and host-loop counters (JSON);
- `config`: the run's config (JSON), for provenance.
Saves are asynchronous (training continues while the arrays are written), keep the last K, and
restore straight into the shardings of a provided abstract state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _abstract(tree: Any) -> Any:
  """Restore targets: ShapeDtypeStructs with the shardings of jax Array leaves; numpy leaves as is."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return np.asarray(x)  # host values (same on every host) restore as numpy
  return jax.tree.map(one, tree)


class Checkpointer:
  """Async, keep-last-K checkpoints of a training run, with automatic resume."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    os.makedirs(self.directory, exist_ok=True)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "params", "data", "config"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, params: Any, data: dict, config: dict, *, force: bool = False) -> bool:
    """Starts an async save of `step` (if due or forced). Returns whether a save was started."""
    if not force and not self.should_save(step):
      return False
    if step in self._mngr.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), params=ocp.args.StandardSave(params),
                              data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config))
    self._mngr.save(step, args=args, force=True)
    log.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def restore(self, step: int, state_like: Any) -> tuple[Any, dict]:
    """Restores (state, data) of `step` into the structure/shardings of `state_like`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state_like)), data=ocp.args.JsonRestore())
    out = self._mngr.restore(step, args=args)
    return out.state, dict(out.data)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def save_params(path: str | os.PathLike, params: Any) -> None:
  """A standalone params checkpoint (used by conversion and by tests)."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(os.fspath(path)), params, force=True)


def restore_params(path: str | os.PathLike, params_like: Any) -> Any:
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.abspath(os.fspath(path)), _abstract(params_like))


class PreemptionGuard:
  """Turns SIGTERM (TPU preemption, `kill`) into a flag the host loop checks between steps.

  The loop then saves a checkpoint and exits cleanly; a second SIGTERM falls back to the default.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: will checkpoint and stop after the current step")
    self._flag.set()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous if callable(self._previous) else signal.SIG_DFL)

  @property
  def triggered(self) -> bool:
    return self._flag.is_set()

  def __exit__(self, *exc):
    if self._previous is not None and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._previous if callable(self._previous) else signal.SIG_DFL)
    return False


def to_jsonable(obj: Any) -> Any:
  """Config dicts → JSON-safe values (tuples to lists, numpy scalars to Python)."""
  return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ------------------------------------------------------------------------------------------------
# Parameter items and checkpoint layouts
# ------------------------------------------------------------------------------------------------
# The policy's parameters alone, as one Orbax item: `convert/hf.py` writes `CKPT/params`, the trainer
# writes `WORKDIR/checkpoints/<step>/params` (the `params` item of `Checkpointer.save`), and
# `qwen2_5_vl.from_pretrained` / the evaluator read either. The item holds a nested dict keyed by our
# parameter paths (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`); a tree saved from an `nnx.State`
# (leaves wrapped in `{'value': ...}`) reads too. Below, a parameter path is a tuple of strings.
Path = tuple[str, ...]

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

  Looked up in order: `path/`, its parent (`CKPT/params` -> `CKPT/config.json`) and three levels
  up (trainer layout `WORKDIR/checkpoints/<step>/params` -> `WORKDIR/config.json`).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path):
    return path
  candidates = [path, os.path.dirname(path), os.path.dirname(os.path.dirname(os.path.dirname(path)))]
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
  meta = ocp.PyTreeCheckpointer().metadata(os.fspath(params_dir))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _walk_tree(tree)}


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
  params_dir = os.path.abspath(os.fspath(params_dir))
  largest = max((int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values()), default=0)
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, math.ceil(largest / 1e9)))
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(params_dir, args=ocp.args.StandardSave(_nest(params)))
