"""Checkpoint verification at resume: damaged steps are named, skipped and set aside (pgpo_jax/checkpoint.py)."""

import logging
import os

import jax
import numpy as np
import pytest

from pgpo_jax import checkpoint as ckpt_lib

# A failed read leaves Orbax's sibling read coroutines to be finalised with the error; restore_latest
# collects them quietly, but one still pending in Orbax's event loop may be finalised later.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(seed):
  rng = np.random.default_rng(seed)  # random floats: incompressible, so the array files are large
  return {
    "w": jax.numpy.asarray(rng.standard_normal((64, 64), np.float32)),
    "b": jax.numpy.asarray(rng.standard_normal((64,), np.float32)),
  }


def _save_steps(directory, steps):
  c = ckpt_lib.Checkpointer(directory, save_every=1, keep=5, async_save=False)
  for s in steps:
    state = {"train": _tree(s), "rng": np.arange(2, dtype=np.uint32)}
    c.save(s, state, _tree(100 + s), {"step": s}, {"name": "t"})
  c.close()


def truncate_largest(item_dir, size=64):
  """Cuts the largest file under a checkpoint item folder (an interrupted copy, a full disk)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(size)
  return victim


def _like():
  return {"train": _tree(0), "rng": np.zeros(2, np.uint32)}, _tree(0)


@pytest.mark.parametrize("item", ["state", "params"])
def test_damaged_newest_falls_back_and_is_set_aside(tmp_path, caplog, item):
  _save_steps(tmp_path, [1, 2])
  truncate_largest(tmp_path / "2" / item)
  c = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
  state_like, params_like = _like()
  with caplog.at_level(logging.WARNING, logger="pgpo_jax.checkpoint"):
    step, state, data = c.restore_latest(state_like, params_like)
  assert step == 1 and data["step"] == 1
  np.testing.assert_array_equal(state["train"]["w"], _tree(1)["w"])
  text = caplog.text
  assert f"{tmp_path}/2 does not read back" in text and f"moved to {tmp_path}/2.damaged" in text
  assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"]
  assert c.all_steps() == [1]
  # The step can be saved afresh (it was not left in Orbax's list of steps).
  assert c.save(
    2, {"train": _tree(2), "rng": np.arange(2, dtype=np.uint32)}, _tree(102), {"step": 2}, {}
  )
  c.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.damaged"]


def test_params_item_is_only_checked_when_asked(tmp_path):
  _save_steps(tmp_path, [1, 2])
  truncate_largest(tmp_path / "2" / "params")
  c = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
  step, _, _ = c.restore_latest(_like()[0])  # state only: the damaged params go unnoticed
  assert step == 2
  c.close()


def test_nothing_readable_raises_naming_steps_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for s in (1, 2):
    truncate_largest(tmp_path / str(s) / "state")
  c = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    c.restore_latest(*_like())
  c.close()
  msg = str(e.value)
  assert "step 2:" in msg and "step 1:" in msg and str(tmp_path) in msg and "new workdir" in msg
  assert "train.w" in msg or "train" in msg  # the array that failed to read
  assert len(msg.splitlines()) < 10  # not a TensorStore spec dump
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_no_checkpoint_is_none(tmp_path):
  c = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
  assert c.restore_latest(*_like()) is None
  c.close()
