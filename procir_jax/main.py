"""ProCIR-JAX entry point.

  python -m procir_jax.main --config=configs/base.py --workdir=workdir/base

Modes (`--config.mode`): train (SFT stage if enabled, contrastive training, then the
evaluation), sft, eval, embed, export (the trained model as a Hugging Face directory). Every config value can be overridden on the command
line, e.g. `--config.train.steps=1000 --config.data.global_batch_size=64`.

Exit status: 0 done; 75 (EX_TEMPFAIL, "try again") preempted by SIGTERM after saving a
checkpoint, so rerunning the same command resumes; 2 an error that is yours to fix
(config, missing or bad files, bad data), said in one line, with the full trace in
<workdir>/errors.log (or on screen with --traceback); 1 anything else, with its trace.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("Pass --config=configs/base.py (or another config file).")
  dist = config.distributed
  if dist.coordinator_address:
    jax.distributed.initialize(dist.coordinator_address,
                               num_processes=dist.num_processes,
                               process_id=dist.process_id)
  logging.info("Devices: %d (%d local) on %d process(es).", jax.device_count(),
               jax.local_device_count(), jax.process_count())
  from procir_jax import experiment  # after distributed initialisation

  modes = {"train": experiment.run_train, "sft": experiment.run_sft,
           "eval": experiment.run_eval, "embed": experiment.run_embed,
           "export": experiment.run_export}
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
