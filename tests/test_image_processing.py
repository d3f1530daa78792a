"""Image processing equals transformers' Qwen3.5 image processor.

transformers is the reference: both processors read the same
preprocessor_config.json, and pixel values must match bit for bit, for its Pillow
backend (compared with transformers itself) and its torchvision backend (compared
with the torch kernels that torchvision runs).
"""

import dataclasses
import json

import numpy as np
from PIL import Image
import pytest
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

from procir_jax.data import image_processing as ip

# Qwen3.5's released preprocessor_config.json, with ProCIR's pixel budget.
QWEN3_5_CONFIG = {
    "size": {"shortest_edge": 128 * 128, "longest_edge": 512 * 512},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}

SIZES = [
    (20, 30),  # upscaled to reach min_pixels
    (256, 256),  # already on the grid: no resampling
    (300, 700),
    (1000, 800),  # downscaled to max_pixels
    (333, 517),  # neither side a multiple of 28 or 32
    (45, 1000),  # wide: height pinned near one merge block
    (31, 29),
]


def _write_config(directory, config):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / ip.CONFIG_NAME).write_text(json.dumps(config))
  return directory


def _image(height, width, channels=3, seed=0):
  """Smooth shapes plus noise: both clipping and smooth resampling matter."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  phases = rng.uniform(0, 6, size=channels)
  smooth = np.stack([np.sin(x / 9 + p) * np.cos(y / 13 - p) for p in phases],
                    axis=-1)
  noise = rng.normal(0, 40, size=(height, width, channels))
  return np.clip(127.5 + 110 * smooth + noise, 0, 255).astype(np.uint8)


def _hf_call(processor, images):
  out = processor(images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def _assert_same(ours, hf_out):
  pixel_values, grid_thw = hf_out
  assert ours.pixel_values.dtype == np.float32
  assert ours.image_grid_thw.dtype == np.int32
  np.testing.assert_array_equal(ours.image_grid_thw, grid_thw)
  np.testing.assert_array_equal(ours.pixel_values, pixel_values)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return _write_config(tmp_path_factory.mktemp("qwen3_5"), QWEN3_5_CONFIG)


@pytest.fixture(scope="module")
def hf(model_dir):
  # The PIL backend is what AutoImageProcessor picks without torchvision.
  return transformers.AutoImageProcessor.from_pretrained(
      model_dir, backend="pil")


@pytest.fixture(scope="module")
def ours(model_dir):
  return ip.ImageProcessor.from_pretrained(model_dir, backend="pil")


def test_reads_the_config_like_transformers(hf, ours):
  assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
  assert ours.min_pixels == hf.size["shortest_edge"] == 128 * 128
  assert ours.max_pixels == hf.size["longest_edge"] == 512 * 512
  assert (ours.patch_size, ours.merge_size, ours.temporal_patch_size) == (
      hf.patch_size, hf.merge_size, hf.temporal_patch_size)
  assert ours.image_mean == tuple(hf.image_mean)
  assert ours.image_std == tuple(hf.image_std)
  assert ours.resample == hf.resample == Image.Resampling.BICUBIC
  assert ours.patch_dim == 1536
  # Built directly, the defaults are the same Qwen3.5 + ProCIR settings.
  assert ip.ImageProcessor(backend="pil") == ours
  assert ip.ImageProcessor().backend == "torchvision"  # as the release runs


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers(hf, ours, size):
  image = _image(*size)
  out = ours(image)
  _assert_same(out, _hf_call(hf, image))
  t, gh, gw = ours.grid_for(*size)
  assert out.pixel_values.shape == (t * gh * gw, 1536)
  assert ours.num_image_tokens(*size) == gh * gw // 4
  assert t * gh * gw == hf.get_number_of_image_patches(*size)
  # Area within budget, sides on the 32-pixel grid of merged patches.
  assert 128 * 128 <= gh * gw * 16 * 16 <= 512 * 512


def test_upscale_and_downscale_grids(ours):
  assert ours.grid_for(20, 30) == (1, 8, 10)
  assert ours.grid_for(1000, 800) == (1, 34, 28)
  assert ours.grid_for(256, 256) == (1, 16, 16)
  assert ours.num_image_tokens(256, 256) == 64


def test_pil_input_equals_array_input(hf, ours):
  array = _image(97, 131)
  pil = Image.fromarray(array)
  _assert_same(ours(pil), _hf_call(hf, pil))
  np.testing.assert_array_equal(ours(pil).pixel_values,
                                ours(array).pixel_values)


def test_grayscale_is_converted_to_rgb(hf, ours):
  grey = _image(150, 90, channels=1)
  expected = _hf_call(hf, Image.fromarray(grey[..., 0]))
  _assert_same(ours(Image.fromarray(grey[..., 0])), expected)
  _assert_same(ours(grey), _hf_call(hf, grey))  # (H, W, 1)
  _assert_same(ours(grey[..., 0]), expected)  # (H, W)
  patches = ours(grey).pixel_values.reshape(-1, 3, 2 * 16 * 16)
  np.testing.assert_array_equal(patches[:, 0], patches[:, 2])


def test_transparency_is_composited_on_white(hf, ours):
  rgba = _image(120, 140, channels=4, seed=3)
  _assert_same(ours(rgba), _hf_call(hf, rgba))
  pil = Image.fromarray(rgba)
  _assert_same(ours(pil), _hf_call(hf, pil))


def test_batch_of_different_sizes(hf, ours):
  images = [_image(*size, seed=i) for i, size in enumerate(SIZES)]
  images.append(Image.fromarray(_image(64, 200, channels=1)[..., 0]))
  out = ours(images)
  _assert_same(out, _hf_call(hf, images))
  # Each image's rows are its own call's output, in input order.
  singles = [ours(image).pixel_values for image in images]
  np.testing.assert_array_equal(out.pixel_values, np.concatenate(singles))
  rows = [ours.grid_for(*np.asarray(im).shape[:2]) for im in images]
  np.testing.assert_array_equal(out.image_grid_thw, rows)


def test_empty_batch(ours):
  out = ours([])
  assert out.pixel_values.shape == (0, 1536)
  assert out.image_grid_thw.shape == (0, 3)


def test_smart_resize_matches_transformers():
  reference = image_processing_pil_qwen2_vl.smart_resize
  sizes = range(1, 2400, 23)
  for min_pixels, max_pixels in [(128 * 128, 512 * 512),
                                 (65536, 16777216)]:
    for h in sizes:
      for w in sizes:
        if max(h, w) / min(h, w) > 200:
          continue
        assert ip.smart_resize(h, w, 32, min_pixels, max_pixels) == (
            reference(h, w, 32, min_pixels, max_pixels)), (h, w)


def test_config_variants_read_like_transformers(tmp_path):
  image = _image(200, 420)
  configs = {
      # Top-level min/max pixels win over `size`, as in transformers.
      "pixels": dict(QWEN3_5_CONFIG, min_pixels=64 * 64, max_pixels=256 * 256),
      # Missing keys take transformers' defaults: CLIP mean/std, patch 14.
      "bare": {"image_processor_type": "Qwen2VLImageProcessor"},
      "no_normalize": dict(QWEN3_5_CONFIG, do_normalize=False),
      "no_rescale": dict(QWEN3_5_CONFIG, do_rescale=False, do_normalize=False),
      "bilinear": dict(QWEN3_5_CONFIG, resample=2),
  }
  for name, config in configs.items():
    directory = _write_config(tmp_path / name, config)
    hf = transformers.AutoImageProcessor.from_pretrained(
        directory, backend="pil")
    ours = ip.ImageProcessor.from_pretrained(directory, backend="pil")
    _assert_same(ours(image), _hf_call(hf, image))
  bare = ip.ImageProcessor.from_pretrained(tmp_path / "bare")
  assert bare.patch_size == 14 and bare.image_mean[0] == 0.48145466


def test_overrides_and_save_round_trip(tmp_path):
  # A Qwen3.5 checkpoint's own budget, overridden with ProCIR's.
  checkpoint = dict(QWEN3_5_CONFIG,
                    size={"shortest_edge": 65536, "longest_edge": 16777216})
  directory = _write_config(tmp_path / "checkpoint", checkpoint)
  ours = ip.ImageProcessor.from_pretrained(
      directory / ip.CONFIG_NAME, min_pixels=ip.PROCIR_MIN_PIXELS,
      max_pixels=ip.PROCIR_MAX_PIXELS)
  assert ours == ip.ImageProcessor()
  assert ip.ImageProcessor.from_pretrained(directory).min_pixels == 65536

  saved = tmp_path / "saved"
  ours.save_pretrained(saved)
  assert ip.ImageProcessor.from_pretrained(saved) == ours
  hf = transformers.AutoImageProcessor.from_pretrained(saved, backend="pil")
  image = _image(300, 700)
  _assert_same(dataclasses.replace(ours, backend="pil")(image), _hf_call(hf, image))


def test_errors_say_what_is_wrong(tmp_path, ours):
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    ip.ImageProcessor.from_pretrained(tmp_path)
  (tmp_path / ip.CONFIG_NAME).write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ip.ImageProcessor.from_pretrained(tmp_path)
  with pytest.raises(TypeError, match="uint8"):
    ours(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match="channels-last"):
    ours(np.zeros((64, 64, 2), np.uint8))
  with pytest.raises(ValueError, match="aspect ratio"):
    ours.num_image_tokens(10, 2500)
  with pytest.raises(ValueError, match="multiples of 32"):
    ip.ImageProcessor(do_resize=False).grid_for(100, 64)
  with pytest.raises(ValueError, match="min_pixels"):
    ip.ImageProcessor(min_pixels=10, max_pixels=5)
  with pytest.raises(ValueError, match="image_mean"):
    ip.ImageProcessor(image_mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="backend"):
    ip.ImageProcessor(backend="cv2")
  with pytest.raises(NotImplementedError, match="backend='pil'"):
    ip.ImageProcessor(resample=2)


@pytest.mark.parametrize("backend", ip.BACKENDS)
@pytest.mark.parametrize("norm", [dict(), dict(image_mean=(0.48145466, 0.4578275,
                                                          0.40821073),
                                            image_std=(0.26862954, 0.26130258,
                                                       0.27577711))])
def test_uint8_patches_normalised_on_the_device_equal_the_processor(norm, backend):
  """The pipeline sends uint8 patches of one frame; the device's rescale and
  normalisation give the processor's values up to float32 rounding, for every level:
  at most two rounding steps of the result (values lie in [-2.2, 2.8], where a step
  is at most 2.4e-7). The Pillow backend rescales in float64; XLA may divide by
  multiplying with the reciprocal."""
  import jax.numpy as jnp

  proc = ip.ImageProcessor(backend=backend, **norm)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (64, 96, 3), np.uint8),
            rng.integers(0, 256, (128, 128, 3), np.uint8)]
  patches = proc.patchify(images)
  assert patches.patches.dtype == np.uint8
  assert patches.patches.shape[1] == 3 * 16 * 16
  full = proc(images)
  np.testing.assert_array_equal(patches.image_grid_thw, full.image_grid_thw)
  np.testing.assert_array_equal(proc.normalize(patches.patches), full.pixel_values)
  levels = np.tile(np.arange(256, dtype=np.uint8), 3)[None]  # every level, channel
  host = proc.normalize(levels).reshape(1, 3, 2, 256)
  np.testing.assert_array_equal(host[:, :, 0], host[:, :, 1])  # the repeated frame
  device = np.asarray(proc.pixel_norm(jnp.asarray(levels), jnp)).reshape(1, 3, 256)
  np.testing.assert_allclose(device, host[:, :, 0], rtol=0, atol=4.8e-7)


def _torchvision_reference(image, size, config):
  """pixel_values as transformers' torchvision backend computes them, through the
  torch ops that torchvision calls: on the CPU, `tvF.resize(uint8, BICUBIC,
  antialias=True)` is torch's native uint8 `interpolate`, and `tvF.normalize` is
  `sub(mean).div(std)` with the rescale folded into float32 mean and std.
  (torchvision is not installable beside the CPU torch build from PyPI, so the test
  calls those ops itself.)"""
  torch = pytest.importorskip("torch")
  x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
  if tuple(x.shape[2:]) != size:
    x = torch.nn.functional.interpolate(x, size=list(size), mode="bicubic",
                                        align_corners=False, antialias=True)
  fold = 1.0 / config["rescale_factor"]
  mean = (torch.tensor(config["image_mean"]) * fold).view(-1, 1, 1)
  std = (torch.tensor(config["image_std"]) * fold).view(-1, 1, 1)
  x = x.to(torch.float32).sub(mean).div(std).numpy()[0]
  # Qwen2-VL's patch order, the still frame repeated over the temporal patch.
  p, m, t = config["patch_size"], config["merge_size"], config["temporal_patch_size"]
  c, h, w = x.shape
  x = np.broadcast_to(x[None], (t, c, h, w))
  x = x.reshape(t, c, h // p // m, m, p, w // p // m, m, p)
  return x.transpose(2, 5, 3, 6, 1, 0, 4, 7).reshape(h * w // p // p, c * t * p * p)


def test_torchvision_backend_equals_torchs_kernels(model_dir):
  ours = ip.ImageProcessor.from_pretrained(model_dir)
  assert ours.backend == "torchvision"
  for i, size in enumerate(SIZES + [(97, 131), (2000, 300)]):
    image = _image(*size, seed=i)
    expected = _torchvision_reference(image, ours.resized_size(*size),
                                      QWEN3_5_CONFIG)
    np.testing.assert_array_equal(ours(image).pixel_values, expected, err_msg=size)


def test_exif_rotated_jpeg_decodes_as_the_release_opens_it():
  """The release reads views with `Image.open(p).convert("RGB")`, which does not apply
  the EXIF orientation: a JPEG tagged "rotate 90" keeps its stored shape and pixels."""
  import io

  from procir_jax.data.examples import decode_image

  pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
  data = buffer.getvalue()
  with Image.open(io.BytesIO(data)) as opened:
    assert opened.getexif()[0x0112] == 6
    release = np.asarray(opened.convert("RGB"))
  decoded = decode_image(data, "a rotated view")
  assert decoded.shape == (24, 40, 3)
  np.testing.assert_array_equal(decoded, release)
