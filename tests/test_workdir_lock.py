"""One training run per workdir: a second run refuses, naming the workdir; a killed run's lock is gone."""

import os
import signal
import subprocess
import sys

import pytest

from pgpo_jax import trainer
from pgpo_jax.workdir_lock import WorkdirBusy, WorkdirLock, lock_path
from tests.tiny_run import ROOT, tiny_config

_HOLD = (
  "import sys; from pgpo_jax.workdir_lock import WorkdirLock; "
  "lock = WorkdirLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
)


def _holder(workdir) -> subprocess.Popen:
  """A process that locks `workdir` and holds it until its stdin closes (or it is killed)."""
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=ROOT),
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


def _config(data_dir):
  c = tiny_config(data_dir)
  c.reward.name = "pgpo_math"
  return c


def test_a_second_lock_is_refused_and_freed_on_release(tmp_path):
  first = WorkdirLock(str(tmp_path))
  with pytest.raises(WorkdirBusy, match=f"workdir {tmp_path} is in use.*pid {os.getpid()}"):
    WorkdirLock(str(tmp_path))
  other_process = WorkdirLock(str(tmp_path), process_index=1)  # a run's own hosts never collide
  first.release()
  first.release()  # idempotent
  with WorkdirLock(str(tmp_path)) as again:
    assert again.held
  other_process.release()


def test_a_killed_holder_does_not_block_a_restart(tmp_path):
  """The lock is the kernel's flock: SIGKILL (no cleanup at all) frees it; the file left behind,
  naming the dead process, does not count."""
  proc = _holder(tmp_path)
  try:
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid}"):
      WorkdirLock(str(tmp_path))
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert f"pid {proc.pid}" in open(lock_path(str(tmp_path))).read()  # stale content stays
  WorkdirLock(str(tmp_path)).release()


def test_train_refuses_a_workdir_in_use_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  proc = _holder(workdir)
  try:
    with pytest.raises(WorkdirBusy, match=f"workdir {workdir} is in use"):
      trainer.train(_config(tmp_path / "data"), str(workdir))
  finally:
    proc.stdin.close()
    proc.wait()
  assert sorted(os.listdir(workdir)) == [".train-process0.lock"]  # no metrics, no checkpoints
  assert not (tmp_path / "data").exists()  # refused before the demo data was made


def test_a_trainer_that_fails_to_build_frees_the_workdir(tmp_path):
  c = _config(tmp_path / "data")
  c.data.make_demo_data = False
  c.data.processor_dir = str(tmp_path / "no_such_processor")
  with pytest.raises(Exception, match="no_such_processor") as failed:
    trainer.Trainer(c, str(tmp_path / "run"))
  assert failed.traceback  # the failed Trainer is still referenced from here, and yet:
  WorkdirLock(str(tmp_path / "run")).release()


def test_the_train_command_refuses_with_a_message_naming_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  proc = _holder(workdir)
  try:
    out = subprocess.run(
      [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        f"--config={ROOT}/configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data.demo_dir={tmp_path / 'data'}",
      ],
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
    )
  finally:
    proc.stdin.close()
    proc.wait()
  assert out.returncode == 1, out.stderr[-3000:]
  assert f"pgpo-train: error: workdir {workdir} is in use" in out.stderr
  assert f"pid {proc.pid}" in out.stderr and "Traceback" not in out.stderr
