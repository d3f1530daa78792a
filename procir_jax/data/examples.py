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

from procir_jax.data import dialogue
from procir_jax.data import fashionmv
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import rope


class BadExampleError(ValueError):
  """An example that cannot be turned into model inputs; names the product."""


@dataclasses.dataclass(frozen=True)
class EncodedSequence:
  """One dialogue to encode: tokens, the patches of its images, and where they go.

  Attributes:
    tokens: the rendered dialogue.
    patches: uint8 [patches, 3 * patch * patch], one frame per patch, before
      rescaling and normalising (see image_processing.ImagePatches).
    image_grid_thw: int32 [images, 3].
    position_ids: int32 [3, L] multimodal RoPE positions (t, h, w).
    image_slot: int32 [L]: for an image token, which of the sequence's images it
      shows; -1 for other tokens.
    image_pos: int32 [L]: for an image token, its index among that image's merged
      tokens; 0 for other tokens.
  """

  tokens: dialogue.Tokens
  patches: np.ndarray
  image_grid_thw: np.ndarray
  position_ids: np.ndarray
  image_slot: np.ndarray
  image_pos: np.ndarray

  @classmethod
  def build(cls, tokens: dialogue.Tokens, patches: np.ndarray,
            image_grid_thw: np.ndarray, *, image_token_id: int,
            merge_size: int) -> "EncodedSequence":
    """Computes the positions and the image-token layout of a dialogue."""
    ids = np.asarray(tokens.input_ids)
    grid = np.asarray(image_grid_thw, np.int32).reshape(-1, 3)
    length = len(ids)
    is_img = ids == image_token_id
    if not len(grid):
      positions = np.broadcast_to(np.arange(length, dtype=np.int32), (3, length))
      return cls(tokens, patches, grid, positions.copy(),
                 np.full(length, -1, np.int32), np.zeros(length, np.int32))
    positions = rope.multimodal_position_ids(
        ids[None], None, grid, image_token_id=image_token_id,
        spatial_merge_size=merge_size, xp=np)[:, 0]
    counts = grid.prod(axis=1) // merge_size ** 2
    ends = np.cumsum(counts)
    rank = np.cumsum(is_img) - 1
    slot = np.clip(np.searchsorted(ends, rank, side="right"), 0, len(grid) - 1)
    pos = rank - (ends[slot] - counts[slot])
    return cls(tokens, patches, grid, positions.astype(np.int32),
               np.where(is_img, slot, -1).astype(np.int32),
               np.where(is_img, pos, 0).astype(np.int32))


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
  # The release opens views with PIL (`Image.open(p).convert("RGB")`), which leaves the
  # EXIF orientation alone; OpenCV would apply it and transpose a rotated JPEG.
  image = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise BadExampleError(f"Could not decode an image of {what}.")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ExampleBuilder:
  """Makes the sequences of each mode; picklable, so it runs in grain workers."""

  def __init__(self, dialogues: dialogue.Dialogues, processor: ImageProcessor,
               options: ExampleOptions = ExampleOptions()):
    self.dialogues, self.processor, self.options = dialogues, processor, options

  def sequence(self, tokens: dialogue.Tokens, patches: np.ndarray | None = None,
               grid: np.ndarray | None = None) -> EncodedSequence:
    """A rendered dialogue with its images' uint8 patches (none: text only)."""
    if patches is None:
      patches = np.zeros((0, 3 * self.processor.patch_size ** 2), np.uint8)
      grid = np.zeros((0, 3), np.int32)
    return EncodedSequence.build(tokens, patches, grid,
                                 image_token_id=self.dialogues.ids.image_pad,
                                 merge_size=self.processor.merge_size)

  def _views(self, product: fashionmv.Product
             ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    views = product.views[:self.options.max_views]
    if not views:
      raise BadExampleError(f"Product {product.product_id!r} ({product.source}) has "
                            f"no views.")
    images = [decode_image(v, f"product {product.product_id!r} ({product.source})")
              for v in views]
    processed = self.processor.patchify(images)
    tokens = [self.processor.num_image_tokens(*im.shape[:2]) for im in images]
    return processed.patches, processed.image_grid_thw, tokens

  def document(self, product: fashionmv.Product) -> EncodedSequence:
    patches, grid, counts = self._views(product)
    return self.sequence(self.dialogues.document(counts), patches, grid)

  def query(self, joined: fashionmv.JoinedTriplet,
            with_reasoning: bool) -> EncodedSequence:
    o = self.options
    patches, grid, counts = self._views(joined.source)
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
    return self.sequence(tokens, patches, grid)

  def caption(self, product: fashionmv.Product) -> tuple[EncodedSequence, bool]:
    """The product's alignment caption, and whether it has one."""
    text = getattr(product, self.options.align_caption)
    return self.sequence(self.dialogues.caption(text or "")), bool(text)

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
    patches, grid, counts = self._views(product)
    return {"sft": self.sequence(self.dialogues.sft(counts, answer), patches, grid)}

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
