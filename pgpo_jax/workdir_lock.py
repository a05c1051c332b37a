"""One training run per workdir: an exclusive `flock` on a file in WORKDIR, held while the run lives.

Two `pgpo-train` commands on one workdir would both resume from the same checkpoint and append every
step to `metrics.jsonl` twice; the second one refuses instead (`WorkdirBusy`, naming the workdir and
the holder). The lock is the kernel's: it goes away with the process that holds it, however that
process ends (SIGKILL, OOM, a crash), so a killed run never blocks its restart. The file itself stays
(`WORKDIR/.train-process<i>.lock`, holding the holder's host, pid and start time for the message);
only the flock on it counts, never its content.

Multi-host: each process locks its own file, named by its process index. On a workdir that every host
shares (NFS), a second run collides on every file; on per-host local workdirs, each host's own lock
catches it; the processes of one run never collide with each other (two processes on one machine in
the tests share a workdir). The trainer agrees the outcome over hosts, so all processes refuse
together. A filesystem without flock support (some FUSE mounts) gives a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock; the message names the workdir and the holder."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(os.path.abspath(workdir), f".train-process{process_index}.lock")


class WorkdirLock:
  """An exclusive, non-blocking flock on `lock_path(workdir, process_index)`; `release()` (or the
  process ending) frees it. Raises `WorkdirBusy` when another open file holds it (another process,
  or another `WorkdirLock` of this process)."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = os.path.abspath(workdir)
    self.path = lock_path(self.workdir, process_index)
    os.makedirs(self.workdir, exist_ok=True)
    self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._read_holder()
      os.close(self._fd)
      self._fd = None
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        log.warning(
          "cannot lock %s (%s): this filesystem does not support flock; nothing stops a second "
          "run from using workdir %s at the same time",
          self.path,
          e,
          self.workdir,
        )
        return
      raise WorkdirBusy(
        f"workdir {self.workdir} is in use by another training run ({holder or 'holder unknown'}; "
        f"lock file {self.path}). Two runs on one workdir would resume from the same checkpoint and "
        "log every step twice: wait for that run to end (or stop it: it saves and exits on SIGTERM), "
        "or pass another --workdir."
      ) from None
    os.ftruncate(self._fd, 0)
    os.write(
      self._fd,
      f"host {socket.gethostname()} pid {os.getpid()} since "
      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
    )

  def _read_holder(self) -> str:
    try:
      with open(self.path) as f:
        return f.read(200).strip()
    except OSError:
      return ""

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    """Frees the lock (idempotent). The file stays: removing it could let a third process lock a new
    file while a second still waits on the old one."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)  # closing the only descriptor of the open file releases its flock

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()
