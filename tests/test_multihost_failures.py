"""Two real processes (4 CPU devices each) running `procir_jax.main`, one of them
preempted or killed: what the README promises under "What a run does when things go
wrong".

- A SIGTERM to one process only stops both at the same step (JAX's preemption
  service), both save that step's checkpoint together and exit 75, and rerunning both
  resumes from it.
- A process killed with SIGKILL stops the other within
  `config.distributed.heartbeat_timeout_s` (JAX's coordination service aborts it,
  naming the lost process) instead of leaving it in a collective forever, and
  rerunning both resumes from the last complete checkpoint.

Each run is the real command line (SFT stage of the tiny test model, one length
bucket so that a single step program compiles); the processes share the test
session's compilation cache, so later runs load the step program instead of
compiling it again. Each test takes about 1 to 1.5 minutes on 2 busy CPU cores.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

from procir_jax.train import checkpoint as ckpt_lib

_REPO = pathlib.Path(__file__).parents[1]
_HEARTBEAT_S = 5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  # Each process has 4 CPU devices of its own (8 in all), not conftest's 8.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  cache = jax.config.jax_compilation_cache_dir  # conftest's, for the whole session
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  return env


class _Run:
  """Both processes of one run of the same command, their output read as it comes;
  `on_line(i, line)` sees every line of process i."""

  def __init__(self, workdir, data_dir, model_dir, *, steps, on_line=None, **config):
    port = _free_port()
    overrides = dict(
        mode="sft", **{"model.hf_dir": model_dir, "data.data_dir": data_dir,
                       "data.global_batch_size": 8, "data.max_views": 2,
                       "data.lengths": "(192,)", "sft.steps": steps,
                       "train.log_every": 1,
                       "distributed.coordinator_address": f"127.0.0.1:{port}",
                       "distributed.num_processes": 2}, **config)
    self.lines: list[list[str]] = [[], []]
    self.ended: list[float | None] = [None, None]
    self._on_line = on_line
    self.procs = []
    for i in range(2):
      cmd = [sys.executable, "-m", "procir_jax.main", "--config=configs/base.py",
             f"--workdir={workdir}", f"--config.distributed.process_id={i}"]
      cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
      # No core file from the survivor of a dead peer (JAX aborts it); exec keeps the
      # PID, so signals reach Python.
      cmd = ["/bin/sh", "-c", 'ulimit -c 0; exec "$@"', "sh", *cmd]
      self.procs.append(subprocess.Popen(
          cmd, cwd=_REPO, env=_env(), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True))
    self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True)
                     for i in range(2)]
    for t in self._readers:
      t.start()

  def _read(self, i):
    for line in self.procs[i].stdout:
      self.lines[i].append(line)
      if self._on_line:
        self._on_line(i, line)
    self.procs[i].wait()
    self.ended[i] = time.monotonic()

  def output(self, i) -> str:
    return "".join(line for line in self.lines[i] if "[Gloo]" not in line)

  def wait(self, timeout=300) -> list[int]:
    deadline = time.monotonic() + timeout
    for t in self._readers:
      t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in self._readers):
      for p in self.procs:
        p.kill()
      for t in self._readers:
        t.join()
      raise AssertionError(f"not done after {timeout} s:\n" + self.tails())
    return [p.returncode for p in self.procs]

  def tails(self) -> str:
    return "\n".join(f"--- process {i} (status {p.returncode}):\n"
                     f"{self.output(i)[-4000:]}" for i, p in enumerate(self.procs))


def _stop_process_at(run_holder, step, sig, ready=lambda: True):
  """on_line: sends `sig` to process 1 at the first step it logs from `step` on at
  which `ready()` holds."""
  sent = {}

  def on_line(i, line):
    logged = re.search(r"\bstep (\d+)/\d+ \|", line)
    if (i == 1 and not sent and logged and int(logged[1]) >= step and ready()):
      sent["at"] = time.monotonic()
      os.kill(run_holder[0].procs[1].pid, sig)
  return on_line, sent


def _checkpoints(workdir) -> list[int]:
  checkpointer = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints" /
                                           "sft"))
  try:
    return sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()


def _step_dirs(workdir) -> list[int]:
  """Steps whose checkpoint directory is in place (the save has been committed)."""
  root = pathlib.Path(workdir) / "checkpoints" / "sft"
  return [int(p.name) for p in root.glob("*") if p.name.isdigit()]


def _complete(workdir, step) -> list[str]:
  """The files a resume of `step` by both processes needs that are missing."""
  root = pathlib.Path(workdir) / "checkpoints" / "sft" / str(step)
  needed = [root / "state" / "_METADATA", root / "config",
            *(root / "data" / f"process_{i}-of-2.json" for i in range(2))]
  return [str(p) for p in needed if not p.exists()]


def test_preemption_then_a_dead_process(tmp_path, fashionmv_data_dir):
  """One two-process run through two lives (each start of `main` costs tens of
  seconds, so they share a test): a SIGTERM to one process stops both at the same
  step with status 75; the rerun resumes there, and when one process is killed the
  other stops within the heartbeat timeout, naming it, with the newest checkpoint
  complete."""
  from procir_jax import tiny_model
  model_dir = tiny_model.write_model_dir(tmp_path / "model", "test")
  workdir, steps = tmp_path / "work", 16

  # 1. SIGTERM to process 1 only.
  holder = []
  on_line, sent = _stop_process_at(holder, 3, signal.SIGTERM)
  holder.append(_Run(workdir, fashionmv_data_dir, model_dir, steps=steps,
                     on_line=on_line, **{"train.checkpoint_every": 1000}))
  run = holder[0]
  assert run.wait() == [75, 75], run.tails()
  assert sent, run.tails()
  # One line each (only process 1 got a SIGTERM), naming the same step.
  stops = [re.findall(r"^Preempted \(SIGTERM\) at step (\d+): the checkpoint of step "
                      r"\1 is saved in (\S+); run the same command again to resume\.$",
                      run.output(i), re.M) for i in range(2)]
  assert len(stops[0]) == 1 and stops[0] == stops[1], run.tails()
  preempted = int(stops[0][0][0])
  assert 3 <= preempted < steps - 6, run.tails()
  # Both stop together: neither runs a step past the other's.
  for i in range(2):
    logged = [int(s) for s in re.findall(r"\bstep (\d+)/\d+ \|", run.output(i))]
    assert max(logged) == preempted, run.tails()
  # The one checkpoint is that step's, complete for both processes.
  assert _checkpoints(workdir) == [preempted]
  assert not _complete(workdir, preempted)

  # 2. Resumed there; then process 1 is killed.
  config = {"train.checkpoint_every": 2,
            "distributed.heartbeat_timeout_s": _HEARTBEAT_S}
  holder = []
  # Saves are asynchronous: on a busy machine the checkpoint of step preempted + 2
  # may still be in flight at step preempted + 3, so the kill waits for a complete
  # newer checkpoint, which must then survive it.
  on_line, sent = _stop_process_at(
      holder, preempted + 3, signal.SIGKILL,
      ready=lambda: any(s > preempted and not _complete(workdir, s)
                        for s in _step_dirs(workdir)))
  holder.append(_Run(workdir, fashionmv_data_dir, model_dir, steps=steps,
                     on_line=on_line, **config))
  run = holder[0]
  codes = run.wait()
  assert sent, run.tails()
  for i in range(2):
    assert f"Resumed from step {preempted} in" in run.output(i), run.tails()
  assert codes[1] == -signal.SIGKILL, run.tails()
  # The survivor stops on its own, within the heartbeat timeout (and some slack for
  # a loaded machine), aborted by JAX's coordination service (SIGABRT: status 134
  # in a shell) with a message naming the lost process.
  took = run.ended[0] - sent["at"]
  assert codes[0] == -signal.SIGABRT, run.tails()
  assert took < _HEARTBEAT_S + 10, (took, run.tails())
  out = run.output(0)
  assert "Terminating process because the JAX distributed service detected fatal " \
      "errors" in out, run.tails()
  # The service's own words, whichever of its paths noticed first.
  assert re.search(r"The following tasks are unhealthy \(stopped sending "
                   r"heartbeats\):\s*1\s|Task 1 heartbeat timeout", out), run.tails()
  saved = _checkpoints(workdir)
  assert saved[-1] > preempted, (saved, run.tails())
  assert not _complete(workdir, saved[-1])

  # Nothing saved is lost: the newest checkpoint is complete and listed, and a
  # rerun resumes from it as the second run resumed from the preemption's.


def _main_fails(tmp_path, *flags) -> str:
  env = _env()
  for key in list(env):  # no cluster for `auto` to find, whatever machine runs this
    if key.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "MEGASCALE_",
                       "TPU_WORKER_", "TPU_PROCESS_", "JAX_COORDINATOR")):
      del env[key]
  env["TPU_SKIP_MDS_QUERY"] = "1"
  done = subprocess.run(
      [sys.executable, "-m", "procir_jax.main", "--config=configs/base.py",
       f"--workdir={tmp_path}", *flags], cwd=_REPO, env=env, capture_output=True,
      text=True, timeout=120)
  assert done.returncode == 2, done.stdout + done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
  assert len(errors) == 1, done.stderr
  return errors[0]


def test_bad_distributed_settings_are_one_line(tmp_path):
  line = _main_fails(tmp_path, "--config.distributed.coordinator_address=127.0.0.1:1",
                     "--config.distributed.num_processes=2",
                     "--config.distributed.heartbeat_timeout_s=0")
  assert "config.distributed.heartbeat_timeout_s must be a number of seconds >= 1" \
      in line
  line = _main_fails(tmp_path, "--config.distributed.coordinator_address=auto")
  assert "coordinator_address=auto found no cluster" in line
