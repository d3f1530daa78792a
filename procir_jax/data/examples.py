"""From FashionMV records to per-example model inputs (tokens, masks, patches).

Each training mode turns one record into a dict of *sequences*: a sequence is one
dialogue the model encodes (a query, a document, a caption) with its images. Sequences
are batched and padded by `bucketing`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cv2
import numpy as np

from procir_jax import dialogue
from procir_jax.data import fashionmv
from procir_jax.data.image_processing import ImageProcessor


class BadExampleError(ValueError):
  """An example that cannot be turned into model inputs; names the product."""


@dataclasses.dataclass(frozen=True)
class EncodedSequence:
  """One dialogue to encode: tokens plus the patches of its images."""

  tokens: dialogue.Tokens
  pixel_values: np.ndarray  # float32 [patches, patch_dim]
  image_grid_thw: np.ndarray  # int32 [images, 3]


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
  """Which dialogue formats and text fields a mode uses."""

  two_stage: bool = True  # two-stage dialogue; else single-stage queries
  align: bool = True  # encode caption texts for caption-based alignment
  cot: bool = False  # reasoning texts in the think blocks, with an LM loss
  query_text: str = "modification_text_short"
  align_caption: str = "caption_long"  # caption_long | caption_short
  reasoning_caption: str = "caption_short"
  sft_caption: str = "caption_long"
  max_views: int = 5


def decode_image(data: bytes, what: str) -> np.ndarray:
  """Encoded JPEG/PNG bytes to an RGB uint8 array; errors name `what`."""
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise BadExampleError(f"Could not decode an image of {what}.")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ExampleBuilder:
  """Makes the sequences of each mode; picklable, so it runs in grain workers."""

  def __init__(self, dialogues: dialogue.Dialogues, processor: ImageProcessor,
               options: ExampleOptions = ExampleOptions()):
    self.dialogues, self.processor, self.options = dialogues, processor, options

  def _views(self, product: fashionmv.Product
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    views = product.views[:self.options.max_views]
    if not views:
      raise BadExampleError(f"Product {product.product_id!r} ({product.source}) has "
                            f"no views.")
    images = [decode_image(v, f"product {product.product_id!r} ({product.source})")
              for v in views]
    processed = self.processor(images)
    tokens = [self.processor.num_image_tokens(*im.shape[:2]) for im in images]
    return processed.pixel_values, processed.image_grid_thw, tokens

  @staticmethod
  def text_only(tokens: dialogue.Tokens) -> EncodedSequence:
    return EncodedSequence(tokens, np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int32))

  def document(self, product: fashionmv.Product) -> EncodedSequence:
    pixels, grid, counts = self._views(product)
    return EncodedSequence(self.dialogues.document(counts), pixels, grid)

  def query(self, joined: fashionmv.JoinedTriplet, with_reasoning: bool) -> EncodedSequence:
    o = self.options
    pixels, grid, counts = self._views(joined.source)
    text = joined.triplet.texts.get(o.query_text)
    if text is None:
      raise BadExampleError(
          f"Triplet row {joined.triplet.row} has no {o.query_text!r}; it has "
          f"{sorted(joined.triplet.texts)}.")
    reasoning = (None, None)
    if with_reasoning:
      reasoning = (getattr(joined.source, o.reasoning_caption) or None,
                   getattr(joined.target, o.reasoning_caption) or None)
    if o.two_stage:
      tokens = self.dialogues.two_stage_query(counts, text, reasoning)
    else:
      tokens = self.dialogues.single_stage_query(counts, text, reasoning[1])
    return EncodedSequence(tokens, pixels, grid)

  def caption(self, product: fashionmv.Product) -> tuple[EncodedSequence, bool]:
    """The product's alignment caption, and whether it has one."""
    text = getattr(product, self.options.align_caption)
    return self.text_only(self.dialogues.caption(text or "")), bool(text)

  # --- modes ---------------------------------------------------------------------

  def contrastive(self, joined: fashionmv.JoinedTriplet) -> dict[str, Any]:
    out = {"query": self.query(joined, with_reasoning=self.options.cot),
           "document": self.document(joined.target)}
    if self.options.align:
      out["source_caption"], out["has_source_caption"] = self.caption(joined.source)
      out["target_caption"], out["has_target_caption"] = self.caption(joined.target)
    return out

  def sft(self, product: fashionmv.Product) -> dict[str, Any]:
    answer = getattr(product, self.options.sft_caption)
    if not answer:
      raise BadExampleError(f"Product {product.product_id!r} ({product.source}) has "
                            f"no {self.options.sft_caption} to learn from.")
    pixels, grid, counts = self._views(product)
    return {"sft": EncodedSequence(self.dialogues.sft(counts, answer), pixels, grid)}

  def gallery(self, product: fashionmv.Product) -> dict[str, Any]:
    return {"document": self.document(product)}

  def eval_query(self, joined: fashionmv.JoinedTriplet) -> dict[str, Any]:
    # The released evaluation queries with empty think blocks.
    return {"query": self.query(joined, with_reasoning=False)}


def example_ids(record: Any) -> dict[str, str]:
  """Host-side ids of a record, carried beside its arrays."""
  if isinstance(record, fashionmv.JoinedTriplet):
    t = record.triplet
    return {"source": t.source, "source_id": t.source_id, "target_id": t.target_id,
            "row": str(t.row)}
  return {"source": record.source, "product_id": record.product_id}


def sequence_names(mode: str, options: ExampleOptions) -> Sequence[str]:
  if mode == "contrastive":
    return ("query", "document") + (
        ("source_caption", "target_caption") if options.align else ())
  return {"sft": ("sft",), "gallery": ("document",), "eval_query": ("query",)}[mode]
