"""One run per workdir: the second run refuses at once, a dead run's lock is taken
over, a lock from another host is refused with advice, and exceptions release it."""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from procir_jax.train import workdir_lock

_REPO = str(pathlib.Path(__file__).parents[1])

# Takes the lock on argv[1] once argv[2] exists, holds it for argv[3] seconds, and
# reports as JSON on stdout.
_RUN = """
import json, os, sys, time
from procir_jax.train import workdir_lock
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
  time.sleep(0.001)
try:
  with workdir_lock.WorkdirLock(sys.argv[1], enabled=True):
    print(json.dumps({"got": True, "pid": os.getpid()}), flush=True)
    time.sleep(float(sys.argv[3]))
    released = time.time()
  print(json.dumps({"released": released}), flush=True)
except workdir_lock.WorkdirLockedError as e:
  print(json.dumps({"got": False, "pid": os.getpid(), "error": str(e),
                    "at": time.time()}), flush=True)
"""


def _start(workdir, go, hold):
  env = dict(os.environ, PYTHONPATH=_REPO)
  process = subprocess.Popen([sys.executable, "-c", _RUN, str(workdir), str(go),
                              str(hold)], env=env, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "ready"
  return process


def _reports(process):
  out, _ = process.communicate(timeout=60)
  assert process.returncode == 0, out
  return [json.loads(line) for line in out.splitlines()]


def test_of_two_runs_started_together_one_runs_and_one_refuses_at_once(tmp_path):
  go = tmp_path / "go"
  runs = [_start(tmp_path / "work", go, hold=2) for _ in range(2)]
  go.touch()
  reports = [_reports(p) for p in runs]
  holders = [r for r in reports if r[0]["got"]]
  refused = [r[0] for r in reports if not r[0]["got"]]
  assert len(holders) == 1 and len(refused) == 1
  holder, refusal = holders[0], refused[0]
  message = refusal["error"]
  assert f"PID {holder[0]['pid']} on host {socket.gethostname()}" in message
  assert str(tmp_path / "work" / ".procir.lock") in message
  assert "another --workdir" in message
  assert refusal["at"] < holder[1]["released"]  # refused while held: no waiting
  # Released cleanly: empty, and free for the next run.
  assert (tmp_path / "work" / ".procir.lock").read_text() == ""
  with workdir_lock.WorkdirLock(tmp_path / "work", enabled=True):
    pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  go = tmp_path / "go"
  go.touch()
  run = _start(tmp_path, go, hold=60)
  pid = json.loads(run.stdout.readline())["pid"]
  run.send_signal(signal.SIGKILL)  # no clean-up: its details stay in the file
  run.wait(timeout=60)
  assert json.loads((tmp_path / ".procir.lock").read_text())["pid"] == pid
  with caplog.at_level("WARNING"):
    with workdir_lock.WorkdirLock(tmp_path, enabled=True):
      owner = json.loads((tmp_path / ".procir.lock").read_text())
      assert owner["pid"] == os.getpid()
  assert any(f"PID {pid}" in r.getMessage() and "Taking over" in r.getMessage()
             for r in caplog.records)


def _leave_details(workdir, **details):
  workdir.mkdir(exist_ok=True)
  owner = dict(host=socket.gethostname(), pid=os.getpid(), started="earlier",
               command="python -m procir_jax.main")
  owner.update(details)
  (workdir / ".procir.lock").write_text(json.dumps(owner))


def test_a_lock_from_another_host_is_refused_with_advice(tmp_path):
  _leave_details(tmp_path, host="tpu-worker-7", pid=4242)
  with pytest.raises(workdir_lock.WorkdirLockedError) as error:
    workdir_lock.WorkdirLock(tmp_path, enabled=True).acquire()
  message = str(error.value)
  assert "PID 4242 on host tpu-worker-7" in message
  assert f"delete {tmp_path / '.procir.lock'}" in message
  # Nothing overwritten.
  assert json.loads((tmp_path / ".procir.lock").read_text())["pid"] == 4242


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_without_flock_a_live_pid_holds_and_a_dead_one_does_not(tmp_path,
                                                                monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  _leave_details(tmp_path, pid=os.getppid())  # alive, on this host
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {os.getppid()} "):
    workdir_lock.WorkdirLock(tmp_path, enabled=True).acquire()
  _leave_details(tmp_path, pid=_dead_pid())
  with workdir_lock.WorkdirLock(tmp_path, enabled=True):
    assert json.loads((tmp_path / ".procir.lock").read_text())["pid"] == os.getpid()


def test_released_on_exception(tmp_path):
  with pytest.raises(KeyError):
    with workdir_lock.WorkdirLock(tmp_path, enabled=True):
      raise KeyError("boom")
  assert (tmp_path / ".procir.lock").read_text() == ""
  # flock conflicts between two open files even in one process: this would refuse
  # if the first were still open.
  with workdir_lock.WorkdirLock(tmp_path, enabled=True):
    pass


def test_nested_in_one_process_and_released_by_the_last(tmp_path):
  outer = workdir_lock.WorkdirLock(tmp_path, enabled=True)
  with outer:
    with workdir_lock.WorkdirLock(tmp_path, enabled=True):
      pass
    assert json.loads((tmp_path / ".procir.lock").read_text())["pid"] == os.getpid()
  assert (tmp_path / ".procir.lock").read_text() == ""


def test_remote_workdirs_and_other_processes_go_on_without_it(tmp_path, caplog):
  with caplog.at_level("WARNING"):
    with workdir_lock.WorkdirLock("gs://bucket/run", enabled=True):
      pass
  assert any("without the one-run-per-workdir lock" in r.getMessage()
             for r in caplog.records)
  with workdir_lock.WorkdirLock(tmp_path / "work", enabled=False):
    assert not (tmp_path / "work").exists()


_FORK = """
import os, sys, time
from procir_jax.train import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1], enabled=True)
lock.acquire()
child = os.fork()  # shares the locked open file, as forked loader workers do
if child == 0:
  os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # let the test read its parent's end
  time.sleep(60)
  os._exit(0)
print(child, flush=True)
os._exit(0)  # gone without releasing
"""


def test_a_lock_kept_by_a_child_of_a_dead_run_says_so(tmp_path):
  env = dict(os.environ, PYTHONPATH=_REPO)
  out = subprocess.run([sys.executable, "-c", _FORK, str(tmp_path)], env=env,
                       stdout=subprocess.PIPE, text=True, check=True, timeout=60)
  child = int(out.stdout)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError, match="That PID is gone"):
      workdir_lock.WorkdirLock(tmp_path, enabled=True).acquire()
  finally:
    os.kill(child, signal.SIGKILL)


def test_a_refusal_waits_for_a_new_holder_to_write_its_details(tmp_path):
  """A run refused just after another took the flock, before it wrote who it is,
  still names it: the refusal reads the file again for a moment."""
  path = tmp_path / workdir_lock.LOCK_NAME
  holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, json, os, socket, sys, time
fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(0.3)
details = {{"host": socket.gethostname(), "pid": os.getpid()}}
os.pwrite(fd, json.dumps(details).encode(), 0)
time.sleep(5)
"""], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"in use by PID {holder.pid} on host"):
      workdir_lock.WorkdirLock(tmp_path, enabled=True).acquire()
  finally:
    holder.kill()
    holder.wait()
