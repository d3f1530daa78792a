"""The vision tower: patch embedding, ViT blocks and the 2x2 patch merger.

Images arrive packed as the Hugging Face Qwen2-VL image processor returns them:
`pixel_values` [num_patches, C * temporal_patch * patch * patch] with each
image's patches in spatial-merge-block order, and `image_grid_thw`
[num_images, 3] giving each image's (t, h, w) patch grid. Attention never
crosses from one image (frame) to another.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from procir_jax.models.qwen3_5 import rope
from procir_jax.models.qwen3_5.config import Qwen3_5VisionConfig
from procir_jax.models.qwen3_5.layer_stack import run_layers
from procir_jax.models.qwen3_5.layers import (LayerNorm, activation, attention,
                                              linear)
from procir_jax.models.qwen3_5.options import ModelOptions


@dataclasses.dataclass
class VisionLayout:
  """Per-patch index arrays derived from `image_grid_thw`.

  Attention runs over `num_segments` rows of `max_len` slots. `gather` picks
  each slot's patch (None: the patches already form those rows, in order),
  `kv_lengths` counts each row's real slots, which come first (None: all are
  real), `segment` gives each slot's frame id when one row holds several frames
  (None: one frame per row), and `scatter` brings slot outputs back to patch
  order (None: reshape suffices).
  """

  interp_index: Any  # [N, 4] rows of the learned position table
  interp_weight: Any  # [N, 4] bilinear weights
  rows: Any  # [N] patch row within its image
  cols: Any  # [N] patch column within its image
  num_segments: int
  max_len: int
  gather: Any = None
  kv_lengths: Any = None
  segment: Any = None
  scatter: Any = None


def position_taps(rows, cols, height, width, cfg: Qwen3_5VisionConfig, xp=jnp):
  """Rows of the learned position table and bilinear weights for each patch.

  The square table is resampled to each image's (height, width) grid with aligned
  corners and border-clamped taps. Returns ([N, 4] indices, [N, 4] weights).
  """
  side = int(math.isqrt(cfg.num_position_embeddings))
  f32 = np.float32

  def taps(index, size):
    src = (index.astype(f32) * f32(side - 1) /
           xp.maximum(size - 1, 1).astype(f32))
    lo = xp.floor(src)
    frac = (src - lo).astype(f32)
    lo = lo.astype(xp.int32)
    idx = xp.stack([xp.clip(lo, 0, side - 1), xp.clip(lo + 1, 0, side - 1)], -1)
    wts = xp.stack([1 - frac, frac], -1).astype(f32)
    return idx, wts

  r_idx, r_w = taps(rows, height)
  c_idx, c_w = taps(cols, width)
  index = (r_idx[..., :, None] * side + c_idx[..., None, :]).reshape(-1, 4)
  weight = (r_w[..., :, None] * c_w[..., None, :]).reshape(-1, 4)
  return index, weight


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def make_layout(image_grid_thw, num_patches: int, cfg: Qwen3_5VisionConfig,
                max_patches_per_image: int | None = None) -> VisionLayout:
  """Computes where every patch sits, for the position table and attention.

  With a concrete `image_grid_thw` (numpy, a list, or a non-traced array) the
  layout is built on the host and attention is batched per image with no
  wasted work when all images share a size. With a traced grid, attention is
  batched per image when `max_patches_per_image` bounds the image size (images
  only, t == 1), and otherwise falls back to one masked attention over all
  patches, which is exact but quadratic in the total patch count.

  Args:
    image_grid_thw: [num_images, 3] (t, h, w) patch grid per image.
    num_patches: rows of `pixel_values`.
    cfg: the vision config.
    max_patches_per_image: optional static bound on t * h * w per image.

  Returns:
    A VisionLayout.
  """
  concrete = _is_concrete(image_grid_thw)
  xp = np if concrete else jnp
  thw = (np.asarray(image_grid_thw).astype(np.int64) if concrete else
         jnp.asarray(image_grid_thw, jnp.int32))
  if thw.ndim != 2 or thw.shape[1] != 3:
    raise ValueError(f"image_grid_thw must be [num_images, 3], got shape "
                     f"{tuple(thw.shape)}.")
  m = cfg.spatial_merge_size
  if concrete:
    total = int((thw[:, 0] * thw[:, 1] * thw[:, 2]).sum())
    if total != num_patches:
      raise ValueError(
          f"image_grid_thw describes {total} patches but pixel_values has "
          f"{num_patches} rows; pass both as the image processor returns "
          "them.")
    if np.any(thw[:, 1:] % m):
      raise ValueError(f"Every grid h and w must be a multiple of the spatial "
                       f"merge size {m}; got {thw.tolist()}.")

  t, h, w = thw[:, 0], thw[:, 1], thw[:, 2]
  counts = t * h * w
  ends = xp.cumsum(counts)
  starts = ends - counts
  p = xp.arange(num_patches)
  img = xp.clip(xp.searchsorted(ends, p, side="right"), 0, thw.shape[0] - 1)
  local = p - starts[img]
  hi, wi = h[img], w[img]
  frame = local // (hi * wi)
  within = local % (hi * wi)
  # Patches come in spatial-merge-block order: (block row, block col, r, c).
  in_col = within % m
  in_row = (within // m) % m
  block_col = (within // (m * m)) % (wi // m)
  block_row = within // (m * m * (wi // m))
  rows = block_row * m + in_row
  cols = block_col * m + in_col

  interp_index, interp_weight = position_taps(rows, cols, hi, wi, cfg, xp)
  f32 = np.float32
  layout = dict(interp_index=interp_index.astype(np.int32),
                interp_weight=interp_weight.astype(f32),
                rows=rows.astype(np.int32), cols=cols.astype(np.int32))

  if concrete:
    seg_len = np.repeat(h * w, t)
    num_segments, max_len = len(seg_len), int(seg_len.max())
    if np.all(seg_len == max_len):
      return VisionLayout(**layout, num_segments=num_segments, max_len=max_len)
    seg_start = np.cumsum(seg_len) - seg_len
    seg = (np.repeat(np.arange(num_segments), seg_len))
    return VisionLayout(
        **layout, num_segments=num_segments, max_len=max_len,
        **_padded_segments(np, seg_start, seg_len, max_len, num_patches,
                           seg, p - seg_start[seg]))
  if max_patches_per_image is not None:
    return VisionLayout(
        **layout, num_segments=thw.shape[0], max_len=max_patches_per_image,
        **_padded_segments(jnp, starts, counts, max_patches_per_image,
                           num_patches, img, local))
  frame_offset = jnp.cumsum(t) - t
  return VisionLayout(**layout, num_segments=1, max_len=num_patches,
                      segment=(frame_offset[img] + frame)[None].astype(
                          jnp.int32))


def _padded_segments(xp, seg_start, seg_len, max_len, num_patches, seg, pos):
  """Index arrays that lay each segment out in its own zero-padded row."""
  j = xp.arange(max_len)
  gather = xp.clip(seg_start[:, None] + j, 0, num_patches - 1)
  scatter = seg * max_len + pos
  return dict(gather=gather.astype(np.int32),
              kv_lengths=xp.maximum(seg_len, 1).astype(np.int32),
              scatter=scatter.astype(np.int32))


class VisionAttention(nnx.Module):
  """Bidirectional attention within each image, with 2-D rotary."""

  def __init__(self, cfg: Qwen3_5VisionConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.options = options
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype,
              std=cfg.initializer_range, rngs=rngs)
    self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
    self.proj = linear(cfg.hidden_size, cfg.hidden_size, **kw)

  def __call__(self, x: jax.Array, cos, sin, layout: VisionLayout):
    n = x.shape[0]
    qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q = rope.apply_rotary(q, cos, sin)
    k = rope.apply_rotary(k, cos, sin)
    s, length = layout.num_segments, layout.max_len

    def rows(a):
      if layout.gather is None:
        return a.reshape(s, length, *a.shape[1:])
      return jnp.take(a, jnp.asarray(layout.gather), axis=0)

    out = attention(rows(q), rows(k), rows(v), scale=1.0 / math.sqrt(self.head_dim),
                    kv_lengths=layout.kv_lengths, segment_ids=layout.segment,
                    impl=self.options.attention,
                    interpret=self.options.interpret_kernels)
    out = out.reshape(s * length, -1)
    if layout.scatter is not None:
      out = jnp.take(out, jnp.asarray(layout.scatter), axis=0)
    return self.proj(out)


class VisionMLP(nnx.Module):

  def __init__(self, cfg: Qwen3_5VisionConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype,
              std=cfg.initializer_range, rngs=rngs)
    self.linear_fc1 = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.linear_fc2 = linear(cfg.intermediate_size, cfg.hidden_size, **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x):
    return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: Qwen3_5VisionConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
    self.norm2 = LayerNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, options=options, **kw)
    self.mlp = VisionMLP(cfg, **kw)

  def __call__(self, x, cos, sin, layout):
    x = x + self.attn(self.norm1(x), cos, sin, layout)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """LayerNorm, then each 2x2 block of patches -> MLP -> one text token."""

  def __init__(self, cfg: Qwen3_5VisionConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype,
              std=cfg.initializer_range, rngs=rngs)
    self.norm = LayerNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
    self.linear_fc1 = linear(self.merged, self.merged, **kw)
    self.linear_fc2 = linear(self.merged, cfg.out_hidden_size, **kw)

  def __call__(self, x):
    x = self.norm(x).reshape(-1, self.merged)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionModel(nnx.Module):
  """pixel_values [N, patch_dim] -> merged image tokens [N / merge**2, out]."""

  def __init__(self, cfg: Qwen3_5VisionConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.config = cfg
    self.dtype = dtype
    self.options = options
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The Conv3d with stride == kernel is a matmul over flattened patches.
    self.patch_embed = linear(cfg.patch_dim, cfg.hidden_size, use_bias=True,
                              std=cfg.initializer_range, **kw)
    self.pos_embed = nnx.Embed(
        cfg.num_position_embeddings, cfg.hidden_size, param_dtype=param_dtype,
        embedding_init=jax.nn.initializers.normal(cfg.initializer_range),
        rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, options=options, **kw)
                            for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)

  def __call__(self, pixel_values: jax.Array, layout: VisionLayout):
    """pixel_values [N, patch_dim] as the image processor returns them."""
    return self.encode_embedded(self.patch_embed(pixel_values.astype(self.dtype)),
                                layout)

  def embed_still_patches(self, pixels: jax.Array) -> jax.Array:
    """Patch embeddings [N, hidden] of still-image patches [N, C * patch * patch].

    `pixels` are the normalised values of one frame (fp32), channel-major like the
    processor's patches but without the temporal repeat: the processor repeats a
    still frame `temporal_patch_size` times, so the patch embedding of the repeat
    is the embedding of the frame under the kernel summed over its temporal taps.
    That halves the patch embedding's bytes and FLOPs and is exact up to rounding.
    """
    cfg = self.config
    kernel = self.patch_embed.kernel[...].astype(jnp.float32)
    kernel = kernel.reshape(cfg.in_channels, cfg.temporal_patch_size,
                            cfg.patch_size ** 2, cfg.hidden_size).sum(axis=1)
    kernel = kernel.reshape(-1, cfg.hidden_size).astype(self.dtype)
    x = jnp.dot(pixels.astype(self.dtype), kernel,
                preferred_element_type=jnp.float32)
    if self.patch_embed.bias is not None:
      x = x + self.patch_embed.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)

  def encode_embedded(self, x: jax.Array, layout: VisionLayout):
    """The tower after the patch embedding: [N, hidden] -> merged image tokens."""
    table = self.pos_embed.embedding[...]
    pos = jnp.take(table, jnp.asarray(layout.interp_index), axis=0)
    pos = jnp.sum(pos * jnp.asarray(layout.interp_weight)[..., None].astype(
        table.dtype), axis=1)
    x = x + pos.astype(x.dtype)
    cos, sin = rope.vision_rope_tables(jnp.asarray(layout.rows),
                                       jnp.asarray(layout.cols),
                                       self.config.head_dim,
                                       self.config.rope_theta)
    x = run_layers(list(self.blocks), x,
                   lambda block, x: block(x, cos, sin, layout), self.options)
    return self.merger(x)
