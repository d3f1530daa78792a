"""Qwen3.5 over the pipeline's padded batches, fully traceable, and `<emb_all>` reads.

The pipeline gives each example `max_images` image slots of M patches
(`pixel_values` [B, V, M, D], `image_grid_thw` [B, V, 3], zero rows for empty slots).
Every slot is one row of the vision tower's attention with a key mask, so the whole
forward is one static-shape program per bucket, and nothing depends on the grid
values at trace time. Hidden states equal the model's own per-example forward (a test
holds them to it).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from procir_jax.models.qwen3_5 import Qwen3_5Model, rope
from procir_jax.models.qwen3_5.config import Qwen3_5VisionConfig
from procir_jax.models.qwen3_5 import vision


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
  count = thw[:, 0:1] * h * w
  blocks_per_row = jnp.maximum(w // m, 1)
  j = jnp.arange(max_len)[None, :]
  rows = (j // (m * m * blocks_per_row)) * m + (j // m) % m
  cols = ((j // (m * m)) % blocks_per_row) * m + j % m
  interp_index, interp_weight = vision.position_taps(rows, cols, h, w, cfg)
  # Empty slots keep one key so their (unused) softmax rows stay finite.
  key_valid = (j < count) | ((count == 0) & (j == 0))
  return vision.VisionLayout(
      interp_index=interp_index, interp_weight=interp_weight,
      rows=rows.reshape(-1), cols=cols.reshape(-1), num_segments=thw.shape[0],
      max_len=max_len, key_valid=key_valid)


def encode(model: Qwen3_5Model, part: Mapping[str, jax.Array]) -> jax.Array:
  """Last hidden states [B, L, H] of one padded sequence batch from the pipeline."""
  cfg = model.config
  ids = jnp.asarray(part["input_ids"], jnp.int32)
  mask = jnp.asarray(part["attention_mask"], jnp.int32)
  embeds = model.language_model.embed_tokens(ids)
  b, length = ids.shape
  if "pixel_values" not in part:
    return model.language_model(embeds, mask, rope.text_position_ids(b, length))
  pixels, grid = part["pixel_values"], jnp.asarray(part["image_grid_thw"], jnp.int32)
  _, slots, max_len, dim = pixels.shape
  merge = cfg.vision.spatial_merge_size ** 2
  features = model.visual(pixels.reshape(b * slots * max_len, dim),
                          slot_layout(grid, max_len, cfg.vision))
  per_slot = max_len // merge
  features = features.reshape(b, slots * per_slot, -1)
  # The k-th image token of an example takes the k-th real feature of its slots.
  tokens = grid.prod(axis=-1) // merge  # [B, V]
  ends = jnp.cumsum(tokens, axis=1)
  is_img = (ids == cfg.image_token_id) & mask.astype(bool)
  rank = jnp.cumsum(is_img, axis=1) - 1
  slot = jax.vmap(lambda e, r: jnp.searchsorted(e, r, side="right"))(ends, rank)
  slot = jnp.clip(slot, 0, slots - 1)
  within = rank - (jnp.take_along_axis(ends, slot, 1) -
                   jnp.take_along_axis(tokens, slot, 1))
  index = jnp.clip(slot * per_slot + within, 0, slots * per_slot - 1)
  picked = jnp.take_along_axis(features, index[..., None], axis=1)
  embeds = jnp.where(is_img[..., None], picked.astype(embeds.dtype), embeds)
  position_ids = rope.multimodal_position_ids(
      ids, mask, grid.reshape(-1, 3), image_token_id=cfg.image_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size)
  return model.language_model(embeds, mask, position_ids)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def encode_together(model: Qwen3_5Model, parts: list[Mapping[str, jax.Array]]
                    ) -> list[jax.Array]:
  """`encode` of several batches in one pass (e.g. queries with their documents).

  The batches are padded to a common length (and patch bucket) and stacked, so the
  model runs once on bigger matrices instead of once per batch; rows do not interact,
  so each result equals its own `encode`. Returns each batch's [B_i, L_i, H].
  """
  if len(parts) == 1:
    return [encode(model, parts[0])]
  keys = [k for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
          if k in parts[0]]
  joined = {}
  for key in keys:
    arrays = [jnp.asarray(p[key]) for p in parts]
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
    joined[key] = jnp.concatenate([_pad_to(a, (a.shape[0],) + shape) for a in arrays])
  hidden = encode(model, joined)
  out, start = [], 0
  for p in parts:
    b, length = p["input_ids"].shape
    out.append(hidden[start:start + b, :length])
    start += b
  return out


def gather_embeddings(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """Hidden states at `<emb_all>` positions, L2-normalised in fp32: [B, E, H]."""
  picked = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
  picked = picked.astype(jnp.float32)
  return picked / jnp.maximum(jnp.linalg.norm(picked, axis=-1, keepdims=True), 1e-12)


def numpy_batch(part: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """The arrays `encode` reads, as jax arrays (helper for eager use)."""
  keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
  return {k: jnp.asarray(part[k]) for k in keys if k in part}
