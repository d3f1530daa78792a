"""The model directory's tokenizer, with ProCIR's `<emb_all>` token.

A real Qwen3.5 directory and the tiny one the embedded default makes load through the
same code: `AutoTokenizer` reads the directory's tokenizer files and chat template.
"""

from __future__ import annotations

import dataclasses

import transformers

EMB_TOKEN = "<emb_all>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  emb: int
  image_pad: int
  vision_start: int
  vision_end: int
  im_start: int
  im_end: int
  pad: int


def load_tokenizer(model_dir: str) -> transformers.PreTrainedTokenizerBase:
  """Loads the directory's tokenizer and adds `<emb_all>` when it lacks it.

  When the token is new, `len(tokenizer)` grows by one and the model's embedding must
  grow with it (see the model's vocabulary helper).
  """
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(
        f"No tokenizer could be loaded from {model_dir}: {e}. A model directory needs "
        f"tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json, as a "
        f"Qwen3.5 checkpoint or tools/make_tiny_model.py writes them.") from e
  if EMB_TOKEN not in tokenizer.get_vocab():
    tokenizer.add_tokens([transformers.AddedToken(EMB_TOKEN, special=True)],
                         special_tokens=True)
  missing = [t for t in (IMAGE_PAD, VISION_START, VISION_END, IM_START, IM_END,
                         THINK_OPEN, THINK_CLOSE) if t not in tokenizer.get_vocab()]
  if missing:
    raise ValueError(f"The tokenizer in {model_dir} lacks {missing}; ProCIR needs a "
                     f"Qwen3.5-style tokenizer with the vision and chat tokens.")
  if tokenizer.chat_template is None:
    raise ValueError(f"The tokenizer in {model_dir} has no chat template "
                     f"(chat_template.jinja or tokenizer_config.json:chat_template).")
  return tokenizer


def special_token_ids(tokenizer) -> SpecialTokenIds:
  ids = tokenizer.convert_tokens_to_ids
  pad = tokenizer.pad_token_id
  return SpecialTokenIds(
      emb=ids(EMB_TOKEN), image_pad=ids(IMAGE_PAD), vision_start=ids(VISION_START),
      vision_end=ids(VISION_END), im_start=ids(IM_START), im_end=ids(IM_END),
      pad=ids(IM_END) if pad is None else pad)
