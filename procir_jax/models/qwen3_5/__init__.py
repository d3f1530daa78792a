"""Qwen3.5 (vision tower + hybrid Gated DeltaNet decoder) in Flax NNX.

  from procir_jax.models.qwen3_5 import load_pretrained, save_pretrained
  model = load_pretrained(hf_dir, dtype=jnp.bfloat16)
  hidden = model(input_ids=ids, attention_mask=mask,
                 pixel_values=pix, image_grid_thw=thw)
  logits = model.lm_logits(hidden)
  save_pretrained(model, out_dir)
"""

from procir_jax.models.qwen3_5.config import (Qwen3_5Config,
                                              Qwen3_5TextConfig,
                                              Qwen3_5VisionConfig)
from procir_jax.models.qwen3_5.model import Qwen3_5Model, grow_vocab
from procir_jax.models.qwen3_5.options import ModelOptions
from procir_jax.models.qwen3_5.params import (from_state_dict, load_pretrained,
                                              param_paths, save_pretrained)

__all__ = [
    "Qwen3_5Config",
    "Qwen3_5TextConfig",
    "Qwen3_5VisionConfig",
    "Qwen3_5Model",
    "ModelOptions",
    "grow_vocab",
    "from_state_dict",
    "load_pretrained",
    "param_paths",
    "save_pretrained",
]
