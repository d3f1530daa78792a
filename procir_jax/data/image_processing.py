"""Qwen2-VL style image preprocessing for Qwen3.5, in NumPy and Pillow.

An image is resized so that both sides are multiples of `patch_size *
merge_size` and its area lies in [min_pixels, max_pixels], rescaled to [0, 1],
normalised, and cut into flat patches in the order the Qwen3.5 vision tower
expects:

  (grid_t, grid_h / merge, grid_w / merge, merge, merge, channel, temporal,
   patch, patch)

where the first five axes are flattened into rows and the last four into the
patch vector (3 * 2 * 16 * 16 = 1536 values for Qwen3.5). A still image is one
temporal patch: its frame is repeated `temporal_patch_size` times.

The output equals what transformers' `AutoImageProcessor.from_pretrained` returns
for Qwen3.5, for either of its backends (`backend`):

  "torchvision"  the default, and what the released evaluation runs (it installs
                 torchvision): images resize with PyTorch's uint8 bicubic kernel
                 (reproduced in NumPy by `resampling`) and normalise with the
                 rescale factor folded into the mean and std;
  "pil"          transformers' `Qwen2VLImageProcessorPil`, its choice without
                 torchvision: Pillow's bicubic filter, rescale then normalise.

The two resize to the same grid and differ by one grey level (rarely two) in
about 0.5% of the resized values, and by up to one float32 rounding step after
normalising.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

from procir_jax.data import resampling

CONFIG_NAME = "preprocessor_config.json"
# What AutoProcessor builds around a Qwen3.5 image processor.
PROCESSOR_CLASS = "Qwen3VLProcessor"
BACKENDS = ("torchvision", "pil")

# What ProCIR feeds Qwen3.5: the checkpoint's patching and normalisation with a
# smaller pixel budget than the checkpoint's own (65536 to 16777216 pixels).
PROCIR_MIN_PIXELS = 128 * 128
PROCIR_MAX_PIXELS = 512 * 512

# transformers' class defaults, used for keys a preprocessor_config.json leaves
# out, so that a file is read the way transformers reads it.
_HF_DEFAULTS = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": (0.48145466, 0.4578275, 0.40821073),
    "image_std": (0.26862954, 0.26130258, 0.27577711),
    "rescale_factor": 1 / 255,
    "resample": 3,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
}
_MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
  """Target size: sides multiples of `factor`, area near [min, max] pixels.

  Keeps the aspect ratio as well as the rounding allows. The arithmetic follows
  transformers step by step (Python's round-half-even included), since a
  one-off size here changes the number of image tokens.

  Args:
    height: Input height in pixels.
    width: Input width in pixels.
    factor: The multiple both output sides must be (patch_size * merge_size).
    min_pixels: Smallest area wanted.
    max_pixels: Largest area allowed.

  Returns:
    (height, width) to resize to.

  Raises:
    ValueError: if a side is not positive or the aspect ratio exceeds 200.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
    raise ValueError(
        f"image of {height}x{width} has an aspect ratio over "
        f"{_MAX_ASPECT_RATIO}; crop or pad it first")
  new_h = round(height / factor) * factor
  new_w = round(width / factor) * factor
  if new_h * new_w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    new_h = max(factor, math.floor(height / beta / factor) * factor)
    new_w = max(factor, math.floor(width / beta / factor) * factor)
  elif new_h * new_w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    new_h = math.ceil(height * beta / factor) * factor
    new_w = math.ceil(width * beta / factor) * factor
  return new_h, new_w


def to_rgb_array(image: Any) -> np.ndarray:
  """An RGB uint8 array (H, W, 3) from a PIL image or a uint8 array.

  Arrays are channels-last: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
  Grey levels are copied to all three channels; transparent pixels are
  composited onto white, as transformers does.

  Args:
    image: A PIL image of any mode, or a uint8 NumPy array.

  Returns:
    A uint8 array of shape (H, W, 3).
  """
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))

  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise TypeError(
        f"image arrays must be uint8 with values 0..255, got {array.dtype}; "
        "convert with np.clip(x * 255, 0, 255).round().astype(np.uint8) "
        "for floats in [0, 1]")
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(
        "image arrays must be channels-last (H, W), (H, W, 1), (H, W, 3) or "
        f"(H, W, 4), got shape {array.shape}")
  channels = array.shape[-1]
  if channels == 1:
    return np.repeat(array, 3, axis=-1)
  if channels == 4:
    alpha = array[..., 3:] / 255.0
    blended = alpha * array[..., :3] + (1.0 - alpha) * 255.0
    return np.round(blended).astype(np.uint8)
  return array


@dataclasses.dataclass(frozen=True)
class ImagePatches:
  """Resized images cut into patches, still as uint8 pixels of one frame.

  This is what the input pipeline sends to the accelerator: a quarter of the bytes
  of float32 and an eighth of the processor's patches (no temporal repeat).
  `ImageProcessor.normalize` (host) and `PixelNorm` (device) finish the job.

  Attributes:
    patches: uint8 [total_patches, 3 * patch * patch], channel-major like the
      processor's patches; the images one after another, in input order.
    image_grid_thw: int32 [num_images, 3]; each image's (t, h, w) patch grid.
  """

  patches: np.ndarray
  image_grid_thw: np.ndarray


@dataclasses.dataclass(frozen=True)
class PixelNorm:
  """The processor's rescale and normalisation, for patches on the device.

  uint8 in, float32 out, equal to `ImageProcessor.normalize` up to float32 rounding:
  at most two rounding steps of the result (e.g. 2.4e-7 for Qwen's values in
  [-1, 1]), as the Pillow backend rescales in float64 and XLA may divide by
  multiplying with the reciprocal.
  """

  rescale_factor: float | None  # None: no rescaling
  mean: tuple[float, float, float] | None  # None: no normalising
  std: tuple[float, float, float] | None

  def __call__(self, patches, xp):
    """uint8 [..., C * p * p] -> float32 of the same shape (xp: numpy or jnp)."""
    channels = 3
    x = patches.astype(xp.float32)
    x = x.reshape(patches.shape[:-1] + (channels, patches.shape[-1] // channels))
    if self.rescale_factor is not None:
      x = x * xp.float32(self.rescale_factor)
    if self.mean is not None:
      mean = xp.asarray(self.mean, xp.float32)[:, None]
      std = xp.asarray(self.std, xp.float32)[:, None]
      x = (x - mean) / std
    return x.reshape(patches.shape)


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
  """Patches of a batch of images, ready for the vision tower.

  Attributes:
    pixel_values: float32 [total_patches, 3 * temporal * patch * patch]; the
      images' patches one after another, in input order.
    image_grid_thw: int32 [num_images, 3]; each image's (t, h, w) patch grid.
  """

  pixel_values: np.ndarray
  image_grid_thw: np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Turns images into Qwen3.5 vision patches.

  Defaults are Qwen3.5's settings with ProCIR's pixel budget. Use
  `from_pretrained` to read a checkpoint's preprocessor_config.json instead.

  Attributes:
    min_pixels: Images smaller than this area are upscaled.
    max_pixels: Images larger than this area are downscaled.
    patch_size: Side of a vision patch in pixels.
    merge_size: Side of the group of patches the merger turns into one token.
    temporal_patch_size: Frames per temporal patch; a still image is repeated.
    image_mean: Per-channel mean, on the [0, 1] scale.
    image_std: Per-channel standard deviation, on the [0, 1] scale.
    rescale_factor: Multiplies the uint8 values before normalising.
    resample: Pillow resampling filter (3 is bicubic).
    do_resize: Resize (else sides must already be multiples of
      patch_size * merge_size).
    do_rescale: Apply `rescale_factor`.
    do_normalize: Apply `image_mean` and `image_std`.
    backend: Which of transformers' backends to reproduce (see the module doc):
      "torchvision" (as the released evaluation runs) or "pil". A runtime choice,
      like transformers': preprocessor_config.json does not record it.
  """

  min_pixels: int = PROCIR_MIN_PIXELS
  max_pixels: int = PROCIR_MAX_PIXELS
  patch_size: int = 16
  merge_size: int = 2
  temporal_patch_size: int = 2
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  rescale_factor: float = 1 / 255
  resample: int = Image.Resampling.BICUBIC.value
  do_resize: bool = True
  do_rescale: bool = True
  do_normalize: bool = True
  backend: str = "torchvision"
  # Value of every uint8 level after rescaling and normalising, per channel.
  _table: np.ndarray = dataclasses.field(
      init=False, repr=False, compare=False)

  def __post_init__(self):
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be a positive integer, "
                         f"got {getattr(self, name)!r}")
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(
          "need 0 < min_pixels <= max_pixels, got "
          f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}")
    if self.resample not in {r.value for r in Image.Resampling}:
      raise ValueError(f"resample must be a Pillow filter code 0..5, "
                       f"got {self.resample!r}")
    object.__setattr__(self, "resample", int(self.resample))
    if self.backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
    if (self.backend == "torchvision" and self.do_resize
        and self.resample != Image.Resampling.BICUBIC):
      raise NotImplementedError(
          f"the torchvision backend is reproduced for bicubic resampling (3), which "
          f"Qwen3.5 uses; got resample={self.resample}. Use backend='pil'.")
    object.__setattr__(self, "image_mean", _per_channel(self.image_mean,
                                                        "image_mean"))
    object.__setattr__(self, "image_std", _per_channel(self.image_std,
                                                       "image_std"))
    object.__setattr__(self, "_table", self._level_table())

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike[str],
                      **overrides: Any) -> ImageProcessor:
    """Reads a Hugging Face preprocessor_config.json.

    Args:
      path: A model directory holding preprocessor_config.json, or the file.
      **overrides: Fields to set regardless of the file, e.g. ProCIR's
        `min_pixels=PROCIR_MIN_PIXELS, max_pixels=PROCIR_MAX_PIXELS`.

    Returns:
      The processor.
    """
    path = os.fspath(path)
    file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f"{file} not found: a Qwen3.5 model directory holds the image "
          f"processor settings in {CONFIG_NAME} (size, patch_size, "
          "merge_size, image_mean, ...)")
    with open(file, encoding="utf-8") as f:
      try:
        config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    return cls.from_hf_config(config, **overrides)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any],
                     **overrides: Any) -> ImageProcessor:
    """Builds the processor from the contents of a preprocessor_config.json.

    Keys the file leaves out take transformers' class defaults (CLIP mean and
    std, 14-pixel patches), not this class's, so that a file means what it
    means to transformers. Top-level min_pixels/max_pixels win over `size`,
    as in transformers.

    Args:
      config: The parsed JSON.
      **overrides: Fields to set regardless of the file.

    Returns:
      The processor.
    """
    size = config.get("size") or {}
    values = dict(_HF_DEFAULTS)
    for ours, keys in (("min_pixels", ("shortest_edge", "min_pixels")),
                       ("max_pixels", ("longest_edge", "max_pixels"))):
      for key in keys:
        if size.get(key) is not None:
          values[ours] = size[key]
          break
      if config.get(ours) is not None:
        values[ours] = config[ours]
    for key in _HF_DEFAULTS:
      if key not in ("min_pixels", "max_pixels") and key in config:
        values[key] = config[key]
    values.update(overrides)
    return cls(**values)

  def to_hf_config(self) -> dict[str, Any]:
    """The settings as a preprocessor_config.json that transformers reads."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSOR_CLASS,
        # Both spellings of the pixel budget, as Qwen3.5's own file has them.
        "min_pixels": self.min_pixels,
        "max_pixels": self.max_pixels,
        "size": {"shortest_edge": self.min_pixels,
                 "longest_edge": self.max_pixels},
        "patch_size": self.patch_size,
        "merge_size": self.merge_size,
        "temporal_patch_size": self.temporal_patch_size,
        "image_mean": list(self.image_mean),
        "image_std": list(self.image_std),
        "rescale_factor": self.rescale_factor,
        "resample": self.resample,
        "do_resize": self.do_resize,
        "do_rescale": self.do_rescale,
        "do_normalize": self.do_normalize,
        "do_convert_rgb": True,
    }

  def save_pretrained(self, directory: str | os.PathLike[str]) -> str:
    """Writes preprocessor_config.json into `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    file = os.path.join(directory, CONFIG_NAME)
    with open(file, "w", encoding="utf-8") as f:
      json.dump(self.to_hf_config(), f, indent=2)
      f.write("\n")
    return file

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: 3 * temporal * patch * patch."""
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to."""
    factor = self.patch_size * self.merge_size
    if self.do_resize:
      return smart_resize(height, width, factor, self.min_pixels,
                          self.max_pixels)
    if height % factor or width % factor:
      raise ValueError(
          f"with do_resize=False both sides must be multiples of {factor} "
          f"(patch_size * merge_size), got {height}x{width}")
    return height, width

  def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of an image of this size."""
    new_h, new_w = self.resized_size(height, width)
    return 1, new_h // self.patch_size, new_w // self.patch_size

  def num_image_tokens(self, height: int, width: int) -> int:
    """How many <|image_pad|> tokens an image of this size takes."""
    t, h, w = self.grid_for(height, width)
    return t * h * w // self.merge_size ** 2

  def __call__(self, images: Any) -> ProcessedImages:
    """Processes one image or a sequence of images.

    Args:
      images: A PIL image or channels-last uint8 array, or a list of them;
        sizes may differ.

    Returns:
      The patches of all images, concatenated, and each image's grid.
    """
    patches = self.patchify(images)
    return ProcessedImages(self.normalize(patches.patches), patches.image_grid_thw)

  def patchify(self, images: Any) -> ImagePatches:
    """Resizes and cuts images into uint8 patches (no rescaling or normalising).

    Args:
      images: as for `__call__`.

    Returns:
      The uint8 patches of all images, concatenated, and each image's grid.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
      images = [images]
    resized = []
    for image in images:
      rgb = to_rgb_array(image)
      resized.append(self._resize(rgb, *self.resized_size(*rgb.shape[:2])))
    p = self.patch_size
    grids = np.asarray([(1, h // p, w // p) for h, w, _ in
                        (r.shape for r in resized)], np.int32).reshape(-1, 3)
    frame_dim = 3 * p * p
    # Each image writes straight into its rows: no per-image copies to join.
    patches = np.empty((int(grids.prod(axis=1).sum()), frame_dim), np.uint8)
    start = 0
    for rgb, (t, gh, gw) in zip(resized, grids):
      end = start + t * gh * gw
      self._patchify(rgb, patches[start:end])
      start = end
    return ImagePatches(patches, grids)

  def normalize(self, patches: np.ndarray) -> np.ndarray:
    """float32 [N, patch_dim] processor patches from uint8 [N, 3 * patch * patch].

    Rescales and normalises every value and repeats the still frame over the
    temporal patch, exactly as transformers' processor does.
    """
    t = self.temporal_patch_size
    n = patches.shape[0]
    out = np.empty((n, 3, t, self.patch_size ** 2), np.float32)
    planes = patches.reshape(n, 3, self.patch_size ** 2)
    for c in range(3):
      # Broadcasting over the temporal axis repeats the still frame.
      out[:, c] = np.take(self._table[c], planes[:, c])[:, None, :]
    return out.reshape(n, self.patch_dim)

  @property
  def pixel_norm(self) -> PixelNorm:
    """The rescale and normalisation, to apply to uint8 patches on the device."""
    if self.backend == "torchvision" and self.do_rescale and self.do_normalize:
      # transformers' torchvision backend folds the rescale into the mean and std
      # (float32 tensors times 1 / rescale_factor) and normalises once.
      fold = np.float32(1.0 / self.rescale_factor)
      def folded(values):
        return tuple(float(np.float32(v) * fold) for v in values)
      return PixelNorm(None, folded(self.image_mean), folded(self.image_std))
    return PixelNorm(
        rescale_factor=float(self.rescale_factor) if self.do_rescale else None,
        mean=self.image_mean if self.do_normalize else None,
        std=self.image_std if self.do_normalize else None)

  def _resize(self, rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
      return rgb  # Pillow and torchvision also leave the pixels unchanged here.
    if self.backend == "torchvision":
      return resampling.resize_bicubic_uint8(rgb, height, width)
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (width, height), resample=self.resample)
    return np.asarray(resized)

  def _patchify(self, rgb: np.ndarray, out: np.ndarray) -> None:
    """Writes the uint8 patches of one resized image into `out` [rows, 3*p*p]."""
    p, m = self.patch_size, self.merge_size
    height, width, channels = rgb.shape
    gh, gw = height // p, width // p
    blocks = rgb.reshape(gh // m, m, p, gw // m, m, p, channels)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    out[:] = blocks.reshape(gh * gw, channels * p * p)

  def _level_table(self) -> np.ndarray:
    """float32 [3, 256]: each uint8 level of each channel, fully processed, in the
    same float operations as the backend, so that the values are bit-identical."""
    norm = self.pixel_norm
    levels = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
    if self.backend == "pil" and self.do_rescale:
      # Pillow backend: rescale in float64, cast to float32, normalise in float32.
      values = (levels.astype(np.float64) * self.rescale_factor).astype(np.float32)
      return PixelNorm(None, norm.mean, norm.std)(values.reshape(1, 768),
                                                 np).reshape(3, 256)
    return norm(levels.reshape(1, 768), np).reshape(3, 256)


def _per_channel(value: Any, name: str) -> tuple[float, float, float]:
  if np.ndim(value) == 0:
    return (float(value),) * 3
  values = tuple(float(v) for v in value)
  if len(values) != 3:
    raise ValueError(f"{name} needs 1 or 3 values, got {len(values)}")
  return values
