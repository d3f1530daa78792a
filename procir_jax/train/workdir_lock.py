"""One run per workdir: a lock file that a second run finds and refuses on.

Two runs writing one workdir destroy each other's checkpoints (each deletes the
other's steps past `max_to_keep`, both write the same step numbers). Process 0 holds
`<workdir>/.procir.lock` for the whole run:

  with workdir_lock.WorkdirLock(workdir):
    ...  # train

The lock is `fcntl.flock` on a file that stays (deleting a lock file races with a
run opening it), and the file holds the owner's host, PID and start time so that a
refusal can say who holds it. The kernel drops a flock when its process dies, so a
run killed with SIGKILL leaves no lock behind, only its (stale) details:

- lock held (flock busy): refuse at once, naming the holder.
- lock free, details of a process on this host: that process is gone (else its
  flock would be held); take over with a warning.
- lock free, details of another host: flock across hosts is only as good as the
  filesystem (NFS forwards it, gcsfuse and some cluster filesystems keep it per
  machine), so the holder may be alive: refuse, and say how to remove a stale lock.
- flock not supported by the filesystem: decide on the details alone (a PID on this
  host that is alive holds it), with a small race window that flock would close.
- not a local path (gs://...): nothing can be locked there; warn and go on.

A clean release empties the file, so details left in it always mean an unclean exit.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time

from absl import logging

LOCK_NAME = ".procir.lock"
# A holder writes its details just after it takes the flock: a refusal that finds
# the file still empty reads it again for up to this long, to name the holder.
HOLDER_DETAILS_WAIT_S = 1.0

# Locks this process holds, by path: taking one again nests instead of refusing
# ourselves (flock locks belong to an open file, not to a process).
_held: dict[str, "WorkdirLock"] = {}
_held_guard = threading.Lock()


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir (or may: a lock from another host)."""


class WorkdirLock:
  """The workdir's run lock; a context manager, or `acquire()` / `release()`.

  `enabled`: whether this process takes the lock. By default (None) JAX process 0
  takes it for the whole run and tells the others whether it could, so that every
  process of a refused run raises together instead of waiting on process 0 in a
  collective: construct and enter it on every process, after
  `jax.distributed.initialize`.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               name: str = LOCK_NAME):
    self._share = False  # whether to tell the other processes how it went
    if enabled is None:
      import jax  # only here: the lock itself needs no JAX
      enabled = jax.process_index() == 0
      self._share = jax.process_count() > 1
    self.workdir = str(workdir)
    self.path = os.path.join(self.workdir, name)
    self.enabled = enabled
    self._fd: int | None = None  # the open, flocked lock file, when this holds it
    self._depth = 0  # how many acquires (this one's and nested ones) are open
    self._outer: WorkdirLock | None = None  # the holder, when this one is nested

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLockedError at once (never waits)."""
    if not self._share:
      self._acquire()
      return
    from jax.experimental import multihost_utils
    import numpy as np
    error = None
    try:
      self._acquire()
    except Exception as e:  # pylint: disable=broad-except  (others must hear of it)
      error = e
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not taken:
      raise WorkdirLockedError(
          f"Process 0 could not take the lock of workdir {self.workdir}: its log "
          f"says who holds {self.path} and what to do.")

  def _acquire(self) -> None:
    if not self.enabled or self._fd is not None or self._outer is not None:
      return
    if "://" in self.workdir:
      logging.warning(
          "Workdir %s is not on a local filesystem, where a lock file cannot be "
          "locked: running without the one-run-per-workdir lock. Make sure no other "
          "run uses this workdir, or the checkpoints of both will be lost.",
          self.workdir)
      return
    os.makedirs(self.workdir, exist_ok=True)
    key = os.path.realpath(self.path)
    with _held_guard:
      outer = _held.get(key)
      if outer is not None:  # this process holds it already: nest
        outer._depth += 1  # pylint: disable=protected-access
        self._outer = outer
        return
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        self._lock(fd)
      except BaseException:
        os.close(fd)  # also drops the flock if it was taken
        raise
      self._fd, self._depth = fd, 1
      _held[key] = self

  def release(self) -> None:
    """Lets the lock go; does nothing when this object does not hold it."""
    with _held_guard:
      if self._outer is not None:
        outer, self._outer = self._outer, None
        holder = outer
      elif self._fd is not None:
        holder = self
      else:
        return
      holder._depth -= 1  # pylint: disable=protected-access
      if holder._depth > 0 or holder._fd is None:  # pylint: disable=protected-access
        return
      fd, holder._fd = holder._fd, None  # pylint: disable=protected-access
      _held.pop(os.path.realpath(holder.path), None)
    try:
      os.ftruncate(fd, 0)  # empty: released cleanly
    finally:
      os.close(fd)  # drops the flock

  def _lock(self, fd: int) -> None:
    flocked = True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(
          self._refusal(_holder_details(fd), running=True)) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
        raise
      flocked = False
      logging.warning("The filesystem of %s does not support flock (%s): deciding on "
                      "the owner details in the lock file alone.", self.path, e)
    previous = _read(fd)
    if previous:
      self._judge(previous, flocked)
    details = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": datetime.datetime.now().astimezone().isoformat(
                   timespec="seconds"),
               "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
    os.fsync(fd)

  def _judge(self, previous: dict, flocked: bool) -> None:
    """Decides over details left in a lock file that no flock guards."""
    host, pid = previous.get("host"), previous.get("pid")
    if host != socket.gethostname():
      raise WorkdirLockedError(self._refusal(previous, running=False))
    if not flocked and isinstance(pid, int) and _alive(pid):
      raise WorkdirLockedError(self._refusal(previous, running=True))
    # On this host flock is exact: a free lock means its holder is gone, even if
    # its PID has been reused since.
    logging.warning("Taking over the lock %s from a run that did not release it "
                    "(PID %s on this host, started %s, no longer holds it).",
                    self.path, pid, previous.get("started", "at an unknown time"))

  def _refusal(self, owner: dict, *, running: bool) -> str:
    who = (f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')} (started "
           f"{owner.get('started', '?')}; command: {owner.get('command', '?')})"
           if owner else "a process that has not written its details yet")
    if running:
      gone = (owner.get("host") == socket.gethostname() and
              isinstance(owner.get("pid"), int) and not _alive(owner["pid"]))
      advice = ("That PID is gone but a process it started (a data loader worker, "
                "say) still holds the lock: stop it, then rerun." if gone else
                "Two runs on one workdir destroy each other's checkpoints: wait for "
                "that run to end, stop it, or pass another --workdir.")
      return (f"Workdir {self.workdir} is in use by {who}; lock file {self.path}. "
              f"{advice}")
    return (f"Workdir {self.workdir} is locked by {who}, which cannot be checked from "
            f"host {socket.gethostname()}; lock file {self.path}. If no run uses this "
            f"workdir any more (that run died without releasing it), delete "
            f"{self.path} and rerun; otherwise wait for that run to end or pass "
            f"another --workdir.")


def _holder_details(fd: int) -> dict:
  """The details of the process that holds the flock, waiting up to
  HOLDER_DETAILS_WAIT_S for a holder that has just taken it to write them."""
  deadline = time.monotonic() + HOLDER_DETAILS_WAIT_S
  while True:
    details = _read(fd)
    if details or time.monotonic() >= deadline:
      return details
    time.sleep(0.02)


def _read(fd: int) -> dict:
  """The owner details in the lock file; {} when empty (released) or unreadable."""
  data = os.pread(fd, 4096, 0)
  try:
    details = json.loads(data.decode()) if data.strip() else {}
  except ValueError:  # half-written by a holder that has just taken it
    return {}
  return details if isinstance(details, dict) else {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: alive
    return True
  return True
