"""A trained ProCIR model as a Hugging Face directory (`--config.mode=export`).

  python -m procir_jax.main --config=configs/base.py --workdir=workdir/base \
      --config.mode=export

writes <workdir>/hf_export (or `export.dir`) holding what a Qwen3.5 checkpoint holds:

  config.json                    Qwen3_5ForConditionalGeneration's config
  model.safetensors              or model-0000k-of-0000n.safetensors and
                                 model.safetensors.index.json above export.max_shard_gb
  tokenizer.json, tokenizer_config.json
                                 the model directory's tokenizer with <emb_all>
  chat_template.jinja            its chat template
  preprocessor_config.json       the image processor, with ProCIR's pixel budget
  video_preprocessor_config.json the video processor (the source directory's, else
                                 one with the image processor's patching)
  processor_config.json          names Qwen3VLProcessor for AutoProcessor

so `Qwen3_5ForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
load it, the release's evaluate.py runs on it, and it is again a valid `model.hf_dir`.
The state is the best checkpoint by validation when the run kept validation metrics
(`export.checkpoint="best"`), else the latest one.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp

from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import (PROCESSOR_CLASS, PROCIR_MAX_PIXELS,
                                              PROCIR_MIN_PIXELS, ImageProcessor)
from procir_jax.models.qwen3_5 import save_pretrained

VIDEO_CONFIG_NAME = "video_preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def video_processor_config(processor: ImageProcessor) -> dict:
  """Qwen3.5's video processor settings, with the image processor's patching and
  normalisation (ProCIR uses no video; AutoProcessor still builds the processor)."""
  return {
      "video_processor_type": "Qwen3VLVideoProcessor",
      "processor_class": PROCESSOR_CLASS,
      "patch_size": processor.patch_size,
      "temporal_patch_size": processor.temporal_patch_size,
      "merge_size": processor.merge_size,
      "image_mean": list(processor.image_mean),
      "image_std": list(processor.image_std),
      "rescale_factor": processor.rescale_factor,
      "do_rescale": processor.do_rescale,
      "do_normalize": processor.do_normalize,
      "do_convert_rgb": True,
  }


def _write_json(path: epath.Path, obj: dict) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_processor_files(model_dir: str, out_dir: str | os.PathLike[str]) -> None:
  """The tokenizer (with <emb_all>), chat template and processor configs."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = tok.load_tokenizer(model_dir)  # adds <emb_all> when the source lacks it
  tokenizer.save_pretrained(str(out))
  if not (out / "chat_template.jinja").exists():
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)
  # The pixel budget the pipeline trains with (a Qwen3.5 checkpoint's own is far
  # wider), so that processors built from this directory see views as training did.
  processor = ImageProcessor.from_pretrained(
      model_dir, min_pixels=PROCIR_MIN_PIXELS, max_pixels=PROCIR_MAX_PIXELS)
  processor.save_pretrained(out)
  source_video = epath.Path(model_dir) / VIDEO_CONFIG_NAME
  if source_video.exists():
    shutil.copyfile(source_video, out / VIDEO_CONFIG_NAME)
  else:
    _write_json(out / VIDEO_CONFIG_NAME, video_processor_config(processor))
  _write_json(out / PROCESSOR_CONFIG_NAME, {"processor_class": PROCESSOR_CLASS})


def export(model, model_dir: str, out_dir: str | os.PathLike[str], *,
           dtype: str = "bfloat16",
           max_shard_gb: float = 5.0) -> epath.Path:
  """Writes `model` (a Qwen3_5Model) and the processor files into `out_dir`.

  Every process calls this; process 0 writes.
  """
  if dtype not in _DTYPES:
    raise ValueError(f"export.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
  out = epath.Path(out_dir)
  if jax.process_count() > 1:
    # save_pretrained reads each parameter on this host: gather the other hosts'
    # shards first (a collective, so every process takes part).
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: multihost_utils.process_allgather(x, tiled=True), params))
  if jax.process_index() == 0:
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
      raise FileExistsError(
          f"{out} exists and holds files that are not a model export; choose "
          f"another export.dir or empty it.")
    save_pretrained(model, str(out), dtype=_DTYPES[dtype],
                    max_shard_bytes=int(max_shard_gb * 2**30))
    write_processor_files(model_dir, out)
    size = sum(os.path.getsize(f) for f in out.glob("model*.safetensors"))
    logging.info("Exported the model (%.1f MB of %s weights) to %s.", size / 2**20,
                 dtype, out)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("procir_export")
  return out
