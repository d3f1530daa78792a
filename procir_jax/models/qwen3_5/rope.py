"""Rotary embeddings and the 3-D (temporal, height, width) text positions.

Tables are always built in fp32. Rotation is split-half (`rotate_half`), as in
the Qwen family, not pairwise-interleaved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first `cos.shape[-1]` features of x; the rest pass through.

  Computes x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1],
  half by half: the tables of this module
  repeat their first half in their second, so [x1, x2] becomes
  [x1 c - x2 s, x2 c + x1 s] with (c, s) the first halves, written once, with no
  negated or rotated copy of x.

  Args:
    x: [..., L, heads, head_dim].
    cos: [..., L, rotary_dim], broadcast over heads; its two halves are equal.
    sin: like cos.

  Returns:
    x rotated, in x's dtype (the rotation itself runs in fp32).
  """
  rot = cos.shape[-1]
  half = rot // 2
  c, s = cos[..., None, :half], sin[..., None, :half]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:rot].astype(jnp.float32)
  parts = [(x1 * c - x2 * s).astype(x.dtype), (x2 * c + x1 * s).astype(x.dtype)]
  if rot < x.shape[-1]:
    parts.append(x[..., rot:])
  return jnp.concatenate(parts, axis=-1)


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
  # fp32 throughout, so the table matches transformers' bit for bit.
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def text_rope_tables(position_ids: jax.Array, rotary_dim: int, theta: float,
                     mrope_section: tuple[int, int, int]):
  """cos/sin for interleaved multimodal RoPE.

  Frequency j takes its position from the height axis when j % 3 == 1 and
  j < 3 * mrope_section[1], from the width axis when j % 3 == 2 and
  j < 3 * mrope_section[2], and from the temporal axis otherwise.

  Args:
    position_ids: [3, B, L] integer (t, h, w) positions.
    rotary_dim: number of rotated features per head.
    theta: RoPE base.
    mrope_section: frequencies per axis (t, h, w).

  Returns:
    (cos, sin), each [B, L, rotary_dim] fp32.
  """
  inv = jnp.asarray(inverse_frequencies(rotary_dim, theta))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv  # [3, B, L, F]
  j = np.arange(rotary_dim // 2)
  axis = np.zeros_like(j)
  axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
  axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
  f = jnp.where(axis == 1, freqs[1], jnp.where(axis == 2, freqs[2], freqs[0]))
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def vision_rope_tables(rows: jax.Array, cols: jax.Array, head_dim: int,
                       theta: float):
  """cos/sin for the vision tower's 2-D rotary over the whole head.

  Args:
    rows: [N] patch row within its image.
    cols: [N] patch column within its image.
    head_dim: attention head dim of the vision tower.
    theta: RoPE base.

  Returns:
    (cos, sin), each [N, head_dim] fp32: [h freqs, w freqs, h freqs, w freqs].
  """
  inv = jnp.asarray(inverse_frequencies(head_dim // 2, theta))
  fh = rows.astype(jnp.float32)[:, None] * inv
  fw = cols.astype(jnp.float32)[:, None] * inv
  emb = jnp.concatenate([fh, fw, fh, fw], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def text_position_ids(batch: int, length: int) -> jax.Array:
  """[3, B, L] positions for text-only input: 0..L-1 on every axis."""
  pos = jnp.arange(length, dtype=jnp.int32)
  return jnp.broadcast_to(pos, (3, batch, length))


def multimodal_position_ids(input_ids: jax.Array,
                            attention_mask: jax.Array | None,
                            image_grid_thw: jax.Array, *, image_token_id: int,
                            spatial_merge_size: int, xp=jnp) -> jax.Array:
  """3-D positions for text and image tokens, as transformers computes them.

  Text tokens count up by one on all three axes. An image whose merged grid is
  (t, h, w) and which starts at position p gives its tokens (p + ti, p + hi,
  p + wi) in raster order, and the text after it continues at p + max(h, w).
  Padding positions get 0. Images are matched to `image_grid_thw` rows in the
  order their tokens appear, row by row through the batch. Everything here is
  traceable: `image_grid_thw` may be a traced array. With `xp=np` it runs in
  NumPy instead (the input pipeline computes positions on the host).

  Args:
    input_ids: [B, L] int.
    attention_mask: [B, L], 1 for real tokens, or None.
    image_grid_thw: [num_images, 3] patch grid of each image.
    image_token_id: the `<|image_pad|>` token id.
    spatial_merge_size: patches merged per side into one token.
    xp: the array module, jax.numpy or numpy.

  Returns:
    [3, B, L] int32.
  """
  input_ids = xp.asarray(input_ids)
  valid = (xp.ones(input_ids.shape, bool) if attention_mask is None
           else xp.asarray(attention_mask).astype(bool))
  thw = xp.asarray(image_grid_thw, xp.int32).reshape(-1, 3)
  gt = thw[:, 0]
  gh = thw[:, 1] // spatial_merge_size
  gw = thw[:, 2] // spatial_merge_size
  counts = gt * gh * gw
  ends = xp.cumsum(counts)
  span = xp.maximum(gh, gw)

  is_img = (input_ids == image_token_id) & valid
  flat = is_img.reshape(-1).astype(xp.int32)
  rank = (xp.cumsum(flat) - 1).reshape(input_ids.shape)
  k = xp.clip(xp.searchsorted(ends, rank, side="right"), 0, thw.shape[0] - 1)
  o = rank - (ends[k] - counts[k])
  hk, wk = gh[k], gw[k]
  ti, hi, wi = o // (hk * wk), (o // wk) % hk, o % wk

  # Each text token advances the position by one, each image by its span.
  first = is_img & (o == 0)
  adv = xp.where(is_img, xp.where(first, span[k], 0), valid.astype(xp.int32))
  before = xp.cumsum(adv, axis=1) - adv
  base = xp.where(is_img & ~first, before - span[k], before)
  t = xp.where(is_img, base + ti, base)
  h = xp.where(is_img, base + hi, base)
  w = xp.where(is_img, base + wi, base)
  pos = xp.stack([t, h, w]).astype(xp.int32)
  return xp.where(valid[None], pos, 0)
