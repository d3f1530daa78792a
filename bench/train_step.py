"""Triplets/s and MFU of one ProCIR training step: this port vs transformers.

One step takes a batch of triplets: the queries (two-stage dialogue over the source
views, then the modification text), the target documents (their views) and both
products' long captions go through the model; the losses are InfoNCE of q against
the documents' d over the batch plus caption alignment (s against the source caption,
d against the target caption), all on L2-normalised hidden states at `<emb_all>`;
then backward and a clipped AdamW update.

  # CPU, CI-sized (about a minute on 2 cores; MFU against a measured jnp.dot rate):
  python -m bench.train_step
  # GPU, the Qwen3.5-0.8B shape: 8 triplets, 4 views of 256x256, bf16:
  python -m bench.train_step --preset=0.8b --peak_tflops=989

This port: synthetic products rendered and JPEG-encoded, then the project's data
path (decode, Qwen patching, dialogue rendering with a tokenizer, bucketed
collation), and `Trainer.step` with the optimizer, losses and mesh the config
(configs/base.py, or configs/procir_0_8b.py for --preset=0.8b) gives, parameters fp32
and matmuls in the preset's dtype. transformers: Qwen3_5ForConditionalGeneration of
the same shape (random weights, not the same ones) on the same token ids and
pixels in its own layout (flat patches, image_grid_thw, mm_token_type_ids; each
kind padded to its longest sequence), the same losses and weights,
torch.optim.AdamW with the same schedule and clipping, fp32 weights under bf16
autocast. Both run in this process on the same card, PyTorch first (its memory is
released before this port starts).

Prints triplets/s for each side, their ratio, and model FLOP utilisation: analytic
model FLOPs per step over the step time over `--peak_tflops` (default: the card's
bf16 datasheet peak on known GPUs, else a jnp.dot rate measured in this run).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time

# JAX must not grab most of the GPU: PyTorch shares it in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from procir_jax import factories  # noqa: E402
from procir_jax import procir as procir_lib  # noqa: E402
from procir_jax import tiny_model  # noqa: E402
from procir_jax.data import pipeline  # noqa: E402
from procir_jax.data.image_processing import ImageProcessor  # noqa: E402
from procir_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5Model  # noqa: E402
from procir_jax import sharding  # noqa: E402
from procir_jax.train import optimizer as opt_lib  # noqa: E402
from procir_jax.train import step as step_lib  # noqa: E402

from bench.common import PEAK_BF16, batch_forward_flops, hf_config  # noqa: E402
from bench.common import make_triplets, pipeline_batch, timed  # noqa: E402
from bench.common import transformers_inputs  # noqa: E402

PRESETS = {
    # The reference run: Qwen3.5-0.8B's shape, 8 triplets, 4 views of 256x256.
    "0.8b": dict(model="0.8b", config="procir_0_8b", vocab_size=None, batch=8,
                 views=4, image_size=256, dtype="bfloat16", iters=10),
    # Qwen3_5Config.tiny() with a small vocabulary, so the embedding table's
    # optimizer update does not swamp a CPU step; 128x128 is the smallest image
    # ProCIR feeds.
    "tiny": dict(model="tiny", config="base", vocab_size=4096, batch=4, views=2,
                 image_size=128, dtype="float32", iters=3),
}

SEQUENCES = ("query", "document", "source_caption", "target_caption")


def load_config(name: str, views: int):
  """The run config the step is built from, for one batch of `views`."""
  from configs import base, procir_0_8b  # pylint: disable=g-import-not-at-top
  config = {"base": base, "procir_0_8b": procir_0_8b}[name].get_config()
  # ProCIR's contrastive step with caption alignment; the LM loss of the
  # chain-of-thought switch is not part of this comparison.
  config.procir.update(dict(two_stage=True, align=True, cot=False))
  config.data.max_views = views  # image slots = views: no empty slots to encode
  return config


def make_batch(config, model_dir: str, batch: int, views: int, image_size: int,
               mesh=None):
  """One contrastive batch through the pipeline's own example and collate steps,
  for `mesh` to split (None: one device)."""
  return pipeline_batch(config, model_dir, "contrastive",
                        make_triplets(batch, views, image_size, config.seed), mesh)


def step_flops(cfg: Qwen3_5Config, batch) -> float:
  """Model FLOPs of one training step.

  Forward: the matmul FLOPs (2 per multiply-add) of the vision tower over every
  real image patch and of the decoder over every real token of the queries, the
  documents and both captions (common.vision_flops / decoder_flops: projections,
  MLPs, attention scores and values, the Gated DeltaNet's chunked delta rule; no LM
  head, which the step never applies). Padding is not counted, so both sides are
  measured against the same work whatever they pad to. Backward costs twice the
  forward (a gradient for the input and one for the weight of every matmul), so a
  step is 3 x forward; the optimizer update and the B x B similarity matrices are
  left out (elementwise, or negligible).
  """
  return 3 * batch_forward_flops(cfg, batch, SEQUENCES)


def measured_peak(dtype, device_kind: str) -> float:
  """FLOP/s of a large square jnp.dot in `dtype` on the default device."""
  n = 2048 if "cpu" in device_kind.lower() else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  reps = 3 if n == 2048 else 20
  start = time.perf_counter()
  for _ in range(reps):
    out = dot(a, b)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start)


# --- this port ----------------------------------------------------------------------


def make_mesh(config, devices: int):
  """This port's mesh over the first `devices` devices."""
  return sharding.make_mesh(config.mesh.to_dict(), devices=jax.devices()[:devices])


def run_jax(config, hcfg, batch, dtype_name: str, iters: int, devices: int):
  """(seconds per step, first step's loss, peak device bytes or None)."""
  cfg = Qwen3_5Config.from_hf_dict(hcfg.to_dict())
  dtype = jnp.dtype(dtype_name)
  t0 = time.perf_counter()
  mesh = make_mesh(config, devices)
  model = Qwen3_5Model(cfg, dtype=dtype, param_dtype=jnp.float32,
                       rngs=nnx.Rngs(config.seed),
                       options=factories.model_options(config, mesh))
  procir = procir_lib.ProCIR(model, config.loss.temperature)
  trainer = step_lib.Trainer(
      procir, opt_lib.make_optimizer(config.train, nnx.state(procir, nnx.Param)),
      mesh, factories.loss_config(config), mode="contrastive",
      cot=config.procir.cot)
  del model, procir
  state = trainer.init_state()
  inputs = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  jax.block_until_ready(state)
  print(f"jax: built the model and state in {time.perf_counter() - t0:.1f}s",
        flush=True)

  t0 = time.perf_counter()
  state, metrics = trainer.step(state, inputs)
  loss = float(metrics["loss"])
  print(f"jax: compile + first step {time.perf_counter() - t0:.1f}s", flush=True)
  latest = [state]

  def step():
    latest[0], metrics = trainer.step(latest[0], inputs)
    return latest[0], metrics

  seconds, (state, metrics) = timed(step, iters=iters, warmup=1,
                                    sync=jax.block_until_ready)
  stats = jax.devices()[0].memory_stats() or {}
  state = metrics = inputs = latest = None  # frees the device memory
  return seconds, loss, stats.get("peak_bytes_in_use")


# --- transformers -------------------------------------------------------------------


def torch_inputs(batch, image_token_id: int, device: str, processor):
  """The batch in transformers' layout, each sequence kind padded to its longest."""
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  for name in SEQUENCES:
    part = batch[name]
    kw = transformers_inputs(part, image_token_id, device, processor)
    out[name] = (kw, torch.tensor(part["emb_positions"], dtype=torch.long,
                                  device=device))
  return out


def torch_schedule(train_cfg):
  """optax.warmup_cosine_decay_schedule as a LambdaLR factor of the peak lr."""
  warmup = max(int(train_cfg.warmup_steps), 0)
  decay = max(int(train_cfg.steps), warmup + 1)
  floor = train_cfg.final_lr_fraction

  def factor(step):
    if step < warmup:
      return step / warmup
    progress = min((step - warmup) / (decay - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
  return factor


def run_torch(config, hcfg, batch, dtype_name: str, iters: int):
  """(seconds per step, first step's loss, peak device bytes or None)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(config.seed)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  t0 = time.perf_counter()
  with torch.device(device):
    hf = transformers.Qwen3_5ForConditionalGeneration(hcfg)
  hf = hf.float().train()
  log_tau = torch.nn.Parameter(
      torch.tensor(math.log(config.loss.temperature), device=device))
  params = list(hf.parameters()) + [log_tau]
  train_cfg, loss_cfg = config.train, config.loss
  opt = torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.b1,
                                                          train_cfg.b2),
                          eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                          fused=device == "cuda")
  schedule = torch.optim.lr_scheduler.LambdaLR(opt, torch_schedule(train_cfg))
  inputs = torch_inputs(batch, hcfg.image_token_id, device, ImageProcessor())
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=dtype_name == "bfloat16")
  labels = torch.arange(batch["valid"].shape[0], device=device)
  print(f"transformers: built the model in {time.perf_counter() - t0:.1f}s on "
        f"{device}, attention {hf.config._attn_implementation}", flush=True)

  def embed(name):
    kw, positions = inputs[name]
    hidden = hf.model(**kw, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=device)[:, None]
    return F.normalize(hidden[rows, positions].float(), dim=-1)

  def info_nce(a, b, tau):
    return F.cross_entropy(a @ b.T / tau, labels)

  def step():
    with autocast:
      query, doc = embed("query"), embed("document")
      s, q, d = query[:, 0], query[:, -1], doc[:, 0]
      cs, ct = embed("source_caption")[:, 0], embed("target_caption")[:, 0]
    tau = log_tau.exp() if loss_cfg.learn_temperature else loss_cfg.temperature
    loss = (loss_cfg.retrieval * info_nce(q, d, tau) +
            loss_cfg.align_source * info_nce(s, cs, tau) +
            loss_cfg.align_document * info_nce(d, ct, tau))
    loss.backward()
    if train_cfg.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, train_cfg.clip_norm)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  loss = float(step())
  print(f"transformers: first step {time.perf_counter() - t0:.1f}s", flush=True)
  seconds, _ = timed(step, iters=iters, warmup=1, sync=lambda _: sync())
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  hf = opt = schedule = params = log_tau = inputs = None  # frees the memory
  gc.collect()
  if device == "cuda":
    torch.cuda.empty_cache()  # hand the memory back before this port runs
  return seconds, loss, peak


# --- main ---------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int, help="triplets per step")
  parser.add_argument("--views", type=int, help="views per product")
  parser.add_argument("--image_size", type=int, help="square view side, pixels")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                      help="matmul dtype (weights and optimizer stay fp32)")
  parser.add_argument("--iters", type=int, help="timed steps (after 2 more)")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices this port's mesh spans (the card count)")
  parser.add_argument("--peak_tflops", type=float,
                      help="the card's dense peak in TFLOP/s for MFU, e.g. 989 "
                      "for H100/H200 bf16; default: the datasheet bf16 peak of a "
                      "known GPU, else a jnp.dot rate measured in this run")
  parser.add_argument("--skip_torch", action="store_true",
                      help="time only this port")
  parser.add_argument("--skip_jax", action="store_true",
                      help="time only transformers")
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  batch_size = args.batch or p["batch"]
  views = args.views or p["views"]
  image_size = args.image_size or p["image_size"]
  dtype_name = args.dtype or p["dtype"]
  iters = args.iters or p["iters"]
  config = load_config(p["config"], views)

  with tempfile.TemporaryDirectory() as model_dir:
    # The inputs need a Qwen3.5-style tokenizer, chat template and processor
    # config; the project's small offline one has the same special tokens.
    tokenizer = tiny_model.write_tokenizer_files(model_dir, "small", config.seed)
    t0 = time.perf_counter()
    batch = make_batch(config, model_dir, batch_size, views, image_size,
                       mesh=make_mesh(config, args.devices))
  print(f"made the batch with the data pipeline in "
        f"{time.perf_counter() - t0:.1f}s", flush=True)
  overrides = {"vocab_size": p["vocab_size"]} if p["vocab_size"] else {}
  hcfg = hf_config(p["model"], token_ids=tiny_model.token_ids(tokenizer),
                   **overrides)
  cfg = Qwen3_5Config.from_hf_dict(hcfg.to_dict())

  flops = step_flops(cfg, batch)
  device_kind = jax.devices()[0].device_kind
  shapes = ", ".join(
      f"{name} {tuple(batch[name]['input_ids'].shape)} "
      f"({int(batch[name]['attention_mask'].sum())} real tokens)"
      for name in SEQUENCES)
  print(f"preset={args.preset} triplets={batch_size} views={views} "
        f"image={image_size}px dtype={dtype_name}; padded batches: {shapes}; "
        f"patches/image={int(batch['query']['image_grid_thw'][0, 0].prod())}; "
        f"model FLOPs {flops / 1e9:.1f} GFLOP/step", flush=True)

  if args.peak_tflops:
    peak, source = args.peak_tflops * 1e12, "given"
  elif dtype_name == "bfloat16" and any(k in device_kind for k in PEAK_BF16):
    peak = next(v for k, v in PEAK_BF16.items() if k in device_kind)
    source = "datasheet bf16 dense"
  else:
    peak = measured_peak(jnp.dtype(dtype_name), device_kind)
    source = f"measured jnp.dot, {dtype_name}, on {device_kind}"
  print(f"peak for MFU: {peak / 1e12:.3g} TFLOP/s ({source})", flush=True)

  results = {}
  if not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    card = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else "cpu")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} "
          f"on {card}", flush=True)
    results["transformers"] = run_torch(config, hcfg, batch, dtype_name, iters)
  if not args.skip_jax:
    print(f"jax {jax.__version__} on {device_kind} x{args.devices}", flush=True)
    results["jax"] = run_jax(config, hcfg, batch, dtype_name, iters,
                             args.devices)

  print(f"\nOne training step, {batch_size} triplets ({views} views of "
        f"{image_size}x{image_size}, {dtype_name}), {iters} timed steps:")
  for name in ("jax", "transformers"):
    if name not in results:
      continue
    seconds, loss, mem = results[name]
    line = (f"{name:>12}: {batch_size / seconds:9.2f} triplets/s "
            f"({seconds * 1e3:.1f} ms/step), MFU {flops / seconds / peak:.1%} "
            f"of {peak / 1e12:.3g} TFLOP/s, first loss {loss:.3f}")
    if mem:
      line += f", peak memory {mem / 2**30:.1f} GiB"
    print(line, flush=True)
  if len(results) == 2:
    ratio = results["transformers"][0] / results["jax"][0]
    print(f"ratio jax/transformers: {ratio:.2f}x", flush=True)


if __name__ == "__main__":
  main()
