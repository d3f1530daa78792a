"""Qwen3.5 over the pipeline's padded batches, fully traceable, and `<emb_all>` reads.

A batch (see data/bucketing.py) packs the real views of its rows into `G` groups of
`N` image slots of `M` patches: `patches` uint8 [G, N, M, 3 * patch * patch] and
`image_grid_thw` [G, N, 3] (zeros for empty slots). The device rescales and normalises
the pixels, runs every slot as one row of the vision tower's attention (masked to its
real patches), and places each image token's feature with the host-computed
`image_slot` / `image_pos` maps; RoPE positions come precomputed too. The whole
forward is one static-shape program per bucket, and hidden states equal the model's
own per-example forward (a test holds them to it).

Groups are what makes this shard well: a batch sharded over N devices has N groups,
group g holds the images of the rows on device g, and the placement is a gather
within each group, so no image feature ever crosses devices.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from procir_jax.data.image_processing import ImageProcessor, PixelNorm
from procir_jax.models.qwen3_5 import Qwen3_5Model, rope
from procir_jax.models.qwen3_5.config import Qwen3_5VisionConfig
from procir_jax.models.qwen3_5 import vision

# Qwen3.5's own image processing settings (a model directory's
# preprocessor_config.json may say otherwise; see ImageProcessor.pixel_norm).
QWEN_PIXEL_NORM = ImageProcessor().pixel_norm


def slot_layout(image_grid_thw: jax.Array, max_len: int,
                cfg: Qwen3_5VisionConfig) -> vision.VisionLayout:
  """Vision layout for [slots, max_len] patches, one (still) image per slot.

  Patch j of a slot with grid (1, h, w) sits at the (row, col) the Qwen processor's
  merge-block order gives it; its learned position embedding is the bilinear
  resampling (aligned corners) of the square table to (h, w).
  """
  thw = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
  m = cfg.spatial_merge_size
  h, w = thw[:, 1:2], thw[:, 2:3]
  count = thw[:, 0] * thw[:, 1] * thw[:, 2]
  blocks_per_row = jnp.maximum(w // m, 1)
  j = jnp.arange(max_len)[None, :]
  rows = (j // (m * m * blocks_per_row)) * m + (j // m) % m
  cols = ((j // (m * m)) % blocks_per_row) * m + j % m
  interp_index, interp_weight = vision.position_taps(rows, cols, h, w, cfg)
  return vision.VisionLayout(
      interp_index=interp_index, interp_weight=interp_weight,
      rows=rows.reshape(-1), cols=cols.reshape(-1), num_segments=thw.shape[0],
      # Empty slots keep one key so that their (unused) rows stay finite.
      max_len=max_len, kv_lengths=jnp.maximum(count, 1))


def encode_images(model: Qwen3_5Model, patches: jax.Array, grid: jax.Array,
                  pixel_norm: PixelNorm = QWEN_PIXEL_NORM) -> jax.Array:
  """Merged image tokens [G, N * M / merge**2, hidden] of packed uint8 patches."""
  groups, slots, max_len, dim = patches.shape
  visual = model.visual
  pixels = pixel_norm(patches.reshape(groups * slots * max_len, dim), jnp)
  features = visual.encode_embedded(
      visual.embed_still_patches(pixels),
      slot_layout(grid.reshape(-1, 3), max_len, model.config.vision))
  return features.reshape(groups, -1, features.shape[-1])


def encode(model: Qwen3_5Model, part: Mapping[str, jax.Array],
           pixel_norm: PixelNorm = QWEN_PIXEL_NORM) -> jax.Array:
  """Last hidden states [B, L, H] of one padded sequence batch from the pipeline."""
  ids = jnp.asarray(part["input_ids"], jnp.int32)
  mask = jnp.asarray(part["attention_mask"], jnp.int32)
  embeds = model.language_model.embed_tokens(ids)
  b, length = ids.shape
  if "position_ids" in part:
    position_ids = jnp.moveaxis(jnp.asarray(part["position_ids"], jnp.int32), 1, 0)
  else:
    position_ids = rope.text_position_ids(b, length)
  if "patches" in part:
    grid = jnp.asarray(part["image_grid_thw"], jnp.int32)
    features = encode_images(model, part["patches"], grid, pixel_norm)
    groups = features.shape[0]
    per_slot = part["patches"].shape[2] // model.config.vision.spatial_merge_size ** 2
    slot = jnp.asarray(part["image_slot"], jnp.int32)
    is_img = (slot >= 0) & mask.astype(bool)
    index = jnp.where(is_img, slot * per_slot + jnp.asarray(part["image_pos"]), 0)
    picked = jnp.take_along_axis(features, index.reshape(groups, -1)[..., None],
                                 axis=1).reshape(b, length, -1)
    embeds = jnp.where(is_img[..., None], picked.astype(embeds.dtype), embeds)
  return model.language_model(embeds, mask, position_ids)


def _pad_to(x: jax.Array, shape: tuple[int, ...], value=0) -> jax.Array:
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)],
                 constant_values=value)


def join_parts(parts: list[Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
  """Several batches of the same rows as one batch, interleaved row by row.

  Row i of every part becomes rows k*i .. k*i + k - 1 of the result, so a row's
  sequences stay on the device that holds the row, and so do their images: the
  image groups are joined slot-wise, with each part's slots after the previous
  part's. Lengths and patch buckets are padded to the largest.
  """
  k = len(parts)
  b = parts[0]["input_ids"].shape[0]
  length = max(p["input_ids"].shape[1] for p in parts)
  joined = {}

  def interleave(arrays):  # k x [B, ...] -> [B * k, ...]
    return jnp.stack(arrays, axis=1).reshape((b * k,) + arrays[0].shape[1:])

  def row_array(p, key):  # [B, L] padded to the common length
    x = jnp.asarray(p[key]) if key in p else jnp.zeros(p["input_ids"].shape, jnp.int32)
    return _pad_to(x, (b, length))

  def positions(p):
    if "position_ids" in p:
      return _pad_to(jnp.asarray(p["position_ids"], jnp.int32), (b, 3, length))
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, 3, length))

  for key in ("input_ids", "attention_mask"):
    joined[key] = interleave([row_array(p, key) for p in parts])
  joined["position_ids"] = interleave([positions(p) for p in parts])
  with_images = [p for p in parts if "patches" in p]
  if with_images:
    max_len = max(p["patches"].shape[2] for p in with_images)
    slot_maps, patches, grids, offset = [], [], [], 0
    for p in parts:
      if "patches" not in p:
        slot_maps.append(jnp.full((b, length), -1, jnp.int32))
        continue
      groups, slots, m, dim = p["patches"].shape
      patches.append(_pad_to(jnp.asarray(p["patches"]), (groups, slots, max_len, dim)))
      grids.append(jnp.asarray(p["image_grid_thw"]))
      slot = jnp.asarray(p["image_slot"])
      slot_maps.append(_pad_to(jnp.where(slot >= 0, slot + offset, -1), (b, length),
                               value=-1))
      offset += slots
    joined["image_slot"] = interleave(slot_maps)
    joined["image_pos"] = interleave([row_array(p, "image_pos") for p in parts])
    joined["patches"] = jnp.concatenate(patches, axis=1)
    joined["image_grid_thw"] = jnp.concatenate(grids, axis=1)
  return joined


def encode_together(model: Qwen3_5Model, parts: list[Mapping[str, jax.Array]],
                    pixel_norm: PixelNorm = QWEN_PIXEL_NORM) -> list[jax.Array]:
  """`encode` of several batches of the same rows in one pass.

  One model pass on bigger matrices instead of one per batch (e.g. queries with
  their documents); rows do not interact, so each result equals its own `encode`.
  Returns each batch's [B, L_i, H].
  """
  if len(parts) == 1:
    return [encode(model, parts[0], pixel_norm)]
  b = parts[0]["input_ids"].shape[0]
  if any(p["input_ids"].shape[0] != b for p in parts):
    raise ValueError("encode_together needs batches of the same rows; got "
                     f"{[p['input_ids'].shape[0] for p in parts]} rows.")
  hidden = encode(model, join_parts(parts), pixel_norm)
  hidden = hidden.reshape(b, len(parts), *hidden.shape[1:])
  return [hidden[:, i, :p["input_ids"].shape[1]] for i, p in enumerate(parts)]


def gather_embeddings(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """Hidden states at `<emb_all>` positions, L2-normalised in fp32: [B, E, H]."""
  picked = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
  picked = picked.astype(jnp.float32)
  return picked / jnp.maximum(jnp.linalg.norm(picked, axis=-1, keepdims=True), 1e-12)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "patches",
                "image_grid_thw", "image_slot", "image_pos")


def numpy_batch(part: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """The arrays `encode` reads, as jax arrays (helper for eager use)."""
  return {k: jnp.asarray(part[k]) for k in MODEL_INPUTS if k in part}
