"""Static shapes for jit: pad each batch to one of a few sizes, and measure the waste.

Every batch of one sequence kind is padded to the smallest length bucket that holds its
longest dialogue. Its images are packed: the real views of the batch, one per slot,
each slot padded to the smallest patch bucket that holds the batch's largest image, and
the number of slots rounded up to a few fill levels, so that empty views cost nothing
and a jitted step still compiles once per bucket combination, never per batch.

Images are packed in `image_groups` groups of consecutive rows. A group is the unit a
device holds: with one group per batch shard, every image sits on the device of the
row that shows it, and placing image features into token rows needs no communication.
Rows of examples that were skipped (bad input) or that pad the last evaluation batch
are all padding, and `valid` says so.

Per sequence kind a batch holds:
  input_ids, attention_mask, loss_mask   [B, L]
  emb_positions                          [B, E]
  position_ids                           [B, 3, L] multimodal RoPE positions
and, for kinds with images,
  patches          uint8 [G, N, M, 3 * patch * patch] (G groups of N slots of M patches)
  image_grid_thw   int32 [G, N, 3]                       (zeros for empty slots)
  image_slot       int32 [B, L]  slot of the row's group an image token shows, or -1
  image_pos        int32 [B, L]  that token's index among its image's merged tokens
"""

from __future__ import annotations

import collections
import dataclasses
import math
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
  max_images: int = 5  # views per example at most (the view cap)
  # Image slots per group, as fractions of rows * max_images: a batch takes the
  # smallest that holds its views (more levels: less padding, more compiles).
  image_fill: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

  def __post_init__(self):
    if (not self.image_fill or list(self.image_fill) != sorted(set(self.image_fill))
        or self.image_fill[0] <= 0 or self.image_fill[-1] != 1.0):
      raise ValueError(f"Buckets.image_fill must be increasing fractions ending at "
                       f"1.0, got {self.image_fill}.")
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

  def image_slots(self, rows: int, images: int) -> int:
    """Slots per group for a group of `rows` rows showing `images` images."""
    for fill in self.image_fill:
      slots = max(1, math.ceil(fill * rows * self.max_images))
      if images <= slots:
        return slots
    raise TooLargeError(f"{images} images in a group of {rows} rows; at most "
                        f"{rows * self.max_images} fit.")

  def collate(self, sequences: Sequence[EncodedSequence | None], pad_id: int,
              num_emb: int, with_images: bool, image_groups: int = 1,
              patch_dim: int | None = None) -> dict[str, np.ndarray]:
    """Pads one kind of sequence (None = a padding row) to a bucketed batch.

    `image_groups` must divide the number of rows (see the module docstring).
    `patch_dim` (3 * patch * patch) sizes the patches of a batch without any
    image; by default it comes from the sequences.
    """
    real = [s for s in sequences if s is not None]
    longest = max((len(s.tokens) for s in real), default=1)
    length = self._pick(self.lengths, longest)
    b = len(sequences)
    out = {
        "input_ids": np.full((b, length), pad_id, np.int32),
        "attention_mask": np.zeros((b, length), np.int32),
        "loss_mask": np.zeros((b, length), bool),
        "emb_positions": np.zeros((b, num_emb), np.int32),
        "position_ids": np.zeros((b, 3, length), np.int32),
    }
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
      out["position_ids"][i, :, :n] = s.position_ids
    if with_images:
      out.update(self._pack_images(sequences, length, image_groups, patch_dim))
    return out

  def _pack_images(self, sequences, length: int, groups: int,
                   patch_dim: int | None) -> dict[str, np.ndarray]:
    b = len(sequences)
    if groups < 1 or b % groups:
      raise ValueError(f"image_groups={groups} must divide the {b} rows of a batch.")
    rows = b // groups
    real = [s for s in sequences if s is not None]
    most = max((int(s.image_grid_thw.prod(axis=-1).max(initial=1)) for s in real),
               default=1)
    patches = self._pick(self.patches, most)
    dim = patch_dim or next((s.patches.shape[1] for s in real if len(s.patches)), 0)
    per_group = [sum(len(s.image_grid_thw) for s in sequences[g * rows:(g + 1) * rows]
                     if s is not None) for g in range(groups)]
    slots = self.image_slots(rows, max(per_group))
    out = {
        "patches": np.zeros((groups, slots, patches, dim), np.uint8),
        "image_grid_thw": np.zeros((groups, slots, 3), np.int32),
        "image_slot": np.full((b, length), -1, np.int32),
        "image_pos": np.zeros((b, length), np.int32),
    }
    for g in range(groups):
      first = 0  # the group's next free slot
      for i in range(g * rows, (g + 1) * rows):
        s = sequences[i]
        if s is None:
          continue
        n = len(s.tokens)
        start = 0
        for j, count in enumerate(s.image_grid_thw.prod(axis=-1)):
          out["patches"][g, first + j, :count] = s.patches[start:start + count]
          start += count
        out["image_grid_thw"][g, first:first + len(s.image_grid_thw)] = s.image_grid_thw
        out["image_slot"][i, :n] = np.where(s.image_slot >= 0, s.image_slot + first, -1)
        out["image_pos"][i, :n] = s.image_pos
        first += len(s.image_grid_thw)
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
      if "patches" in part:
        grid = np.asarray(part["image_grid_thw"])
        patches = np.asarray(part["patches"])
        entry = self._patches[(name, patches.shape[2])]
        entry[0] += int(grid.prod(axis=-1).sum())
        entry[1] += int(np.prod(patches.shape[:3]))
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
