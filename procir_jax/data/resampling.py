"""Bicubic resizing of uint8 images as torchvision does it on the CPU, in NumPy.

transformers' torchvision image processors resize uint8 tensors with
`torchvision.transforms.v2.functional.resize(..., BICUBIC, antialias=True)`, which
on the CPU runs PyTorch's native uint8 kernel (`_upsample_bicubic2d_aa`). That kernel
follows Pillow's separable filter (Keys' cubic with a = -0.5, support widened by the
downscale factor, a horizontal pass then a vertical one, each rounded to uint8), but
quantises the filter weights to int16 with a precision chosen per pass, where Pillow
uses 22 fractional bits. The two disagree by one grey level in a fraction of a percent
of values; this module reproduces PyTorch's integer arithmetic exactly, so that
images resize as they do in the released evaluation (which installs torchvision)
without putting torch on this project's runtime path.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_CUBIC_A = -0.5  # Keys' cubic, as Pillow and PyTorch's antialiased kernels use
_CUBIC_SUPPORT = 2.0
_MAX_WEIGHT_BITS = 22


def _cubic(x: np.ndarray) -> np.ndarray:
  a, x = _CUBIC_A, np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def _int16_filter(in_size: int, out_size: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """(source index [out, taps], int weights [out, taps], fractional bits) of one
  pass, computed in float64 and quantised as PyTorch does for uint8 images."""
  scale = in_size / out_size
  support = _CUBIC_SUPPORT * max(scale, 1.0)
  taps = int(math.ceil(support)) * 2 + 1
  center = scale * (np.arange(out_size) + 0.5)
  # C casts truncate towards zero; the max() clamps the negative starts anyway.
  start = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  size = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64),
                            in_size) - start, 0, taps)
  j = np.arange(taps)
  weights = _cubic((j + start[:, None] - center[:, None] + 0.5) / max(scale, 1.0))
  weights = np.where(j < size[:, None], weights, 0.0)
  total = weights.sum(axis=1, keepdims=True)
  weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
  # The most fractional bits that keep the largest weight within int16.
  largest, bits = weights.max(), 0
  while bits < _MAX_WEIGHT_BITS and int(0.5 + largest * (1 << (bits + 1))) < 1 << 15:
    bits += 1
  scaled = weights * (1 << bits)
  quantised = np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int32)
  index = np.minimum(start[:, None] + j, in_size - 1)  # zero weights past the end
  return index, quantised, bits


def _resize_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  index, weights, bits = _int16_filter(image.shape[axis], out_size)
  shape = [1] * image.ndim
  shape[axis] = out_size
  source = image.astype(np.int32)
  # Sums stay below 2**31: 255 * sum(|w|) with sum(w) = 2**bits <= 2**22 / max(w).
  acc = np.take(source, index[:, 0], axis=axis) * weights[:, 0].reshape(shape)
  acc += 1 << (bits - 1)  # round half up before the shift
  term = np.empty_like(acc)
  for k in range(1, index.shape[1]):
    np.multiply(np.take(source, index[:, k], axis=axis),
                weights[:, k].reshape(shape), out=term)
    acc += term
  acc >>= bits
  return np.clip(acc, 0, 255).astype(np.uint8)


def resize_bicubic_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, C] resized to [height, width, C], bit-identical to
  `torch.nn.functional.interpolate(x, (height, width), mode="bicubic",
  antialias=True)` on a uint8 CPU tensor (torchvision's BICUBIC resize)."""
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} "
                     f"{image.shape}")
  if height < 1 or width < 1:
    raise ValueError(f"cannot resize to {height}x{width}")
  # Horizontal first, then vertical, each rounded to uint8, as the kernel does; an
  # axis whose size does not change is left alone.
  if image.shape[1] != width:
    image = _resize_axis(image, 1, width)
  if image.shape[0] != height:
    image = _resize_axis(image, 0, height)
  return image
