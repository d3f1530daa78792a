"""A complete Hugging Face style Qwen3.5 directory made offline, for the embedded default.

The directory holds what a real Qwen3.5 checkpoint holds: `config.json` and
`model.safetensors` (small, randomly initialised), a byte-level BPE tokenizer with the
Qwen special tokens and `<emb_all>` (trained here on FashionMV-style texts with
Qwen3.5's own pre-tokenizer), a chat template, and `preprocessor_config.json`. The
same loading code serves it and a real checkpoint.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from etils import epath
import numpy as np
import tokenizers
from tokenizers import pre_tokenizers, trainers
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

from flax import nnx

from procir_jax.data import tokenizer as tok
from procir_jax.models.qwen3_5 import (Qwen3_5Config, Qwen3_5Model,
                                       Qwen3_5TextConfig, Qwen3_5VisionConfig,
                                       save_pretrained)
from tfds_fashionmv import synthetic

# Ids are assigned in this order right after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>", tok.IM_START, tok.IM_END, tok.VISION_START, tok.VISION_END,
    tok.IMAGE_PAD, "<|video_pad|>", tok.THINK_OPEN, tok.THINK_CLOSE, tok.EMB_TOKEN,
)

# Qwen-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>
# (the processing code expands the pad to one token per merged patch).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Model shapes. `tiny` is for tests; `small` is the embedded default's demo model,
# sized to train in minutes on two CPU cores. head_dim * 0.25 / 2 rotary frequencies
# must cover sum(mrope_section).
PRESETS = {
    # The smallest model that still has both layer kinds: quick to compile in tests.
    "test": dict(
        vocab_size=400,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  layer_types=("linear_attention", "full_attention"),
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_num_key_heads=1, linear_num_value_heads=2,
                  mrope_section=(2, 1, 1)),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                    num_position_embeddings=64)),
    "tiny": dict(
        vocab_size=512,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4,
                  mrope_section=(2, 1, 1)),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                    num_position_embeddings=64)),
    "small": dict(
        vocab_size=1024,
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_key_head_dim=32, linear_value_head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4,
                  mrope_section=(2, 1, 1)),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                    num_position_embeddings=256)),
}


def training_texts(num_products: int = 3000, seed: int = 0) -> Iterator[str]:
  """FashionMV-style texts: captions and modification texts over random attributes."""
  rng = np.random.default_rng(seed)
  choices = synthetic.CHOICES
  for _ in range(num_products):
    a = synthetic.Attributes(**{k: str(rng.choice(choices[k]))
                                for k in synthetic.ATTRIBUTES})
    b = a.replace(colour=str(rng.choice(choices["colour"])),
                  pattern=str(rng.choice(choices["pattern"])))
    yield synthetic.short_caption(a)
    yield synthetic.long_caption(a, int(rng.integers(1, 6)))
    if b != a:
      yield from synthetic.modification_texts(a, b)
  # Chat scaffolding, so role names and think-block newlines are whole tokens.
  for _ in range(50):
    yield "user\nassistant\nsystem\n\n"
  yield "Describe this product in detail."


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen3_5Tokenizer:
  """Byte-level BPE with Qwen3.5's normaliser and pre-tokenizer, plus special tokens."""
  backend: tokenizers.Tokenizer = Qwen3_5Tokenizer().backend_tokenizer
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  backend.train_from_iterator(texts, trainer)
  model = json.loads(backend.to_str())["model"]
  tokenizer = Qwen3_5Tokenizer(vocab=model["vocab"],
                               merges=[tuple(m) for m in model["merges"]])
  tokenizer.add_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False)
       for t in SPECIAL_TOKENS], special_tokens=True)
  tokenizer.chat_template = CHAT_TEMPLATE
  return tokenizer


def preprocessor_config(min_pixels: int = 128 * 128, max_pixels: int = 512 * 512
                        ) -> dict:
  """Qwen2-VL style image processor settings as ProCIR uses them."""
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": "Qwen3VLProcessor",
      "min_pixels": min_pixels,
      "max_pixels": max_pixels,
      "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
      "patch_size": 16,
      "temporal_patch_size": 2,
      "merge_size": 2,
      "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5],
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "do_resize": True,
      "do_convert_rgb": True,
  }


def write_tokenizer_files(out_dir: str | epath.Path, preset: str = "tiny",
                          seed: int = 0) -> Qwen3_5Tokenizer:
  """Writes the tokenizer, chat template and preprocessor config into out_dir."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = train_tokenizer(training_texts(seed=seed),
                              PRESETS[preset]["vocab_size"])
  tokenizer.save_pretrained(str(out_dir))
  (out_dir / "preprocessor_config.json").write_text(
      json.dumps(preprocessor_config(), indent=2))
  return tokenizer


def model_config(tokenizer, preset: str = "tiny") -> Qwen3_5Config:
  """A Qwen3.5 config of the preset's shape, with the tokenizer's vocabulary and ids."""
  shape = PRESETS[preset]
  ids = tokenizer.convert_tokens_to_ids
  text = Qwen3_5TextConfig(vocab_size=len(tokenizer), **shape["text"])
  vision = Qwen3_5VisionConfig(out_hidden_size=text.hidden_size, **shape["vision"])
  return Qwen3_5Config(
      text=text, vision=vision, image_token_id=ids(tok.IMAGE_PAD),
      video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids(tok.VISION_START),
      vision_end_token_id=ids(tok.VISION_END), tie_word_embeddings=True,
      hf_config={"eos_token_id": ids(tok.IM_END),
                 "pad_token_id": tokenizer.pad_token_id})


def write_model_dir(out_dir: str | epath.Path, preset: str = "tiny",
                    seed: int = 0) -> epath.Path:
  """Writes a complete model directory: tokenizer files, config and random weights."""
  out_dir = epath.Path(out_dir)
  tokenizer = write_tokenizer_files(out_dir, preset, seed)
  model = Qwen3_5Model(model_config(tokenizer, preset), rngs=nnx.Rngs(seed))
  save_pretrained(model, str(out_dir))
  return out_dir
