"""Products/s for encoding multi-view products: this port vs transformers.

Both sides run the same randomly initialised Qwen3.5 (the JAX model is loaded
from the PyTorch model's own weights), on the same inputs, on the same
machine, and return last hidden states (no LM head). A product is a short
dialogue with `--views` images of `--image_size` pixels, as ProCIR encodes it.

  # CPU, CI-sized (about a minute):
  python bench/encode.py --preset=tiny
  # GPU, the Qwen3.5-0.8B shape, 4 views of 256x256, batch 10, bf16:
  python bench/encode.py --preset=0.8b

Prints products/s for each side, their ratio, and model FLOP utilisation
(analytic forward FLOPs / time / the card's dense bf16 peak) on known GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# JAX must not grab most of the GPU: PyTorch shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from procir_jax.models.qwen3_5 import Qwen3_5Config  # noqa: E402
from procir_jax.models.qwen3_5 import from_state_dict  # noqa: E402
from procir_jax.models.qwen3_5 import rope  # noqa: E402

# Shared with the other model benchmarks (this file's folder is on sys.path).
from common import IMAGE, V_END, V_START  # noqa: E402
from common import PEAK_BF16, PRESETS  # noqa: E402
from common import forward_flops, hf_config, timed, torch_to_numpy  # noqa: E402


def make_inputs(batch, views, image_size, seed=0, patch=16, merge=2):
  """Right-padded dialogues, each with `views` images, and their patches."""
  rng = np.random.default_rng(seed)
  grid = image_size // patch
  per_image = (grid // merge) ** 2
  seqs = []
  for b in range(batch):
    seq = list(rng.integers(1000, 200000, 3))  # role header
    for _ in range(views):
      seq += [V_START] + [IMAGE] * per_image + [V_END]
    # Instruction text of varying length, then the embedding token and end.
    seq += list(rng.integers(1000, 200000, 16 + (b * 5) % 9)) + [248000, 2]
    seqs.append(seq)
  length = -(-max(map(len, seqs)) // 8) * 8
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  thw = np.tile(np.array([[1, grid, grid]], np.int64), (batch * views, 1))
  pix = rng.normal(size=(batch * views * grid * grid, 3 * 2 * patch * patch))
  return ids, mask, pix.astype(np.float32), thw


def breakdown(graphdef, state, ids, mask, pix, thw, dtype, iters):
  """Times the vision tower and the decoder of the port on their own."""
  model = nnx.merge(graphdef, state)
  cfg = model.config
  sync = lambda x: x.block_until_ready()

  @jax.jit
  def vision(state, pix):
    return nnx.merge(graphdef, state).encode_images(pix, thw)

  feats = vision(state, jnp.asarray(pix, dtype))
  secs, _ = timed(lambda: vision(state, jnp.asarray(pix, dtype)), sync, iters)
  print(f"  jax vision tower: {secs * 1e3:.1f} ms/batch", flush=True)

  pos = rope.multimodal_position_ids(
      jnp.asarray(ids), jnp.asarray(mask), thw, image_token_id=IMAGE,
      spatial_merge_size=cfg.vision.spatial_merge_size)
  embeds = jnp.zeros(ids.shape + (cfg.text.hidden_size,), dtype)
  del feats

  @jax.jit
  def decoder(state, embeds, mask, pos):
    return nnx.merge(graphdef, state).language_model(embeds, mask, pos)

  secs, _ = timed(lambda: decoder(state, embeds, jnp.asarray(mask), pos), sync,
                  iters)
  print(f"  jax decoder: {secs * 1e3:.1f} ms/batch", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int, help="products per batch")
  parser.add_argument("--views", type=int)
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"])
  parser.add_argument("--iters", type=int)
  parser.add_argument("--skip_torch", action="store_true",
                      help="time only this port (PyTorch only makes weights)")
  parser.add_argument("--skip_jax", action="store_true",
                      help="time only transformers")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time this port's vision tower and decoder "
                      "alone")
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  batch = args.batch or p["batch"]
  views = args.views or p["views"]
  image_size = args.image_size or p["image_size"]
  dtype_name = args.dtype or p["dtype"]
  iters = args.iters or p["iters"]

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda and not args.skip_torch else "cpu"
  tdtype = getattr(torch, dtype_name)
  hcfg = hf_config(args.preset)
  cfg = Qwen3_5Config.from_hf_dict(hcfg.to_dict())
  t0 = time.perf_counter()
  with torch.device(device):
    hf = transformers.Qwen3_5ForConditionalGeneration(hcfg)
  hf = hf.to(tdtype).eval()
  card = torch.cuda.get_device_name(0) if cuda else jax.devices()[0].device_kind
  print(f"built the PyTorch model in {time.perf_counter() - t0:.1f}s; "
        f"torch {torch.__version__} on {device}, transformers "
        f"{transformers.__version__}, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; card: {card}", flush=True)

  ids, mask, pix, thw = make_inputs(batch, views, image_size)
  flops = forward_flops(cfg, *ids.shape, thw)
  print(f"preset={args.preset} batch={batch} views={views} "
        f"image={image_size}px tokens/product={ids.shape[1]} "
        f"patches/batch={pix.shape[0]} dtype={dtype_name} "
        f"forward={flops / 1e9:.1f} GFLOP/batch", flush=True)
  peak = next((v for k, v in PEAK_BF16.items() if k in card), None)

  def report(name, seconds):
    line = (f"{name:>12}: {batch / seconds:9.2f} products/s "
            f"({seconds * 1e3:.1f} ms/batch)")
    if peak and dtype_name == "bfloat16":
      line += f", MFU {flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
    print(line, flush=True)

  j_time = j_out = None
  if not args.skip_jax:
    jdtype = jnp.dtype(dtype_name)
    t0 = time.perf_counter()
    model = from_state_dict(cfg, {k: torch_to_numpy(v) for k, v in
                                  hf.state_dict().items()},
                            dtype=jdtype, param_dtype=jdtype)
    print(f"loaded its weights into the port in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, ids, mask, pix):
      return nnx.merge(graphdef, state)(ids, mask, pix, thw)

    j_args = (state, jnp.asarray(ids), jnp.asarray(mask),
              jnp.asarray(pix, jdtype))
    t0 = time.perf_counter()
    encode(*j_args).block_until_ready()
    print(f"jax compile + first call {time.perf_counter() - t0:.1f}s",
          flush=True)
    j_time, j_out = timed(lambda: encode(*j_args),
                          lambda x: x.block_until_ready(), iters)
    report("jax", j_time)
    if args.breakdown:
      breakdown(graphdef, state, ids, mask, pix, thw, jdtype, iters)
  if args.skip_torch:
    return

  t_args = dict(
      input_ids=torch.tensor(ids, dtype=torch.long, device=device),
      attention_mask=torch.tensor(mask, dtype=torch.long, device=device),
      pixel_values=torch.tensor(pix, device=device).to(tdtype),
      image_grid_thw=torch.tensor(thw, device=device),
      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64),
                                     device=device))
  sync = (lambda x: torch.cuda.synchronize()) if device == "cuda" else (
      lambda x: None)
  with torch.inference_mode():
    t_time, t_out = timed(lambda: hf.model(**t_args).last_hidden_state, sync,
                          iters)
  report("transformers", t_time)
  if j_time is None:
    return
  print(f"ratio jax/transformers: {t_time / j_time:.2f}x", flush=True)

  # Same weights and inputs: the embeddings should agree up to the dtype.
  last = mask.sum(1) - 1
  a = np.asarray(j_out, np.float32)[np.arange(batch), last]
  b = t_out.float().cpu().numpy()[np.arange(batch), last]
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) *
                             np.linalg.norm(b, axis=-1))
  print(f"last-token hidden state agreement: min cosine {cos.min():.5f}, "
        f"max abs diff {np.abs(a - b).max():.3g} (scale "
        f"{np.abs(b).max():.3g})", flush=True)


if __name__ == "__main__":
  main()
