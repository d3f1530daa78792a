"""ProCIR's dialogue formats, as token ids with `<emb_all>` positions and loss masks.

ProCIR reads an embedding from the last hidden state at a `<emb_all>` token that the
assistant "answers". Formats:

* document (gallery side): user = the product's views; assistant = `<emb_all>`.
* two-stage query: user = source views; assistant = `<emb_all>` (embedding s);
  user = modification text; assistant = `<emb_all>` (embedding q).
* single-stage query (ablation): user = source views + text; assistant = `<emb_all>`.
* caption (alignment target): user = caption text; assistant = `<emb_all>`.
* chain of thought: an assistant turn carries reasoning text in its think block before
  `<emb_all>`; the LM loss covers exactly those reasoning tokens.
* SFT: user = views + an instruction; assistant = the long caption; the LM loss covers
  the caption and the closing `<|im_end|>` (so the model learns where to stop).

Every assistant turn starts with a think block, `<think>\\n\\n</think>\\n\\n` when it
has no reasoning, inserted after the chat template as the released evaluation does.
Text is rendered with the model directory's own chat template, image pads are expanded
to one token per merged patch (as the Qwen processor does), and the whole string is
tokenised once, so token boundaries are exactly those of the real pipeline.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from procir_jax.data import tokenizer as tok

DEFAULT_SFT_INSTRUCTION = "Describe this product in detail."
_ASSISTANT_HEADER = f"{tok.IM_START}assistant\n"
_TEMPLATE_THINK = re.compile(
    re.escape(tok.THINK_OPEN) + r".*?" + re.escape(tok.THINK_CLOSE) + r"\n*", re.S)


@dataclasses.dataclass(frozen=True)
class Tokens:
  """One rendered dialogue."""

  input_ids: np.ndarray  # int32 [L]
  loss_mask: np.ndarray  # bool [L]: tokens an LM loss must predict
  emb_positions: np.ndarray  # int32 [number of <emb_all>], in order
  num_image_tokens: int

  def __len__(self) -> int:
    return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class _Turn:
  role: str
  images: int = 0
  text: str = ""
  think: str | None = None  # reasoning text (assistant turns); None: empty block
  loss_on_answer: bool = False  # SFT: the answer itself is a target


def think_block(reasoning: str | None) -> str:
  if not reasoning:
    return f"{tok.THINK_OPEN}\n\n{tok.THINK_CLOSE}\n\n"
  return f"{tok.THINK_OPEN}\n{reasoning}\n{tok.THINK_CLOSE}\n\n"


class Dialogues:
  """Renders ProCIR dialogues with one tokenizer (see `tokenizer.load_tokenizer`)."""

  def __init__(self, tokenizer, sft_instruction: str = DEFAULT_SFT_INSTRUCTION):
    self.tokenizer = tokenizer
    self.ids = tok.special_token_ids(tokenizer)
    self.sft_instruction = sft_instruction
    self._reserved = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)

  # --- the formats -----------------------------------------------------------------

  def document(self, image_tokens: Sequence[int]) -> Tokens:
    return self._render(image_tokens, [_Turn("user", images=len(image_tokens)),
                                       _Turn("assistant", text=tok.EMB_TOKEN)])

  def two_stage_query(self, image_tokens: Sequence[int], text: str,
                      reasoning: tuple[str | None, str | None] = (None, None)
                      ) -> Tokens:
    return self._render(image_tokens, [
        _Turn("user", images=len(image_tokens)),
        _Turn("assistant", text=tok.EMB_TOKEN, think=reasoning[0]),
        _Turn("user", text=text),
        _Turn("assistant", text=tok.EMB_TOKEN, think=reasoning[1]),
    ])

  def single_stage_query(self, image_tokens: Sequence[int], text: str,
                         reasoning: str | None = None) -> Tokens:
    return self._render(image_tokens, [
        _Turn("user", images=len(image_tokens), text=text),
        _Turn("assistant", text=tok.EMB_TOKEN, think=reasoning),
    ])

  def caption(self, text: str) -> Tokens:
    return self._render([], [_Turn("user", text=text),
                             _Turn("assistant", text=tok.EMB_TOKEN)])

  def sft(self, image_tokens: Sequence[int], answer: str) -> Tokens:
    return self._render(image_tokens, [
        _Turn("user", images=len(image_tokens), text=self.sft_instruction),
        _Turn("assistant", text=answer, loss_on_answer=True),
    ])

  # --- rendering ---------------------------------------------------------------------

  def _check_text(self, text: str) -> None:
    for token in self._reserved:
      if token in text:
        raise ValueError(f"Text {text[:200]!r} contains the special token {token!r}, "
                         f"which would be read as a control token; clean the data.")

  def _render(self, image_tokens: Sequence[int], turns: Sequence[_Turn]) -> Tokens:
    for turn in turns:
      if turn.text and turn.text != tok.EMB_TOKEN:
        self._check_text(turn.text)
      if turn.think:
        self._check_text(turn.think)
    messages = []
    for turn in turns:
      content = [{"type": "image"}] * turn.images
      if turn.text:
        content.append({"type": "text", "text": turn.text})
      messages.append({"role": turn.role, "content": content})
    text = self.tokenizer.apply_chat_template(messages, tokenize=False)
    text = self._expand_image_pads(text, image_tokens)
    text, spans = self._insert_think_blocks(
        text, [t for t in turns if t.role == "assistant"])
    encoded = self.tokenizer(text, add_special_tokens=False,
                             return_offsets_mapping=True)
    input_ids = np.asarray(encoded["input_ids"], np.int32)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]])
    loss_mask = np.zeros(len(input_ids), bool)
    for begin, end in spans:
      loss_mask |= (starts >= begin) & (starts < end)
    emb_positions = np.flatnonzero(input_ids == self.ids.emb).astype(np.int32)
    expected_emb = sum(t.text == tok.EMB_TOKEN for t in turns)
    if len(emb_positions) != expected_emb:
      raise AssertionError(f"Rendered {len(emb_positions)} {tok.EMB_TOKEN} tokens, "
                           f"expected {expected_emb}: {text!r}")
    num_image_tokens = int(np.sum(input_ids == self.ids.image_pad))
    if num_image_tokens != sum(image_tokens):
      raise AssertionError(f"{num_image_tokens} image tokens after tokenising, "
                           f"expected {sum(image_tokens)}.")
    return Tokens(input_ids, loss_mask, emb_positions, num_image_tokens)

  @staticmethod
  def _expand_image_pads(text: str, image_tokens: Sequence[int]) -> str:
    parts = text.split(tok.IMAGE_PAD)
    if len(parts) - 1 != len(image_tokens):
      raise AssertionError(f"The chat template rendered {len(parts) - 1} images, "
                           f"expected {len(image_tokens)}.")
    out = [parts[0]]
    for count, part in zip(image_tokens, parts[1:]):
      out.append(tok.IMAGE_PAD * int(count))
      out.append(part)
    return "".join(out)

  @staticmethod
  def _insert_think_blocks(text: str, assistant_turns: Sequence[_Turn]
                           ) -> tuple[str, list[tuple[int, int]]]:
    """Puts ProCIR's think block at the start of every assistant turn.

    A think block the template wrote itself is replaced, so templates that add one
    (and ones that do not) give the same result. Returns the text and the character
    spans that the LM loss covers.
    """
    out, spans, cursor = [], [], 0
    for turn in assistant_turns:
      header = text.find(_ASSISTANT_HEADER, cursor)
      if header < 0:
        raise AssertionError(f"No assistant turn left in {text!r}.")
      body = header + len(_ASSISTANT_HEADER)
      out.append(text[cursor:body])
      existing = _TEMPLATE_THINK.match(text, body)
      if existing:
        body = existing.end()
      length = sum(map(len, out))
      block = think_block(turn.think)
      if turn.think:
        begin = length + len(tok.THINK_OPEN) + 1
        spans.append((begin, begin + len(turn.think)))
      out.append(block)
      if turn.loss_on_answer:
        begin = length + len(block)
        if not text.startswith(turn.text + tok.IM_END, body):
          raise AssertionError(f"The chat template changed the answer {turn.text!r}.")
        spans.append((begin, begin + len(turn.text) + len(tok.IM_END)))
      cursor = body
    out.append(text[cursor:])
    return "".join(out), spans
