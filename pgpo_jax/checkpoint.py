"""Every Orbax call lives here: training checkpoints, and parameter items (conversion, loading).

A training checkpoint at `WORKDIR/checkpoints/<step>/` has four items:
- `state`:  the `TrainState` pytree (params, optimizer state, step, skip counter) + the RNG key;
- `params`: the policy parameters alone (what `scripts/convert_hf.py --to_hf` exports);
- `data`:   the data iterator state and host-loop counters (JSON);
- `config`: the run's config (JSON), for provenance.
Saves are asynchronous (training continues while the arrays are written), keep the last K, and
restore straight into the shardings of a provided abstract state.

Resume (`Checkpointer.restore_latest`) verifies what it restores: every array of `state` and of
`params` is read back completely (a truncated or corrupt file fails the read), and `data` must parse.
A step that does not read back is named in a warning and the next older step is tried. Once an older
step reads back, the newer ones are damaged: they are moved aside to `<step>.damaged` (kept for
inspection; Orbax no longer sees them, so those steps are saved afresh). When no step reads back,
nothing is moved (a changed config fails the same way) and `CheckpointError` names the steps and
says what to do.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import types
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _any_host(flag: bool) -> bool:
  """True on every host if `flag` is True on any host (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag), tiled=False)).max())


def _barrier(name: str) -> None:
  """All processes wait here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored; the message names the steps and what to do."""


def _short_error(e: BaseException) -> str:
  """One line for a failed restore: the first line of the error, the array it names, and its root cause.

  TensorStore errors carry a ~100-line JSON spec; the array key (`'path': 'train.params...value/'`)
  and the root cause (e.g. `OUT_OF_RANGE: Error reading ... Requested byte range ... is not valid`)
  are the useful parts.
  """

  def first_line(x: BaseException) -> str:
    text = str(x).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(x).__name__}: {line.split(' See full TensorStore details')[0][:300]}"

  msg = first_line(e)
  arrays = [
    p.rstrip("/") for p in re.findall(r"'path': '([^']*)'", str(e)) if not p.startswith("/")
  ]
  if arrays:
    msg += f" (array {arrays[-1]})"
  root, seen = e, {id(e)}
  while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
    root = nxt
    seen.add(id(root))
  if root is not e:
    msg += f"; cause: {first_line(root)}"
  return msg


def _collect_failed_reads() -> None:
  """Finalises the sibling read coroutines of a failed Orbax restore now, quietly.

  Each would otherwise print the same read error again, with its TensorStore spec, as "Exception
  ignored in <coroutine>" whenever the garbage collector reaches it; the caller reports it in one line.
  Best effort: a coroutine still pending in Orbax's event loop is finalised (and printed) later.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if isinstance(u.object, types.CoroutineType) else previous(u)
  try:
    gc.collect()
  finally:
    sys.unraisablehook = previous


def _is_abandoned_read(u: Any) -> bool:
  """A TensorStore read that a failed Orbax restore stopped awaiting, completing later: its callback
  finds Orbax's event loop closed and reports `RuntimeError('Event loop is closed')` as unraisable,
  with no object (one traceback per array still in flight: ~160 for a damaged checkpoint of the
  demo model)."""
  return (
    u.object is None
    and isinstance(u.exc_value, RuntimeError)
    and str(u.exc_value) == "Event loop is closed"
  )


def _drop_abandoned_reads() -> None:
  """Installs, once and for the rest of the process, a `sys.unraisablehook` that drops the reports of
  `_is_abandoned_read` (they arrive from TensorStore's threads at any time after the failure, even
  after `CheckpointError` was raised) and passes everything else to the hook it replaces."""
  previous = sys.unraisablehook
  if getattr(previous, "_pgpo_drops_abandoned_reads", False):
    return

  def hook(u):
    if not _is_abandoned_read(u):
      previous(u)

  hook._pgpo_drops_abandoned_reads = True
  sys.unraisablehook = hook


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

  def __init__(
    self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True
  ):
    self.directory = os.path.abspath(os.fspath(directory))
    os.makedirs(self.directory, exist_ok=True)
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    self._mngr = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "params", "data", "config")
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.save_every == 0

  def save(
    self, step: int, state: Any, params: Any, data: dict, config: dict, *, force: bool = False
  ) -> bool:
    """Starts an async save of `step` (if due or forced). Returns whether a save was started."""
    if not force and not self.should_save(step):
      return False
    if step in self._mngr.all_steps():
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      params=ocp.args.StandardSave(params),
      data=ocp.args.JsonSave(data),
      config=ocp.args.JsonSave(config),
    )
    self._mngr.save(step, args=args, force=True)
    log.info("checkpoint: saving step %d to %s", step, self.directory)
    return True

  def restore(self, step: int, state_like: Any) -> tuple[Any, dict]:
    """Restores (state, data) of `step` into the structure/shardings of `state_like`."""
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state_like)), data=ocp.args.JsonRestore()
    )
    out = self._mngr.restore(step, args=args)
    return out.state, dict(out.data)

  def verify_params(self, step: int, params_like: Any) -> None:
    """Reads every array of the `params` item of `step` (into `params_like`'s shardings) and drops it.

    Resume never needs this item (the state holds the parameters), so without this check a damaged
    `params` would only surface when the checkpoint is exported or evaluated.
    """
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like)))
    restored = self._mngr.restore(step, args=args).params
    jax.block_until_ready(restored)
    del restored

  def restore_latest(
    self, state_like: Any, params_like: Any = None
  ) -> tuple[int, Any, dict] | None:
    """(step, state, data) of the newest checkpoint that reads back completely; None if there is none.

    Args:
      state_like: the structure/shardings to restore `state` into (the restore reads every array).
      params_like: the structure/shardings of the `params` item; given, that item is read completely
        too (and dropped), so a damaged export copy is caught at resume rather than at export.
    Steps that do not read back are skipped with a warning (module docstring). A collective: every
    host calls it; a step that fails on any host fails on all, so every host resumes the same step.
    Raises:
      CheckpointError: checkpoints exist but none reads back.
    """
    damaged: list[tuple[int, str]] = []
    _drop_abandoned_reads()  # a damaged step fails one read while the others are in flight
    for step in sorted(self.all_steps(), reverse=True):
      error = ""
      try:
        if (
          params_like is not None
        ):  # first: its copy is freed before the state arrives (same peak memory)
          self.verify_params(step, params_like)
        state, data = self.restore(step, state_like)
      except Exception as e:  # Orbax/TensorStore raise plain Exception, ValueError, OSError, ...
        state, data, error = None, None, _short_error(e)
      if error:
        _collect_failed_reads()
      if _any_host(bool(error)):
        error = error or "the restore failed on another host"
        damaged.append((step, error))
        log.warning(
          "checkpoint %s/%d does not read back: %s. Trying the previous checkpoint.",
          self.directory,
          step,
          error,
        )
        continue
      # A good older step proves the run's structure matches: the newer failures are damage. Move them
      # aside so that this run saves those steps afresh and a later resume does not read them again.
      for bad, _ in damaged:
        where = self._set_aside(bad)
        log.warning("checkpoint %s/%d is damaged: moved to %s", self.directory, bad, where)
      if damaged:
        log.warning(
          "resumed from checkpoint step %d, the newest that reads back (damaged: %s)",
          step,
          ", ".join(f"step {s}" for s, _ in damaged),
        )
      return step, state, data
    if damaged:  # Nothing moved: a config that no longer matches fails the same way as damage.
      lines = "\n  ".join(f"step {s}: {err}" for s, err in damaged)
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored:\n  {lines}\n"
        f"If the run's config changed since they were saved (model size, optimizer, mesh), resume with the "
        f"original config or start in a new workdir. If the files are damaged (disk full, an interrupted "
        f"copy), move the damaged <step> folders out of {self.directory} (or start in a new workdir)."
      )
    return None

  def _set_aside(self, step: int) -> str:
    """Renames `<step>` to `<step>.damaged[.k]` (host 0; every host then re-lists the steps)."""
    src = os.path.join(self.directory, str(step))
    dst = src + DAMAGED_SUFFIX
    k = 1
    while os.path.exists(dst):
      dst, k = f"{src}{DAMAGED_SUFFIX}.{k}", k + 1
    _barrier(f"pgpo_ckpt_set_aside_{step}_named")  # every host named dst before it exists
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    _barrier(f"pgpo_ckpt_set_aside_{step}")
    self._mngr.reload()
    return dst

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
  """Turns SIGTERM (TPU preemption, `kill`) and SIGINT (Ctrl-C) into a flag the host loop checks
  between steps.

  The loop then saves a checkpoint and stops (the trainer's `Preempted`, exit status 75 in
  `scripts/train.py`); a second signal of the same kind gets the previous handler (Ctrl-C twice:
  KeyboardInterrupt at once).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self.received: str | None = None  # the name of the first signal received

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _restore(self, sig: int) -> None:
    previous = self._previous.get(sig)
    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    log.warning(
      "%s received: stopping after the current step (the run says what it saved); "
      "a second %s stops at once, saving nothing",
      name,
      name,
    )
    self.received = self.received or name
    self._flag.set()
    self._restore(signum)

  @property
  def triggered(self) -> bool:
    return self._flag.is_set()

  def __exit__(self, *exc):
    if self._previous and threading.current_thread() is threading.main_thread():
      for sig in self._previous:
        self._restore(sig)
      self._previous = {}
    return False


def to_jsonable(obj: Any) -> Any:
  """Config dicts → JSON-safe values (tuples to lists, numpy scalars to Python)."""
  return json.loads(
    json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
  )


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
    if os.path.exists(os.path.join(path, "model.safetensors")) or os.path.exists(
      os.path.join(path, "model.safetensors.index.json")
    ):
      return "hf", path
    if is_orbax_params_dir(os.path.join(path, PARAMS_ITEM)):
      return "orbax", os.path.join(path, PARAMS_ITEM)
    if is_orbax_params_dir(path):
      return "orbax", path
  raise FileNotFoundError(
    f"{path}: not a Qwen2.5-VL checkpoint: expected an HF folder (model.safetensors or "
    f"model.safetensors.index.json), a converted folder with an Orbax '{PARAMS_ITEM}/' item, "
    f"or an Orbax params item directory"
  )


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
  raise FileNotFoundError(
    f"no config.json for {path}: looked in {candidates}; pass the config explicitly"
  )


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


def orbax_param_metadata(
  params_dir: str | os.PathLike,
) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{stored key path: (shape, dtype)} of an Orbax params item, read from its metadata only."""
  meta = ocp.PyTreeCheckpointer().metadata(os.fspath(params_dir))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if isinstance(tree, Mapping) and "train" in tree and "rng" in tree:
    # The trainer's `state` item (parameters + optimizer state + RNG); its sibling holds the parameters.
    sibling = os.path.join(os.path.dirname(os.path.abspath(os.fspath(params_dir))), PARAMS_ITEM)
    raise ValueError(
      f"{params_dir} is a trainer checkpoint's 'state' item (parameters with the optimizer "
      f"state); use the parameters item next to it, {sibling}, or the step folder above it"
    )
  out = {}
  for p, m in _walk_tree(tree):
    if not hasattr(m, "shape"):
      raise ValueError(
        f"{params_dir}: not a parameters checkpoint: {'/'.join(p) or '<root>'} is a "
        f"{type(m).__name__}, not an array; expected an Orbax item of parameter arrays "
        f"(CKPT/{PARAMS_ITEM} or WORKDIR/checkpoints/<step>/{PARAMS_ITEM})"
      )
    out[p] = (tuple(m.shape), np.dtype(m.dtype))
  return out


def check_orbax_params(
  params_dir: str, shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]]
) -> dict[Path, Path]:
  """Compares stored params with the expected shapes; returns {our path: stored path}.

  Raises a ValueError listing missing, unexpected and mis-shaped parameters.
  """
  stored = orbax_param_metadata(params_dir)
  by_ours = {_ours(p): p for p in stored}
  missing = ["/".join(p) for p in shapes if p not in by_ours]
  unexpected = ["/".join(p) for p in by_ours if p not in shapes]
  misshaped = [
    f"{'/'.join(p)}: got {stored[by_ours[p]][0]}, expected {shapes[p][0]}"
    for p in shapes
    if p in by_ours and tuple(stored[by_ours[p]][0]) != tuple(shapes[p][0])
  ]
  if missing or unexpected or misshaped:
    lines = []
    for label, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if items:
        more = " …" if len(items) > 20 else ""
        lines.append(f"{len(items)} {label} parameter(s): " + ", ".join(items[:20]) + more)
    raise ValueError(
      f"{params_dir}: Orbax params do not match the Qwen2.5-VL config:\n  " + "\n  ".join(lines)
    )
  return {p: by_ours[p] for p in shapes}


def restore_orbax_params(
  params_dir: str | os.PathLike,
  shapes: Mapping[Path, tuple[tuple[int, ...], np.dtype]],
  *,
  shardings: Mapping[Path, jax.sharding.Sharding] | None = None,
  as_numpy: bool = False,
  paths: list[Path] | None = None,
) -> dict[Path, object]:
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
  args = ocp.args.PyTreeRestore(
    item=_nest(target), restore_args=_nest(restore_args), partial_restore=paths is not None
  )
  restored = ocp.PyTreeCheckpointer().restore(params_dir, args=args)
  flat = {_ours(p): v for p, v in _walk_tree(restored)}
  return {p: flat[p] for p in wanted}


def save_orbax_params(params_dir: str | os.PathLike, params: Mapping[Path, object]) -> None:
  """Writes {our path: array} as an Orbax StandardCheckpointer item (a nested dict). Blocks.

  Orbax stages arrays on the host before writing; its default budget (96 GB) stages a whole 7B
  model a second time during a conversion, so the budget is the largest parameter (min 1 GB).
  """
  params_dir = os.path.abspath(os.fspath(params_dir))
  largest = max(
    (int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values()), default=0
  )
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, math.ceil(largest / 1e9)))
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(params_dir, args=ocp.args.StandardSave(_nest(params)))
