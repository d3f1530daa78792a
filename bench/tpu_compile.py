"""Will it fit? Compiles ProCIR's steps for a TPU slice on this machine, no TPU needed.

libtpu compiles for a topology it is only told about, so a CPU machine can see what a
step costs on a TPU slice before anyone rents one:

  # The 0.8B contrastive, SFT and evaluation steps on a v5p slice, 32 per chip:
  python -m bench.tpu_compile --config=configs/procir_0_8b.py \
      --config.procir.cot=False --topology=v5p:2x2x1 --per_chip_batch=32
  # The largest per-chip batch of each step that fits with 10% HBM headroom:
  python -m bench.tpu_compile --config=configs/procir_0_8b.py \
      --config.procir.cot=False --topology=v5e:2x2 --find_batch
  # Evaluation encode of 5 views of 512x512 per product:
  python -m bench.tpu_compile --config=configs/procir_0_8b.py --topology=v5e:2x2 \
      --steps=encode --per_chip_batch=64 --encode_views=5 --encode_image_size=512

It builds the mesh of `config.mesh` on the slice's chips, makes one batch of each step
through the real input pipeline (synthetic products with the config's buckets: the
shapes a real run compiles), ahead-of-time compiles the real jitted steps (the
trainer's contrastive and SFT steps with the optimizer, the evaluation encoder), and
prints per chip: argument, output and temporary GiB against the chip's HBM and whether
that fits; FLOPs and HBM bytes from XLA's cost analysis; the roofline time
max(FLOPs / peak, bytes / bandwidth) and the ceiling on model FLOP utilisation it
implies (analytic model FLOPs, bench/common.py, over that time); and compile time.
A step whose compiled FLOPs fall below the analytic count is flagged: XLA cannot see
inside custom kernels, which is why every Pallas kernel here declares its cost.

The model is `model.hf_dir`'s config when set, else the config's tiny preset, else the
Qwen3.5-0.8B shape; no weights are read. Needs libtpu (the test extra installs it, or
`pip install "jax[tpu]==0.10.2"`); only one process may hold libtpu at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

# Compile-only TPU devices come from the topology; this process itself runs on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling needs no exclusive hold on libtpu (there is no chip to guard), so other
# processes that load it (tests, a second planner) may run at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from procir_jax import factories  # noqa: E402
from procir_jax import procir as procir_lib  # noqa: E402
from procir_jax import tiny_model  # noqa: E402
from procir_jax.data import tokenizer as tok  # noqa: E402
from procir_jax.data.image_processing import ImageProcessor  # noqa: E402
from procir_jax.eval import encode as encode_lib  # noqa: E402
from procir_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5Model  # noqa: E402
from procir_jax import sharding  # noqa: E402
from procir_jax.train import optimizer as opt_lib  # noqa: E402
from procir_jax.train import step as step_lib  # noqa: E402

from bench.common import Chip, batch_forward_flops, hf_config, tpu_chip  # noqa: E402
from bench.common import make_products, make_triplets, pipeline_batch  # noqa: E402

STEPS = ("contrastive", "sft", "encode")
GIB = 2.0 ** 30


@dataclasses.dataclass
class StepReport:
  """What one compiled step costs on one chip (per chip throughout)."""

  step: str
  topology: str
  chip: str
  chips: int
  per_chip_batch: int  # triplets (contrastive) or products (sft, encode)
  shapes: str
  hbm_gib: float
  headroom: float
  compile_s: float
  argument_gib: float = float("nan")
  output_gib: float = float("nan")
  alias_gib: float = float("nan")  # outputs that reuse argument buffers (donation)
  temp_gib: float = float("nan")
  total_gib: float = float("nan")  # argument + output - alias + temp
  fits: bool = False  # total within (1 - headroom) of the chip's HBM
  flops: float = float("nan")  # compiled, from XLA's cost analysis
  bytes_accessed: float = float("nan")
  model_flops: float = float("nan")  # analytic (bench/common.py), real tokens only
  compute_s: float = float("nan")  # flops / peak
  memory_s: float = float("nan")  # bytes / bandwidth
  roofline_s: float = float("nan")
  mfu_ceiling: float = float("nan")
  loops: int = 0  # while loops left in the program (each counted once by XLA)
  error: str = ""

  @property
  def compiled_below_model(self) -> bool:
    """Compiled FLOPs under the analytic count: some kernel hides its cost."""
    return self.flops < self.model_flops

  def row(self) -> str:
    if self.error:
      return (f"{self.step:<12}{self.per_chip_batch:>6}  does not compile: "
              f"{self.error} ({self.compile_s:.0f} s)")
    flag = "  COMPILED FLOPS < MODEL FLOPS" if self.compiled_below_model else ""
    bound = "compute" if self.compute_s >= self.memory_s else "memory"
    return (f"{self.step:<12}{self.per_chip_batch:>6}{self.argument_gib:>8.2f}"
            f"{self.output_gib - self.alias_gib:>8.2f}{self.temp_gib:>8.2f}"
            f"{self.total_gib:>8.2f} /{self.hbm_gib:>4.0f} "
            f"{'yes' if self.fits else 'NO':<4}"
            f"{self.flops / 1e12:>9.3g}{self.model_flops / 1e12:>9.3g}"
            f"{self.bytes_accessed / 1e9:>9.4g}"
            f"{self.bytes_accessed / 1e9 / self.per_chip_batch:>8.3g}"
            f"{self.roofline_s * 1e3:>9.1f} {bound:<8}{self.mfu_ceiling:>6.1%}"
            f"{self.compile_s:>8.0f}{flag}"
            f"{f'  {self.loops} LOOPS COUNTED ONCE' if self.loops else ''}")


HEADER = (f"{'step':<12}{'batch':>6}{'args':>8}{'out':>8}{'temp':>8}{'total':>8} /"
          f"{'HBM':>4} {'fits':<4}{'TFLOP':>9}{'model':>9}{'GB':>9}{'GB/ex':>8}"
          f"{'roof ms':>9} {'bound':<8}{'MFU<=':>6}{'comp s':>8}")


# --- the model and its inputs --------------------------------------------------------


def model_and_inputs_dir(config, scratch: str) -> tuple[Qwen3_5Config, str]:
  """The model shape, and a directory with the matching tokenizer and processor files.

  A real model directory (model.hf_dir) supplies both. Otherwise the project's small
  offline tokenizer stands in for Qwen3.5's (same special tokens and chat template),
  with the model's token ids set to it.
  """
  if config.model.hf_dir:
    cfg = Qwen3_5Config.from_pretrained(config.model.hf_dir)
    tokenizer = tok.load_tokenizer(config.model.hf_dir)
    model_dir = config.model.hf_dir
  else:
    tokenizer = tiny_model.write_tokenizer_files(scratch, "small", config.seed)
    model_dir = scratch
    if config.model.tiny_preset:
      cfg = tiny_model.model_config(tokenizer, config.model.tiny_preset)
    else:
      ids = tokenizer.convert_tokens_to_ids
      cfg = Qwen3_5Config.from_hf_dict(hf_config("0.8b", token_ids=(
          ids(tok.IMAGE_PAD), ids("<|video_pad|>"), ids(tok.VISION_START),
          ids(tok.VISION_END))).to_dict())
  # <emb_all> grows the vocabulary when the tokenizer lacks it (factories.load_model).
  vocab = max(cfg.text.vocab_size, len(tokenizer))
  cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab))
  return cfg, model_dir


class Records:
  """Synthetic records of each kind, made once and reused across batch sizes."""

  def __init__(self, views: int, image_size: int, encode_views: int,
               encode_image_size: int, seed: int):
    self._made: dict[str, list] = {"contrastive": [], "sft": [], "encode": []}
    self._spec = {"contrastive": (make_triplets, views, image_size),
                  "sft": (make_products, views, image_size),
                  "encode": (make_products, encode_views, encode_image_size)}
    self._seed = seed

  def get(self, step: str, count: int) -> list:
    made = self._made[step]
    make, views, size = self._spec[step]
    while len(made) < count:
      made.extend(make(min(64, count - len(made)), views, size,
                       seed=self._seed + len(made)))
    return made[:count]


def abstract(batch, mesh) -> Any:
  """ShapeDtypeStructs of a host batch, sharded like `pipeline.to_global` does."""
  from procir_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sharding_for = sharding.batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                     sharding=sharding_for(np.ndim(x))),
      pipeline.device_part(batch))


def describe(part) -> str:
  dims = [f"{part['input_ids'].shape[1]} tokens"]
  if "patches" in part:
    g, n, m, _ = part["patches"].shape
    dims.append(f"{g}x{n} image slots of {m} patches")
  return ", ".join(dims)


# --- compiling -----------------------------------------------------------------------


class Planner:
  """Compiles the steps of one config for one TPU topology."""

  def __init__(self, config, topology: str, *, views: int, image_size: int,
               encode_views: int, encode_image_size: int, headroom: float = 0.1,
               exact_costs: bool = True, scratch: str):
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    self.config, self.topology, self.headroom = config, topology, headroom
    self._reports: dict[tuple[str, int], StepReport] = {}
    self.chip: Chip = tpu_chip(topology)
    devices = topologies.get_topology_desc(topology, "tpu").devices
    self.mesh = sharding.make_mesh(config.mesh.to_dict(), devices=devices)
    self.chips = self.mesh.devices.size
    self.shards = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.cfg, self.model_dir = model_and_inputs_dir(config, scratch)
    self.records = Records(views, image_size, encode_views, encode_image_size,
                           config.seed)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
    options = factories.model_options(config, self.mesh)
    if exact_costs:  # XLA's cost analysis counts a loop body once: unroll them all
      options = dataclasses.replace(options, unroll_loops=True)
    pixel_norm = ImageProcessor.from_pretrained(self.model_dir).pixel_norm
    self.procir = nnx.eval_shape(lambda: procir_lib.ProCIR(
        Qwen3_5Model(self.cfg, dtype=dtype, param_dtype=jnp.float32, options=options),
        config.loss.temperature, pixel_norm))

  def describe(self) -> str:
    c, o = self.cfg, self.procir.model.options
    return (f"{self.topology}: {self.chips} x {self.chip.name} "
            f"({self.chip.hbm_bytes / GIB:.0f} GiB HBM, "
            f"{self.chip.peak_bf16 / 1e12:.0f} TFLOP/s bf16, "
            f"{self.chip.hbm_bandwidth / 1e9:.0f} GB/s), mesh {dict(self.mesh.shape)}; "
            f"model {c.text.num_hidden_layers} layers x {c.text.hidden_size}, vision "
            f"{c.vision.depth} x {c.vision.hidden_size}, compute "
            f"{self.config.model.dtype}, attention {o.attention}, delta rule "
            f"{o.delta_rule}, remat {o.remat}, "
            + ("loops unrolled for exact costs" if o.unroll_loops else
               f"scan_layers {o.scan_layers}"))

  def _lower(self, step: str, global_batch: int):
    """(lowered step, batch description, analytic model FLOPs of the step)."""
    config = self.config
    batch = pipeline_batch(config, self.model_dir,
                           {"encode": "gallery"}.get(step, step),
                           self.records.get(step, global_batch), self.mesh)
    if step == "encode":
      graphdef, params = nnx.split(self.procir, nnx.Param)
      params = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
          sharding.tree_shardings(params, self.mesh))
      encoder = encode_lib.Encoder(graphdef, self.mesh)
      part = abstract(batch["document"], self.mesh)
      return (encoder.lower(params, part), describe(batch["document"]),
              batch_forward_flops(self.cfg, batch, ["document"]))
    train_cfg = config.train if step == "contrastive" else factories.stage_config(
        config, "sft")
    trainer = step_lib.Trainer(
        self.procir,
        opt_lib.make_optimizer(train_cfg, nnx.state(self.procir, nnx.Param)),
        self.mesh, factories.loss_config(config), mode=step, cot=config.procir.cot)
    names = [n for n in ("query", "document", "source_caption", "target_caption",
                         "sft") if n in batch]
    flops = 3 * batch_forward_flops(self.cfg, batch, names)
    lm = {"sft": "sft", "contrastive": "query"}[step]
    if step == "sft" or config.procir.cot:  # the LM head over every target token
      scored = batch[lm]["loss_mask"][:, 1:].sum()
      flops += 3 * 2 * self.cfg.text.hidden_size * self.cfg.text.vocab_size * scored
    shapes = "; ".join(f"{n} {describe(batch[n])}" for n in names)
    return trainer.lower(abstract(batch, self.mesh)), shapes, flops

  def compile(self, step: str, per_chip_batch: int) -> StepReport:
    """The report of `step` compiled for `per_chip_batch` (each compiled once: a
    batch search and the reports printed beside it share their compiles)."""
    if step not in STEPS:
      raise ValueError(f"Unknown step {step!r}; choose from {STEPS}.")
    key = (step, per_chip_batch)
    if key not in self._reports:
      self._reports[key] = self._compile(step, per_chip_batch)
    return self._reports[key]

  def _compile(self, step: str, per_chip_batch: int) -> StepReport:
    start = time.perf_counter()
    report = StepReport(step=step, topology=self.topology, chip=self.chip.name,
                        chips=self.chips, per_chip_batch=per_chip_batch, shapes="",
                        hbm_gib=self.chip.hbm_bytes / GIB, headroom=self.headroom,
                        compile_s=0.0)
    lowered, report.shapes, model_flops = self._lower(
        step, per_chip_batch * self.shards)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      message = str(e)
      if "RESOURCE_EXHAUSTED" not in message:
        raise
      report.compile_s = time.perf_counter() - start
      report.error = _oom_summary(message)
      return report
    report.compile_s = time.perf_counter() - start
    report.loops = compiled.as_text().count(" while(")
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report.argument_gib = memory.argument_size_in_bytes / GIB
    report.output_gib = memory.output_size_in_bytes / GIB
    report.alias_gib = memory.alias_size_in_bytes / GIB
    report.temp_gib = memory.temp_size_in_bytes / GIB
    report.total_gib = (report.argument_gib + report.output_gib - report.alias_gib +
                        report.temp_gib)
    report.fits = report.total_gib <= report.hbm_gib * (1 - self.headroom)
    report.flops = float(cost.get("flops", 0.0))
    report.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    report.model_flops = model_flops / self.chips
    report.compute_s = report.flops / self.chip.peak_bf16
    report.memory_s = report.bytes_accessed / self.chip.hbm_bandwidth
    report.roofline_s = max(report.compute_s, report.memory_s)
    report.mfu_ceiling = (report.model_flops / self.chip.peak_bf16 /
                          max(report.roofline_s, 1e-30))
    return report

  def find_batch(self, step: str, limit: int, log: Callable[[StepReport], None]
                 ) -> StepReport | None:
    """The report of the largest per-chip batch that fits (doubling, then bisecting)."""
    best, low, high, size = None, 0, None, 1
    while high is None and size <= limit:
      report = self.compile(step, size)
      log(report)
      if report.fits:
        best, low, size = report, size, size * 2
      else:
        high = size
    high = high if high is not None else limit + 1
    while high - low > 1:
      mid = (low + high) // 2
      report = self.compile(step, mid)
      log(report)
      if report.fits:
        best, low = report, mid
      else:
        high = mid
    return best


def _oom_summary(message: str) -> str:
  found = re.search(r"(Ran out of memory[^\n]*?)(?:\n|$)", message)
  need = re.search(r"[Uu]sed ([0-9.]+[GMK]) of ([0-9.]+[GMK]) hbm", message)
  temps = re.search(r"HLO temporaries \(([0-9.]+[GMK])\)", message)
  parts = [found.group(1).strip() if found else "out of HBM"]
  if need:
    parts.append(f"used {need.group(1)} of {need.group(2)}")
  if temps:
    parts.append(f"temporaries {temps.group(1)}")
  return "; ".join(parts)[:300]


# --- main ----------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1",
                                "TPU topology to compile for, e.g. v5p:2x2x1, v5e:2x2, "
                                "v6e:2x2, v4:2x2x1.")
_BATCH = flags.DEFINE_integer("per_chip_batch", 8, "Triplets (contrastive) or products "
                              "(sft, encode) per chip.")
_STEPS = flags.DEFINE_list("steps", list(STEPS), f"Which of {STEPS} to compile.")
_FIND = flags.DEFINE_bool("find_batch", False, "Search the largest per-chip batch that "
                          "fits with --headroom to spare.")
_MAX = flags.DEFINE_integer("max_batch", 512, "Largest per-chip batch --find_batch "
                            "tries.")
_HEADROOM = flags.DEFINE_float("headroom", 0.10, "Share of HBM a fitting step leaves "
                               "free.")
_VIEWS = flags.DEFINE_integer("views", 4, "Views per product in training steps.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Square view side in training steps.")
_ENC_VIEWS = flags.DEFINE_integer("encode_views", 5, "Views per product in encode.")
_ENC_SIZE = flags.DEFINE_integer("encode_image_size", 512, "View side in encode.")
_JSON = flags.DEFINE_string("json", "", "Also write the reports to this JSON file.")
_KEEP_LOOPS = flags.DEFINE_bool(
    "keep_loops", False, "Compile the config's program as it is, layer scan and "
    "loops over chunks included (to see their compile time and memory). By "
    "default loops are unrolled, because XLA's cost analysis counts a loop body "
    "once whatever its trip count.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("Pass --config=configs/procir_0_8b.py (or another config).")
  with tempfile.TemporaryDirectory() as scratch:
    planner = Planner(config, _TOPOLOGY.value, views=_VIEWS.value,
                      image_size=_SIZE.value, encode_views=_ENC_VIEWS.value,
                      encode_image_size=_ENC_SIZE.value, headroom=_HEADROOM.value,
                      exact_costs=not _KEEP_LOOPS.value, scratch=scratch)
    print(planner.describe(), flush=True)
    print(f"training steps: {_VIEWS.value} views of {_SIZE.value}x{_SIZE.value} per "
          f"product; encode: {_ENC_VIEWS.value} views of {_ENC_SIZE.value}x"
          f"{_ENC_SIZE.value}. Per chip: GiB of HBM, TFLOP and GB of HBM traffic per "
          f"step, GB per example.", flush=True)
    print(HEADER, flush=True)
    reports = []
    for step in _STEPS.value:
      if _FIND.value:
        best = planner.find_batch(step, _MAX.value,
                                  lambda r: print(r.row(), flush=True))
        print(f"-> {step}: largest per-chip batch that fits with "
              f"{_HEADROOM.value:.0%} headroom: "
              f"{best.per_chip_batch if best else 'none'}", flush=True)
        if best:
          reports.append(best)
      else:
        report = planner.compile(step, _BATCH.value)
        print(report.row(), flush=True)
        reports.append(report)
    for r in reports:
      if r.loops:
        print(f"WARNING: {r.step}: {r.loops} while loops remain; XLA's cost "
              f"analysis counts each body once, so FLOPs and bytes are undercounted "
              f"(run without --keep_loops for exact costs).", flush=True)
      if not r.error and r.compiled_below_model:
        print(f"WARNING: {r.step}: compiled FLOPs {r.flops:.3g} are below the "
              f"analytic model FLOPs {r.model_flops:.3g}; a custom kernel does not "
              f"declare its cost, so the roofline is optimistic.", flush=True)
    if _JSON.value:
      with open(_JSON.value, "w", encoding="utf-8") as f:
        json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)


if __name__ == "__main__":
  app.run(main)
