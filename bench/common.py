"""What the model benchmarks share: Qwen3.5 shapes, the HF config, FLOP counts.

Both sides of a benchmark build their model from `hf_config(preset)`: transformers
reads it directly and this port through `Qwen3_5Config.from_hf_dict`, so the two
always have the same shapes.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np

from procir_jax.models.qwen3_5 import Qwen3_5Config

# Qwen3.5's own multimodal token ids.
IMAGE, VIDEO, V_START, V_END = 248056, 248057, 248053, 248054

PRESETS = {
    # The Qwen3.5-0.8B shape.
    "0.8b": dict(
        text=dict(vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                  num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256,
                  linear_num_key_heads=16, linear_num_value_heads=16,
                  linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel_dim=4),
        vision=dict(depth=12, hidden_size=768, intermediate_size=3072,
                    num_heads=12, out_hidden_size=1024,
                    num_position_embeddings=2304),
        rope_theta=1e7, mrope_section=[11, 11, 10], tie=True,
        batch=10, views=4, image_size=256, dtype="bfloat16", iters=20),
    # Small enough for a CPU in CI time.
    "tiny": dict(
        text=dict(vocab_size=248320, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=32,
                  linear_value_head_dim=32, linear_conv_kernel_dim=4),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128,
                    num_heads=2, out_hidden_size=128,
                    num_position_embeddings=256),
        rope_theta=1e7, mrope_section=[3, 3, 2], tie=True,
        batch=4, views=4, image_size=64, dtype="float32", iters=5),
}

# Dense bf16 peak FLOP/s by device name (vendor datasheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def hf_config(preset, *, token_ids=None, **text_overrides):
  """transformers' Qwen3_5Config of a preset.

  Args:
    preset: a key of PRESETS.
    token_ids: optional (image, video, vision_start, vision_end) ids, for inputs
      made with another tokenizer than Qwen3.5's own; default Qwen3.5's.
    **text_overrides: text config fields to change (e.g. vocab_size).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  p = PRESETS[preset]
  image, video, start, end = token_ids or (IMAGE, VIDEO, V_START, V_END)
  text = dict(p["text"], **text_overrides)
  text["rope_parameters"] = dict(
      rope_type="default", rope_theta=p["rope_theta"],
      partial_rotary_factor=0.25, mrope_section=p["mrope_section"],
      mrope_interleaved=True)
  return transformers.Qwen3_5Config(
      text_config=text, vision_config=p["vision"], image_token_id=image,
      video_token_id=video, vision_start_token_id=start,
      vision_end_token_id=end, tie_word_embeddings=p["tie"])


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


def timed(fn, sync, iters, warmup=2):
  """(seconds per call, last output) of `fn` after `warmup` calls."""
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
