"""What the benchmarks share: model shapes, the HF config, FLOP counts, timing.

Both sides of a benchmark build their model from `hf_config(model)`: transformers
reads it directly and this port through `Qwen3_5Config.from_hf_dict`, so the two
always have the same shapes. The shapes are Qwen3_5Config's presets.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from procir_jax.models.qwen3_5 import Qwen3_5Config
from procir_jax.models.qwen3_5.config import QWEN3_5_TOKEN_IDS

# The benchmarks' model names (their --preset) and the Qwen3_5Config presets behind
# them: Qwen3.5-0.8B on an accelerator, the tests' tiny shape on a CPU in CI time.
MODELS = {"0.8b": "qwen3_5_0_8b", "tiny": "tiny"}

# Dense bf16 peak FLOP/s by device name (vendor datasheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's public figures."""

  name: str
  hbm_bytes: float  # HBM capacity
  peak_bf16: float  # dense bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s


# Cloud TPU chips, from Google's published system specifications (cloud.google.com/
# tpu/docs/system-architecture-tpu-vm and the per-version pages): per chip, HBM
# capacity, bf16 peak and HBM bandwidth. The compiler keeps a little of the HBM for
# itself (it reports 95.74 GiB usable on v5p, 15.75 GiB on v5e).
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * 2**30, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * 2**30, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * 2**30, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * 2**30, 918e12, 1640e9),
}


def tpu_chip(topology: str) -> Chip:
  """The chip of a topology name such as "v5p:2x2x1" or "v6e:4x4"."""
  version = topology.split(":")[0].lower()
  version = {"v5litepod": "v5e", "v6litepod": "v6e"}.get(version, version)
  if version not in TPU_CHIPS:
    raise ValueError(f"Unknown TPU version in topology {topology!r}; known: "
                     f"{sorted(TPU_CHIPS)} (e.g. v5p:2x2x1, v5e:2x2).")
  return TPU_CHIPS[version]


def model_config(model: str, *,
                 token_ids: Sequence[int] | Mapping[str, int] | None = None,
                 **text_overrides) -> Qwen3_5Config:
  """This port's config of a benchmark model.

  Args:
    model: a key of MODELS, or a Qwen3_5Config preset name.
    token_ids: optional (image, video, vision_start, vision_end) ids, or a dict of
      them (tiny_model.token_ids), for inputs made with another tokenizer than
      Qwen3.5's own; default Qwen3.5's.
    **text_overrides: text config fields to change (e.g. vocab_size).
  """
  if token_ids is not None and not isinstance(token_ids, Mapping):
    token_ids = dict(zip(QWEN3_5_TOKEN_IDS, token_ids, strict=True))
  kwargs = dict(token_ids or {})
  if "vocab_size" in text_overrides:
    kwargs["vocab_size"] = text_overrides.pop("vocab_size")
  cfg = Qwen3_5Config.preset(MODELS.get(model, model), **kwargs)
  if text_overrides:
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, **text_overrides))
  return cfg


def hf_config(model: str, *, token_ids=None, **text_overrides):
  """transformers' Qwen3_5Config of a benchmark model (arguments: model_config's)."""
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = model_config(model, token_ids=token_ids, **text_overrides)
  return transformers.Qwen3_5Config(**cfg.to_hf_dict())


def vision_flops(cfg: Qwen3_5Config, thw) -> float:
  """Analytic vision tower forward FLOPs (2 per multiply-add) for these images."""
  v = cfg.vision
  thw = np.asarray(thw).reshape(-1, 3)
  n_patch = int(thw.prod(1).sum())
  d, inner = v.hidden_size, v.intermediate_size
  per_patch = 2 * (v.patch_dim * d + v.depth * (4 * d * d + 2 * d * inner))
  attn = sum(v.depth * 4 * int(n) ** 2 * d for n in thw.prod(1))
  merged = n_patch // v.spatial_merge_size ** 2
  md = d * v.spatial_merge_size ** 2
  return float(per_patch * n_patch + attn +
               merged * 2 * (md * md + md * v.out_hidden_size))


def decoder_flops(cfg: Qwen3_5Config, lengths) -> float:
  """Analytic decoder forward FLOPs for sequences of these lengths (no LM head).

  Full attention counts the whole L x L score matrix (no causal halving); the
  Gated DeltaNet counts its projections and its chunked (64) delta rule.
  """
  t = cfg.text
  h = t.hidden_size
  mlp = 2 * 3 * h * t.intermediate_size
  dk, dv = t.linear_key_head_dim, t.linear_value_head_dim
  nv = t.linear_num_value_heads
  c = 64
  gdn = (2 * h * (2 * t.linear_num_key_heads * dk + 2 * nv * dv + 2 * nv) +
         2 * nv * dv * h +
         nv * (4 * c * dk + c * (dk + dv) + 2 * c * dv + 6 * dk * dv))
  hq, hkv, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
  n_lin = sum(x == "linear_attention" for x in t.layer_types)
  n_full = t.num_hidden_layers - n_lin
  total = 0
  for length in lengths:
    full = (2 * h * (2 * hq * hd + 2 * hkv * hd) + 2 * hq * hd * h +
            4 * int(length) * hq * hd)
    total += int(length) * (n_lin * (gdn + mlp) + n_full * (full + mlp))
  return float(total)


def forward_flops(cfg: Qwen3_5Config, batch, length, thw) -> float:
  """Analytic forward FLOPs (2 per multiply-add), padding included."""
  return vision_flops(cfg, thw) + decoder_flops(cfg, [length] * batch)


def timed(fn, *, iters: int = 1, warmup: int = 0, sync=None):
  """(seconds per call, last output) of `iters` calls of `fn` after `warmup` calls.

  `sync(output)` waits for asynchronous work (JAX's dispatch, CUDA streams) to end,
  so that the clock stops when the work does; None when `fn` is synchronous."""
  sync = sync or (lambda out: out)
  for _ in range(warmup):
    sync(fn())
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / iters, out


def torch_to_numpy(x):
  import torch  # pylint: disable=g-import-not-at-top
  x = x.detach().cpu()
  if x.dtype == torch.bfloat16:
    return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return x.numpy()


def batch_forward_flops(cfg: Qwen3_5Config, batch, names) -> float:
  """Analytic forward FLOPs of the named sequence kinds of a pipeline batch.

  Real tokens and real image patches only (padding is not work), so every
  implementation is measured against the same count whatever it pads to.
  """
  forward = 0.0
  for name in names:
    part = batch[name]
    forward += decoder_flops(cfg, part["attention_mask"].sum(1))
    if "image_grid_thw" in part:
      thw = np.asarray(part["image_grid_thw"]).reshape(-1, 3)
      forward += vision_flops(cfg, thw[thw.prod(1) > 0])
  return forward


# --- synthetic inputs through the real pipeline --------------------------------------


def make_product(index: int, attributes, views: int, image_size: int, rng):
  """A synthetic product with `views` JPEG views of `image_size` pixels."""
  import cv2  # pylint: disable=g-import-not-at-top
  from procir_jax.data import fashionmv  # pylint: disable=g-import-not-at-top
  from tfds_fashionmv import synthetic  # pylint: disable=g-import-not-at-top
  encoded = []
  for view in synthetic.VIEW_NAMES[:views]:
    image = np.asarray(synthetic.render_view(attributes, view, image_size, rng))
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    encoded.append(data.tobytes())
  return fashionmv.Product(
      product_id=str(index), source="fashiongen", views=tuple(encoded),
      caption_long=synthetic.long_caption(attributes, views),
      caption_short=synthetic.short_caption(attributes))


def make_products(count: int, views: int, image_size: int, seed: int = 0):
  """`count` synthetic products (SFT and gallery records)."""
  from tfds_fashionmv import synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [make_product(i, synthetic.sample_attributes(rng), views, image_size, rng)
          for i in range(count)]


def make_triplets(count: int, views: int, image_size: int, seed: int = 0):
  """`count` synthetic triplets whose products have `views` JPEG views each."""
  from procir_jax.data import fashionmv  # pylint: disable=g-import-not-at-top
  from tfds_fashionmv import synthetic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def product(index, attributes):
    return make_product(index, attributes, views, image_size, rng)

  out = []
  for i in range(count):
    a = synthetic.sample_attributes(rng)
    b = a.replace(colour=synthetic.sample_value(rng, "colour", other_than=a.colour),
                  sleeves=synthetic.sample_value(rng, "sleeves"))
    short, long = synthetic.modification_texts(a, b)
    triplet = fashionmv.Triplet(
        source="fashiongen", source_id=str(2 * i), target_id=str(2 * i + 1),
        texts={"modification_text_short": short, "modification_text_long": long},
        row=i)
    out.append(fashionmv.JoinedTriplet(triplet, product(2 * i, a),
                                       product(2 * i + 1, b)))
  return out


def pipeline_batch(config, model_dir: str, mode: str, records, mesh=None):
  """One batch of `records` through the pipeline's own example and collate steps.

  `config`: a run's config (its data and procir sections); `model_dir`: the
  tokenizer and processor settings; `mode`: a pipeline mode; `mesh`: the mesh the
  batch will be split over (None: one device).
  """
  from procir_jax import factories  # pylint: disable=g-import-not-at-top
  from procir_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  dcfg = factories.data_config(config, data_dir="", model_dir=model_dir,
                               batch_size=len(records), mesh=mesh)
  builder, pad_id = pipeline.make_builder(dcfg)
  make = pipeline.MakeExample(builder, mode, dcfg.buckets, skip_bad=False)
  items = [make.map((i, record)) for i, record in enumerate(records)]
  return pipeline.make_collate(mode, dcfg, pad_id, len(records),
                               patch_dim=3 * builder.processor.patch_size ** 2)(items)


def transformers_inputs(part, image_token_id: int, device: str, processor):
  """One sequence kind of a pipeline batch in transformers' layout.

  Each row's real tokens (the batch cut to its longest row), and, with images, the
  normalised patches of every real image as one flat array with their grids, in row
  order (the pipeline's image groups and slots hold them in that order), plus
  mm_token_type_ids. `processor`: the ImageProcessor whose `normalize` finishes the
  pipeline's uint8 patches.
  """
  import torch  # pylint: disable=g-import-not-at-top
  length = int(part["attention_mask"].sum(1).max())
  ids = part["input_ids"][:, :length]
  kw = dict(input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            attention_mask=torch.tensor(part["attention_mask"][:, :length],
                                        dtype=torch.long, device=device))
  if "patches" in part:
    pixels, grids = [], []
    for slot, grid in zip(part["patches"].reshape(-1, *part["patches"].shape[2:]),
                          part["image_grid_thw"].reshape(-1, 3)):
      count = int(np.prod(grid))
      if count:
        pixels.append(processor.normalize(slot[:count]))
        grids.append(grid)
    kw["pixel_values"] = torch.tensor(np.concatenate(pixels), device=device)
    kw["image_grid_thw"] = torch.tensor(np.stack(grids), dtype=torch.long,
                                        device=device)
    kw["mm_token_type_ids"] = torch.tensor(
        (ids == image_token_id).astype(np.int64), device=device)
  return kw
