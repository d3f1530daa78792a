"""A Hugging Face style Qwen3.5 directory made offline, for the embedded default.

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
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5Model, save_pretrained
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
    "{%- if item['type'] == 'image' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# The presets this module writes, by the size of the byte-level BPE vocabulary their
# tokenizer is trained to (the special tokens come on top). Each model's shape is
# Qwen3_5Config's preset of the same name: `tiny` is for tests, `small` is the
# embedded default's demo model, `test` the quickest to compile.
TOKENIZER_VOCAB_SIZES = {"test": 400, "tiny": 512, "small": 1024}
PRESETS = tuple(TOKENIZER_VOCAB_SIZES)


def training_texts(num_products: int = 3000, seed: int = 0) -> Iterator[str]:
  """FashionMV-style texts: captions and modification texts over random attributes."""
  rng = np.random.default_rng(seed)
  for _ in range(num_products):
    a = synthetic.sample_attributes(rng)
    b = a.replace(colour=synthetic.sample_value(rng, "colour"),
                  pattern=synthetic.sample_value(rng, "pattern"))
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


def write_processor_config(out_dir: str | epath.Path,
                           processor: ImageProcessor | None = None) -> epath.Path:
  """Writes preprocessor_config.json: `processor`'s settings (default ImageProcessor():
  Qwen3.5's patching and normalisation with ProCIR's pixel budget)."""
  processor = processor or ImageProcessor()
  return epath.Path(processor.save_pretrained(out_dir))


def write_tokenizer_files(out_dir: str | epath.Path, preset: str = "tiny",
                          seed: int = 0) -> Qwen3_5Tokenizer:
  """Writes the tokenizer, chat template and preprocessor config into out_dir."""
  if preset not in TOKENIZER_VOCAB_SIZES:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = train_tokenizer(training_texts(seed=seed),
                              TOKENIZER_VOCAB_SIZES[preset])
  tokenizer.save_pretrained(str(out_dir))
  write_processor_config(out_dir)
  return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
  """The tokenizer's multimodal token ids, as Qwen3_5Config's presets take them."""
  ids = tokenizer.convert_tokens_to_ids
  return {"image_token_id": ids(tok.IMAGE_PAD), "video_token_id": ids("<|video_pad|>"),
          "vision_start_token_id": ids(tok.VISION_START),
          "vision_end_token_id": ids(tok.VISION_END)}


def model_config(tokenizer, preset: str = "tiny") -> Qwen3_5Config:
  """A Qwen3.5 config of the preset's shape, with the tokenizer's vocabulary and ids."""
  config = Qwen3_5Config.preset(preset, vocab_size=len(tokenizer),
                                **token_ids(tokenizer))
  return config.replace(hf_config={
      "eos_token_id": tokenizer.convert_tokens_to_ids(tok.IM_END),
      "pad_token_id": tokenizer.pad_token_id})


def write_model_dir(out_dir: str | epath.Path, preset: str = "tiny",
                    seed: int = 0) -> epath.Path:
  """Writes a complete model directory: tokenizer files, config and random weights."""
  out_dir = epath.Path(out_dir)
  tokenizer = write_tokenizer_files(out_dir, preset, seed)
  model = Qwen3_5Model(model_config(tokenizer, preset), rngs=nnx.Rngs(seed))
  save_pretrained(model, str(out_dir))
  return out_dir
