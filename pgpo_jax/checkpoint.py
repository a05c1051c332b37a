"""Every Orbax call of the trainer lives here.

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
import os
import re
import signal
import sys
import threading
import types
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pgpo_jax import multihost

log = logging.getLogger(__name__)

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
  arrays = [p.rstrip("/") for p in re.findall(r"'path': '([^']*)'", str(e)) if not p.startswith("/")]
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

  def verify_params(self, step: int, params_like: Any) -> None:
    """Reads every array of the `params` item of `step` (into `params_like`'s shardings) and drops it.

    Resume never needs this item (the state holds the parameters), so without this check a damaged
    `params` would only surface when the checkpoint is exported or evaluated.
    """
    args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like)))
    restored = self._mngr.restore(step, args=args).params
    jax.block_until_ready(restored)
    del restored

  def restore_latest(self, state_like: Any, params_like: Any = None) -> tuple[int, Any, dict] | None:
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
    for step in sorted(self.all_steps(), reverse=True):
      error = ""
      try:
        if params_like is not None:  # first: its copy is freed before the state arrives (same peak memory)
          self.verify_params(step, params_like)
        state, data = self.restore(step, state_like)
      except Exception as e:  # Orbax/TensorStore raise plain Exception, ValueError, OSError, ...
        state, data, error = None, None, _short_error(e)
      if error:
        _collect_failed_reads()
      if int(multihost.max_over_hosts(np.int64(bool(error)))):
        error = error or "the restore failed on another host"
        damaged.append((step, error))
        log.warning("checkpoint %s/%d does not read back: %s. Trying the previous checkpoint.", self.directory,
                    step, error)
        continue
      # A good older step proves the run's structure matches: the newer failures are damage. Move them
      # aside so that this run saves those steps afresh and a later resume does not read them again.
      for bad, _ in damaged:
        where = self._set_aside(bad)
        log.warning("checkpoint %s/%d is damaged: moved to %s", self.directory, bad, where)
      if damaged:
        log.warning("resumed from checkpoint step %d, the newest that reads back (damaged: %s)", step,
                    ", ".join(f"step {s}" for s, _ in damaged))
      return step, state, data
    if damaged:  # Nothing moved: a config that no longer matches fails the same way as damage.
      lines = "\n  ".join(f"step {s}: {err}" for s, err in damaged)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored:\n  {lines}\n"
          f"If the run's config changed since they were saved (model size, optimizer, mesh), resume with the "
          f"original config or start in a new workdir. If the files are damaged (disk full, an interrupted "
          f"copy), move the damaged <step> folders out of {self.directory} (or start in a new workdir).")
    return None

  def _set_aside(self, step: int) -> str:
    """Renames `<step>` to `<step>.damaged[.k]` (host 0; every host then re-lists the steps)."""
    src = os.path.join(self.directory, str(step))
    dst = src + DAMAGED_SUFFIX
    k = 1
    while os.path.exists(dst):
      dst, k = f"{src}{DAMAGED_SUFFIX}.{k}", k + 1
    multihost.barrier(f"pgpo_ckpt_set_aside_{step}_named")  # every host named dst before it exists
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    multihost.barrier(f"pgpo_ckpt_set_aside_{step}")
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
    log.warning("%s received: will checkpoint and stop after the current step", name)
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
  return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
