"""Every Orbax call of the trainer lives here.

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
import os
import signal
import threading
from typing import Any

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
