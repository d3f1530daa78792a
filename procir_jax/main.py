"""ProCIR-JAX entry point.

  python -m procir_jax.main --config=configs/base.py --workdir=workdir/base

Modes (`--config.mode`): train (SFT stage if enabled, contrastive training, then the
evaluation), sft, eval, embed, export (the trained model as a Hugging Face directory). Every config value can be overridden on the command
line, e.g. `--config.train.steps=1000 --config.data.global_batch_size=64`.
"""

import logging as std_logging

from absl import app, flags, logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where data, models, checkpoints, "
                               "metrics and results go.", required=True)


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
  modes[config.mode](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
