"""Static shapes for jit: pad each batch to one of a few sizes, and measure the waste.

Every batch of one sequence kind is padded to the smallest length bucket that holds its
longest dialogue, and its images to `max_images` slots per example of the smallest
patch bucket that holds its largest image, so a jitted step compiles once per bucket
pair and never per batch. One image per slot keeps the vision tower's attention a plain
per-row mask, with no gathers. Rows of examples that
were skipped (bad input) or that pad the last evaluation batch are all padding, and
`valid` says so.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from procir_jax.data.examples import BadExampleError, EncodedSequence


class TooLargeError(BadExampleError):
  """An example longer than the largest bucket."""


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Allowed padded sizes: tokens per sequence and patches per image."""

  lengths: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024)
  # 64 = 128x128 (the smallest image ProCIR feeds), 256 = 256x256, 1024 = 512x512.
  patches: tuple[int, ...] = (64, 144, 256, 400, 576, 784, 1024)
  max_images: int = 5  # image slots per example (the view cap)

  def __post_init__(self):
    for name in ("lengths", "patches"):
      values = getattr(self, name)
      if not values or list(values) != sorted(set(values)) or values[0] <= 0:
        raise ValueError(f"Buckets.{name} must be increasing positive sizes, "
                         f"got {values}.")

  @staticmethod
  def _pick(sizes: Sequence[int], n: int) -> int:
    for size in sizes:
      if n <= size:
        return size
    return -1

  def check(self, sequence: EncodedSequence, what: str) -> None:
    """Raises TooLargeError, naming `what`, if no bucket holds the sequence."""
    if self._pick(self.lengths, len(sequence.tokens)) < 0:
      raise TooLargeError(
          f"{what} renders to {len(sequence.tokens)} tokens, more than the largest "
          f"length bucket {self.lengths[-1]}; raise data.buckets.lengths or lower "
          f"the image resolution.")
    per_image = sequence.image_grid_thw.prod(axis=-1)
    if len(per_image) and self._pick(self.patches, int(per_image.max())) < 0:
      raise TooLargeError(
          f"{what} has an image of {int(per_image.max())} patches, more than the "
          f"largest patch bucket {self.patches[-1]}; raise data.buckets.patches or "
          f"lower max_pixels.")
    if len(sequence.image_grid_thw) > self.max_images:
      raise TooLargeError(f"{what} has {len(sequence.image_grid_thw)} images; at "
                          f"most {self.max_images} fit an example.")

  def collate(self, sequences: Sequence[EncodedSequence | None], pad_id: int,
              num_emb: int, with_images: bool) -> dict[str, np.ndarray]:
    """Pads one kind of sequence (None = a padding row) to a bucketed batch."""
    real = [s for s in sequences if s is not None]
    longest = max((len(s.tokens) for s in real), default=1)
    length = self._pick(self.lengths, longest)
    b = len(sequences)
    out = {
        "input_ids": np.full((b, length), pad_id, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "loss_mask": np.zeros((b, length), bool),
        "emb_positions": np.zeros((b, num_emb), np.int32),
    }
    if with_images:
      most = max((int(s.image_grid_thw.prod(axis=-1).max(initial=1)) for s in real),
                 default=1)
      patches = self._pick(self.patches, most)
      dim = next((s.pixel_values.shape[1] for s in real), 0)
      out["pixel_values"] = np.zeros((b, self.max_images, patches, dim), np.float32)
      out["image_grid_thw"] = np.zeros((b, self.max_images, 3), np.int32)
    for i, s in enumerate(sequences):
      if s is None:
        continue
      n = len(s.tokens)
      out["input_ids"][i, :n] = s.tokens.input_ids
      out["attention_mask"][i, :n] = 1
      out["loss_mask"][i, :n] = s.tokens.loss_mask
      if len(s.tokens.emb_positions) != num_emb:
        raise AssertionError(f"Expected {num_emb} <emb_all> tokens, got "
                             f"{len(s.tokens.emb_positions)}.")
      out["emb_positions"][i] = s.tokens.emb_positions
      if with_images:
        start = 0
        for slot, count in enumerate(s.image_grid_thw.prod(axis=-1)):
          out["pixel_values"][i, slot, :count] = s.pixel_values[start:start + count]
          start += count
        out["image_grid_thw"][i, :len(s.image_grid_thw)] = s.image_grid_thw
    return out


class PaddingReport:
  """Share of padding per bucket, accumulated over the batches it sees."""

  def __init__(self):
    self._tokens = collections.defaultdict(lambda: [0, 0, 0])  # real, total, batches
    self._patches = collections.defaultdict(lambda: [0, 0, 0])

  def update(self, batch: Mapping[str, Any]) -> None:
    for name, part in batch.items():
      if not isinstance(part, Mapping) or "attention_mask" not in part:
        continue
      mask = np.asarray(part["attention_mask"])
      entry = self._tokens[(name, mask.shape[1])]
      entry[0] += int(mask.sum())
      entry[1] += mask.size
      entry[2] += 1
      if "pixel_values" in part:
        grid = np.asarray(part["image_grid_thw"])
        pixels = np.asarray(part["pixel_values"])
        entry = self._patches[(name, pixels.shape[2])]
        entry[0] += int(grid.prod(axis=-1).sum())
        entry[1] += int(np.prod(pixels.shape[:3]))
        entry[2] += 1

  def summary(self) -> dict[str, dict[str, float]]:
    """{"query/tokens@256": {"waste": 0.31, "batches": 12}, ...}"""
    out = {}
    for kind, table in (("tokens", self._tokens), ("patches", self._patches)):
      for (name, size), (real, total, batches) in sorted(table.items()):
        out[f"{name}/{kind}@{size}"] = {"waste": 1.0 - real / max(total, 1),
                                        "batches": batches}
    return out

  def __str__(self) -> str:
    rows = [f"  {k:32s} {v['waste']:6.1%} padding over {v['batches']} batches"
            for k, v in self.summary().items()]
    return "Padding per bucket:\n" + "\n".join(rows)
