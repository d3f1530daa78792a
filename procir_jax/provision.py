"""Provisioning: the data and the model a config names, found or made.

Empty `data.manual_dir` means a synthetic FashionMV in the workdir; empty
`model.hf_dir` means a tiny random Qwen3.5 there. Work already done is reused.
"""

from __future__ import annotations

import dataclasses

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections

from procir_jax import tiny_model


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where a run's files live: its workdir, the TFDS data and the model directory."""
  workdir: epath.Path
  data_dir: str
  model_dir: str

  @property
  def contrastive_checkpoints(self) -> epath.Path:
    return self.workdir / "checkpoints" / "contrastive"


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Paths:
  """Finds or makes the TFDS data and the model directory the config names."""
  import tensorflow_datasets as tfds  # only provisioning needs the builder
  import tfds_fashionmv  # noqa: F401
  from tfds_fashionmv import synthetic

  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = config.data.data_dir or str(workdir / "tfds")
  manual_dir = config.data.manual_dir
  builders = [tfds.builder(f"fashionmv/{name}", data_dir=data_dir)
              for name in ("products", "triplets")]
  missing = [b for b in builders if not b.is_prepared()]
  if missing and not manual_dir and not config.data.use_synthetic:
    raise ValueError("Set --config.data.manual_dir to the FashionMV release (data/ and "
                     "images/, see the README), or --config.data.data_dir to where "
                     "`tfds build` wrote fashionmv.")
  if not config.model.hf_dir and not config.model.tiny_preset:
    raise ValueError("Set --config.model.hf_dir to a local Qwen3.5 (or ProCIR) "
                     "checkpoint directory.")
  if missing and jax.process_index() == 0:
    if not manual_dir:
      manual_dir = str(workdir / "fashionmv_release")
      if not (epath.Path(manual_dir) / "data" / "val_captions.jsonl").exists():
        logging.info("Writing a synthetic FashionMV to %s.", manual_dir)
        synthetic.generate(manual_dir, synthetic.SyntheticConfig(
            seed=config.seed, **config.data.synthetic.to_dict()))
    for builder in missing:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir))
  model_dir = config.model.hf_dir
  if not model_dir:
    model_dir = str(workdir / f"tiny_model_{config.model.tiny_preset}")
    if jax.process_index() == 0 and not (epath.Path(model_dir) /
                                         "model.safetensors").exists():
      tiny_model.write_model_dir(model_dir, config.model.tiny_preset, config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("procir_prepare")
  return Paths(workdir, data_dir, model_dir)
