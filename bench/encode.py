"""Products/s for encoding multi-view products: this port vs transformers.

This port runs exactly what evaluation runs: pipeline batches of gallery documents
(synthetic products through the real example and collate steps, uint8 patches packed
into image slots) through `eval.encode.Encoder`, with fp32 parameters and the preset's
compute dtype, returning the unit `<emb_all>` embeddings. transformers runs
Qwen3_5ForConditionalGeneration with the same weights (loaded into the port from the
PyTorch model) in the compute dtype, on the same token ids and normalised pixels in
its own layout, and returns last hidden states, from which the embeddings are read.

  # CPU, CI-sized (about a minute):
  python -m bench.encode --preset=tiny
  # GPU, the Qwen3.5-0.8B shape, 4 views of 256x256, 32 products per batch, bf16:
  python -m bench.encode --preset=0.8b

Prints products/s for each side, their ratio, model FLOP utilisation (analytic forward
FLOPs over real tokens and patches / time / the card's dense bf16 peak) on known GPUs,
which kernels transformers ran (its Gated DeltaNet from flash-linear-attention or its
PyTorch fallback, causal-conv1d, the attention implementation) and how closely the two
sides' embeddings agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

# JAX must not grab most of the GPU: PyTorch shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from procir_jax import procir as procir_lib  # noqa: E402
from procir_jax import sharding  # noqa: E402
from procir_jax import tiny_model  # noqa: E402
from procir_jax.data.image_processing import ImageProcessor  # noqa: E402
from procir_jax.eval import encode as encode_lib  # noqa: E402
from procir_jax.models.qwen3_5 import ModelOptions, Qwen3_5Config  # noqa: E402
from procir_jax.models.qwen3_5 import from_state_dict  # noqa: E402
from procir_jax.models.qwen3_5.config import QWEN3_5_VOCAB_SIZE  # noqa: E402

from bench.common import PEAK_BF16, batch_forward_flops, hf_config  # noqa: E402
from bench.common import make_products, pipeline_batch, timed, torch_to_numpy  # noqa: E402
from bench.common import transformers_inputs  # noqa: E402

PRESETS = {
    # The Qwen3.5-0.8B shape: 32 products of 4 views of 256x256 per batch, bf16.
    "0.8b": dict(model="0.8b", batch=32, views=4, image_size=256,
                 dtype="bfloat16", iters=20),
    # Qwen3_5Config.tiny(): small enough for a CPU in CI time.
    "tiny": dict(model="tiny", batch=4, views=4, image_size=64, dtype="float32",
                 iters=5),
}


def load_config(views: int):
  """The evaluation's data settings (configs/procir_0_8b.py) for `views` per product."""
  from configs import procir_0_8b  # pylint: disable=g-import-not-at-top
  config = procir_0_8b.get_config()
  config.data.max_views = views
  config.eval.max_views = views
  return config


def transformers_kernels(hf) -> str:
  """Which kernels transformers' Qwen3.5 runs here, in words."""
  delta = ("flash-linear-attention" if importlib.util.find_spec("fla")
           else "PyTorch fallback (flash-linear-attention not installed)")
  conv = ("causal-conv1d" if importlib.util.find_spec("causal_conv1d")
          else "PyTorch fallback (causal-conv1d not installed)")
  return (f"Gated DeltaNet: {delta}; conv: {conv}; attention: "
          f"{hf.config._attn_implementation}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int, help="products per batch")
  parser.add_argument("--views", type=int)
  parser.add_argument("--image_size", type=int)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                      help="compute dtype (this port keeps fp32 parameters)")
  parser.add_argument("--attention", default="auto",
                      help="this port's attention implementation (ModelOptions)")
  parser.add_argument("--iters", type=int)
  parser.add_argument("--skip_torch", action="store_true",
                      help="time only this port (PyTorch only makes weights)")
  parser.add_argument("--skip_jax", action="store_true",
                      help="time only transformers")
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  batch_size = args.batch or p["batch"]
  views = args.views or p["views"]
  image_size = args.image_size or p["image_size"]
  dtype_name = args.dtype or p["dtype"]
  iters = args.iters or p["iters"]

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = load_config(views)
  with tempfile.TemporaryDirectory() as model_dir:
    # The inputs need a Qwen3.5-style tokenizer, chat template and processor
    # config; the project's small offline one has the same special tokens.
    tokenizer = tiny_model.write_tokenizer_files(model_dir, "small", config.seed)
    processor = ImageProcessor.from_pretrained(model_dir)
    t0 = time.perf_counter()
    batch = pipeline_batch(config, model_dir, "gallery",
                           make_products(batch_size, views, image_size, config.seed))
  part = batch["document"]
  print(f"made the batch with the data pipeline in {time.perf_counter() - t0:.1f}s",
        flush=True)
  # Qwen3.5's own vocabulary (or the tokenizer's, if larger): the embedding table of
  # the real model, with the stand-in tokenizer's multimodal ids.
  hcfg = hf_config(p["model"], token_ids=tiny_model.token_ids(tokenizer),
                   vocab_size=max(len(tokenizer), QWEN3_5_VOCAB_SIZE))
  cfg = Qwen3_5Config.from_hf_dict(hcfg.to_dict())

  torch.manual_seed(0)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda and not args.skip_torch else "cpu"
  tdtype = getattr(torch, dtype_name)
  t0 = time.perf_counter()
  with torch.device(device):
    hf = transformers.Qwen3_5ForConditionalGeneration(hcfg)
  hf = hf.to(tdtype).eval()
  card = torch.cuda.get_device_name(0) if cuda else jax.devices()[0].device_kind
  flops = batch_forward_flops(cfg, batch, ["document"])
  print(f"built the PyTorch model in {time.perf_counter() - t0:.1f}s; torch "
        f"{torch.__version__} on {device}, transformers {transformers.__version__}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; card: {card}",
        flush=True)
  print(f"preset={args.preset} batch={batch_size} views={views} image={image_size}px "
        f"tokens={part['input_ids'].shape[1]} (bucket) image slots="
        f"{part['patches'].shape[:3]} dtype={dtype_name} "
        f"forward={flops / 1e9:.1f} GFLOP/batch", flush=True)
  if not args.skip_torch:
    print(f"transformers kernels: {transformers_kernels(hf)}", flush=True)
  peak = next((v for k, v in PEAK_BF16.items() if k in card), None)

  def report(name, seconds):
    line = (f"{name:>12}: {batch_size / seconds:9.2f} products/s "
            f"({seconds * 1e3:.1f} ms/batch)")
    if peak and dtype_name == "bfloat16":
      line += f", MFU {flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
    print(line, flush=True)

  rows = np.arange(batch_size)
  positions = part["emb_positions"][:, 0]
  j_time = j_emb = None
  if not args.skip_jax:
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    options = ModelOptions(attention=args.attention).for_platform(
        jax.devices()[0].platform)
    t0 = time.perf_counter()
    model = from_state_dict(cfg, {k: torch_to_numpy(v.float()) for k, v in
                                  hf.state_dict().items()},
                            dtype=jnp.dtype(dtype_name), param_dtype=jnp.float32,
                            options=options)
    procir = procir_lib.ProCIR(model, config.loss.temperature, processor.pixel_norm)
    graphdef, params = nnx.split(procir, nnx.Param)
    encoder = encode_lib.Encoder(graphdef, mesh)
    inputs = {k: jax.device_put(v) for k, v in part.items()}
    print(f"loaded its weights into the port in {time.perf_counter() - t0:.1f}s; "
          f"attention {options.attention}", flush=True)
    t0 = time.perf_counter()
    encoder.embed(params, inputs)
    print(f"jax compile + first call {time.perf_counter() - t0:.1f}s", flush=True)
    j_time, j_emb = timed(lambda: encoder.embed(params, inputs),
                           iters=iters, warmup=2, sync=jax.block_until_ready)
    j_emb = j_emb[:, 0]
    report("jax", j_time)
  if args.skip_torch:
    return

  t_args = transformers_inputs(part, hcfg.image_token_id, device, processor)
  t_args["pixel_values"] = t_args["pixel_values"].to(tdtype)
  sync = (lambda x: torch.cuda.synchronize()) if device == "cuda" else (
      lambda x: None)
  with torch.inference_mode():
    t_time, t_out = timed(lambda: hf.model(**t_args).last_hidden_state,
                          iters=iters, warmup=2, sync=sync)
  report("transformers", t_time)
  if j_time is None:
    return
  print(f"ratio jax/transformers: {t_time / j_time:.2f}x", flush=True)

  # Same weights and inputs: the embeddings agree up to the compute dtype.
  theirs = t_out.float().cpu().numpy()[rows, positions]
  theirs = theirs / np.linalg.norm(theirs, axis=-1, keepdims=True)
  cos = np.sum(j_emb * theirs, -1)
  print(f"<emb_all> embedding agreement: min cosine {cos.min():.5f}, max abs diff "
        f"{np.abs(j_emb - theirs).max():.3g}", flush=True)


if __name__ == "__main__":
  main()
