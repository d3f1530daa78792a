"""ProCIR-JAX entry point.

  python -m procir_jax.main --config=configs/base.py --workdir=workdir/base

Modes (`--config.mode`): train (SFT stage if enabled, contrastive training, then the
evaluation), sft, eval, embed, export (the trained model as a Hugging Face directory).
Every config value can be overridden on the command line, e.g.
`--config.train.steps=1000 --config.data.global_batch_size=64`.

Exit status: 0 done; 75 (EX_TEMPFAIL, "try again") preempted by SIGTERM after saving a
checkpoint, so rerunning the same command resumes; 2 an error that is yours to fix
(config, missing or bad files, bad data), said in one line, with the full trace in
<workdir>/errors.log (or on screen with --traceback); 1 anything else, with its trace.
On several hosts, when one process dies the others abort (134, SIGABRT) within
config.distributed.heartbeat_timeout_s, naming it (see _initialize_distributed).
"""

import contextlib
import logging as std_logging
import os
import socket
import sys
import time
import traceback

from absl import app, flags, logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where data, models, checkpoints, "
                               "metrics and results go.", required=True)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the full traceback of errors that are yours to fix "
    "(they are otherwise one line, with the trace in <workdir>/errors.log).")

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: schedulers can requeue rather than fail the job
EXIT_USER_ERROR = 2
# What bad configs, files and data raise here; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               PermissionError, FloatingPointError)


def _keep_trace(workdir: str) -> str | None:
  """Appends the current exception's traceback to <workdir>/errors.log."""
  try:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "errors.log")
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} "
              f"pid {os.getpid()}\n{traceback.format_exc()}\n")
    return path
  except OSError:
    return None


class _QuietLibraries:
  """Keeps the libraries' INFO chatter (checkpoint internals, ...) out of the log so
  that the progress lines stay readable; their warnings still show."""

  _NOISY = ("/orbax/", "/grain/", "/jax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def _initialize_distributed(dist) -> None:
  """Joins the processes of a multi-host run (config.distributed).

  coordinator_address "" runs alone, "auto" lets JAX find the cluster (TPU pod
  slices, Slurm, Open MPI, GKE), "HOST:PORT" with num_processes and process_id names
  it. Every process then sends heartbeats (from a background thread) to the
  coordination service on process 0. When a process dies (killed, out of memory, its
  host lost) the service notices within `heartbeat_timeout_s` and JAX aborts every
  other process (SIGABRT, status 134) instead of leaving it waiting in a collective,
  with "Terminating process because the JAX distributed service detected fatal
  errors ..." and the lost process named: "The following tasks are unhealthy
  (stopped sending heartbeats): <ids>" or "Task <id> heartbeat timeout". A collective
  that fails first (gloo's "Connection reset by peer" on CPU) prints its traceback
  before that. Losing process 0 stops the others at once ("Failed to send RPC to
  coordination service"). Rerunning every process resumes from the last complete
  checkpoint. (JAX has no hook for a message of our own: the client's
  missed_heartbeat_callback cannot be given a Python function in jax 0.10.2, whose
  binding fails converting the status with std::bad_cast.)
  """
  address = str(dist.coordinator_address or "").strip()
  if not address:
    return
  timeouts = {}
  for key, jax_name in (("heartbeat_timeout_s", "heartbeat_timeout_seconds"),
                        ("initialization_timeout_s", "initialization_timeout")):
    value = dist.get(key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
      raise ValueError(f"config.distributed.{key} must be a number of seconds >= 1, "
                       f"got {value!r}.")
    timeouts[jax_name] = int(round(value))
  if address == "auto":
    try:
      jax.distributed.initialize(**timeouts)
    except ValueError as e:  # JAX found no cluster environment
      raise ValueError(
          f"config.distributed.coordinator_address=auto found no cluster that JAX "
          f"recognises (TPU pod slice, Slurm, Open MPI, GKE) ({e}): pass HOST:PORT "
          f"with num_processes and process_id, or leave it empty to run alone."
      ) from e
  else:
    if ":" not in address:
      raise ValueError(f"config.distributed.coordinator_address must be HOST:PORT (or "
                       f"'auto', or empty for one process), got {address!r}.")
    jax.distributed.initialize(address, num_processes=dist.num_processes,
                               process_id=dist.process_id, **timeouts)
  logging.info(
      "Process %d of %d (coordinator %s); if a process dies, the others stop within "
      "%s s (config.distributed.heartbeat_timeout_s).", jax.process_index(),
      jax.process_count(), address, timeouts.get("heartbeat_timeout_seconds", 100))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("Pass --config=configs/base.py (or another config file).")
  try:
    _initialize_distributed(config.distributed)
  except ValueError as e:  # a bad distributed.* value: yours to fix
    print(f"Error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  logging.info("Devices: %d (%d local) on %d process(es).", jax.device_count(),
               jax.local_device_count(), jax.process_count())
  if jax.process_count() > 1 and not jax.distributed.is_initialized():
    logging.warning(
        "%d processes without JAX's distributed runtime: a SIGTERM will end a "
        "process without a checkpoint, and a dead process will leave the others "
        "waiting. Pass --config.distributed.coordinator_address=auto (or HOST:PORT "
        "with num_processes and process_id).", jax.process_count())
  from procir_jax.modes import MODES as modes  # after distributed initialisation

  if config.mode not in modes:
    raise app.UsageError(f"config.mode must be one of {sorted(modes)}, got "
                         f"{config.mode!r}.")
  from procir_jax.train import loop as loop_lib
  from procir_jax.train import workdir_lock

  # Two runs training into one workdir would overwrite each other's checkpoints;
  # evaluating beside a training run is fine.
  lock = (workdir_lock.WorkdirLock(_WORKDIR.value) if config.mode in ("train", "sft")
          else contextlib.nullcontext())
  try:
    with lock:
      modes[config.mode](config, _WORKDIR.value)
  except loop_lib.TrainingStopped as e:
    print(e, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except (*USER_ERRORS, workdir_lock.WorkdirLockedError) as e:
    if _TRACEBACK.value:
      raise
    where = _keep_trace(_WORKDIR.value)
    more = f" (full trace in {where}; --traceback shows it)" if where else ""
    print(f"Error: {e}{more}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
  app.run(main)
