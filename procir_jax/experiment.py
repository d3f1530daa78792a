"""What `main` runs: data and model set-up from a config, and the four modes."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections

from procir_jax import procir as procir_lib
from procir_jax import tiny_model
from procir_jax.data import bucketing, examples, fashionmv, pipeline
from procir_jax.data import tokenizer as tok
from procir_jax.eval import encode as encode_lib
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import ModelOptions, grow_vocab, load_pretrained
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax.train import loop as loop_lib
from procir_jax import sharding
from procir_jax.train import optimizer as opt_lib
from procir_jax.train import resume as resume_lib
from procir_jax.train import step as step_lib


# What validation during training reports and keeps the best checkpoints by.
VALIDATION_METRIC = "Average_R@10"


@dataclasses.dataclass(frozen=True)
class Paths:
  workdir: epath.Path
  data_dir: str
  model_dir: str


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Paths:
  """Finds or makes the TFDS data and the model directory the config names.

  Empty `data.manual_dir` means a synthetic FashionMV in the workdir; empty
  `model.hf_dir` means a tiny random Qwen3.5 there. Work already done is reused.
  """
  import tensorflow_datasets as tfds  # only set-up needs the builder
  import tfds_fashionmv  # noqa: F401
  from tfds_fashionmv import synthetic

  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = config.data.data_dir or str(workdir / "tfds")
  manual_dir = config.data.manual_dir
  builders = [tfds.builder(f"fashionmv/{name}", data_dir=data_dir)
              for name in ("products", "triplets")]
  missing = [b for b in builders if not b.is_prepared()]
  if missing and not manual_dir and not config.data.use_synthetic:
    raise ValueError("Set --config.data.manual_dir to the FashionMV release (data/ and "
                     "images/, see the README), or --config.data.data_dir to where "
                     "`tfds build` wrote fashionmv.")
  if not config.model.hf_dir and not config.model.tiny_preset:
    raise ValueError("Set --config.model.hf_dir to a local Qwen3.5 (or ProCIR) "
                     "checkpoint directory.")
  if missing and jax.process_index() == 0:
    if not manual_dir:
      manual_dir = str(workdir / "fashionmv_release")
      if not (epath.Path(manual_dir) / "data" / "val_captions.jsonl").exists():
        logging.info("Writing a synthetic FashionMV to %s.", manual_dir)
        synthetic.generate(manual_dir, synthetic.SyntheticConfig(
            seed=config.seed, **config.data.synthetic.to_dict()))
    for builder in missing:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir))
  model_dir = config.model.hf_dir
  if not model_dir:
    model_dir = str(workdir / f"tiny_model_{config.model.tiny_preset}")
    if jax.process_index() == 0 and not (epath.Path(model_dir) /
                                         "model.safetensors").exists():
      tiny_model.write_model_dir(model_dir, config.model.tiny_preset, config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("procir_prepare")
  return Paths(workdir, data_dir, model_dir)


def data_config(config, paths: Paths, *, batch_size: int, cot: bool | None = None,
                max_views: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> pipeline.DataConfig:
  """The pipeline's settings for batches that `mesh` will split (None: one device).

  `cot` and `max_views` override the config's (the evaluation encodes without
  reasoning and with `eval.max_views`)."""
  p = config.procir
  views = config.data.max_views if max_views is None else max_views
  return pipeline.DataConfig(
      data_dir=paths.data_dir, model_dir=paths.model_dir, global_batch_size=batch_size,
      seed=config.seed, worker_count=config.data.worker_count,
      image_backend=config.data.image_backend,
      skip_bad_examples=config.data.skip_bad_examples,
      buckets=bucketing.Buckets(lengths=tuple(config.data.lengths),
                                patches=tuple(config.data.patches),
                                max_images=views),
      options=examples.ExampleOptions(
          two_stage=p.two_stage, align=p.align, cot=p.cot if cot is None else cot,
          query_text=config.data.query_text, max_views=views),
      image_groups=sharding.local_batch_shards(mesh) if mesh is not None else 1)


def model_options(config, mesh: jax.sharding.Mesh) -> ModelOptions:
  """The model's execution options, "auto" resolved for the mesh's devices."""
  return ModelOptions(attention=config.model.attention,
                      delta_rule=config.model.delta_rule, remat=config.model.remat,
                      scan_layers=config.model.scan_layers,
                      interpret_kernels=config.model.interpret_kernels).for_platform(
                          mesh.devices.flat[0].platform)


def load_model(config, paths: Paths, mesh: jax.sharding.Mesh) -> procir_lib.ProCIR:
  """The Qwen3.5 model (vocabulary grown for <emb_all> if needed) with ProCIR's head."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
  model = load_pretrained(paths.model_dir, dtype=dtype,
                          options=model_options(config, mesh))
  tokenizer = tok.load_tokenizer(paths.model_dir)
  missing = len(tokenizer) - model.config.text.vocab_size
  if missing > 0:
    logging.info("Growing the vocabulary by %d token(s) for %s.", missing,
                 tok.EMB_TOKEN)
    grow_vocab(model, missing)
  processor = ImageProcessor.from_pretrained(paths.model_dir,
                                             backend=config.data.image_backend)
  return procir_lib.ProCIR(model, config.loss.temperature, processor.pixel_norm)


def loss_config(config) -> procir_lib.LossConfig:
  return procir_lib.LossConfig(**config.loss.to_dict())


def _train_stage(config, paths: Paths, procir, mesh, *, mode: str, steps: int,
                 train_cfg, name: str, validate=None) -> tuple[Any, step_lib.Trainer]:
  data_mode = "sft" if mode == "sft" else "contrastive"
  dcfg = data_config(config, paths, batch_size=config.data.global_batch_size,
                     mesh=mesh)
  records = pipeline.records_for(data_mode, dcfg, "train")
  loader = pipeline.make_loader(data_mode, dcfg, records, train=True)
  checkpointer = ckpt_lib.Checkpointer(
      str(paths.workdir / "checkpoints" / name), max_to_keep=config.train.max_to_keep,
      best_metric=VALIDATION_METRIC if validate else None)
  schedule = resume_lib.checked_schedule(
      checkpointer.saved_config(), config.to_dict(),
      "sft" if mode == "sft" else "train", train_cfg,
      allow=config.train.allow_resume_changes, where=str(checkpointer.directory))
  trainer = step_lib.Trainer(
      procir, opt_lib.make_optimizer(schedule, nnx.state(procir, nnx.Param)), mesh,
      loss_config(config),
      mode=mode, cot=config.procir.cot, skip_nonfinite=config.train.skip_nonfinite)
  state = loop_lib.train(
      trainer, loader, checkpointer,
      loop_lib.LoopConfig(steps=steps, log_every=config.train.log_every,
                          eval_every=config.train.eval_every if validate else 0,
                          checkpoint_every=config.train.checkpoint_every,
                          skip_nonfinite=config.train.skip_nonfinite,
                          fall_back_on_bad_checkpoint=(
                              config.train.fall_back_on_bad_checkpoint),
                          profile_steps=loop_lib.parse_profile_steps(
                              train_cfg.get("profile_steps", "")),
                          profile_dir=str(paths.workdir / "profile" / name)),
      workdir=str(paths.workdir / "metrics" / name), config_dict=config.to_dict(),
      validate=validate, global_batch_size=config.data.global_batch_size)
  checkpointer.close()
  return state, trainer


def stage_config(config, section: str):
  """`train` settings with a stage's overrides (e.g. the SFT stage's steps and lr)."""
  merged = ml_collections.ConfigDict(config.train.to_dict())
  merged.update(config[section].to_dict())
  return merged


def check_evaluation_data(config, paths: Paths, *, validating: bool) -> None:
  """Before any training or encoding: names the sources the build holds nothing to
  evaluate for (the evaluation leaves them out), and stops when nothing is left."""
  eval_backends(config)  # a bad value stops here, not after training
  dcfg = data_config(config, paths, batch_size=config.data.eval_batch_size, cot=False,
                     max_views=config.eval.max_views)
  sources = tuple(config.eval.sources)
  missing = encode_lib.missing_sources(dcfg, config.eval.split, sources)
  for source, why in missing.items():
    logging.warning("The evaluation will leave %s out: %s", source, why)
  present = [s for s in sources if s not in missing]
  if not present:
    raise ValueError(
        f"The {config.eval.split} data in {paths.data_dir} holds nothing to evaluate "
        f"for any of config.eval.sources={sources}: "
        + "; ".join(f"{k}: {v}" for k, v in missing.items())
        + " Put the sources' images under the release's images/ folder and rebuild "
        "(README, 'What a build drops'), or choose sources the build holds.")
  val_sources = tuple(config.eval.validation_sources)
  if validating and all(s in missing for s in val_sources):
    raise ValueError(
        f"config.eval.validation_sources={val_sources} has nothing to validate on in "
        f"this build; set --config.eval.validation_sources to sources it holds, "
        f"e.g. {present[0]!r}, or --config.train.eval_every=0.")


def run_train(config, workdir: str) -> dict[str, float]:
  paths = prepare(config, workdir)
  check_evaluation_data(config, paths, validating=bool(config.train.eval_every))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  procir = load_model(config, paths, mesh)
  if config.procir.sft:
    state, trainer = _train_stage(config, paths, procir, mesh, mode="sft",
                                  steps=config.sft.steps,
                                  train_cfg=stage_config(config, "sft"), name="sft")
    procir = trainer.procir(state)
  graphdef = nnx.split(procir, nnx.Param)[0]
  encoder = encode_lib.Encoder(graphdef, mesh)  # compiled once for every validation

  def validate(state):
    return evaluate(config, paths, graphdef, state.params, mesh,
                    sources=config.eval.validation_sources, backends=("exact",),
                    write=False, encoder=encoder)

  state, trainer = _train_stage(config, paths, procir, mesh, mode="contrastive",
                                steps=config.train.steps, train_cfg=config.train,
                                name="contrastive",
                                validate=validate if config.train.eval_every else None)
  return evaluate(config, paths, trainer.graphdef, state.params, mesh)


EVAL_BACKENDS = ("exact", "scann")


def eval_backends(config) -> tuple[str, ...]:
  """`config.eval.backends`, checked: exact search (the released protocol) and
  optionally ScaNN, reported beside it with its top-10 overlap with exact."""
  # A command line gives "exact,scann" as one string: accept commas inside items too.
  backends = tuple(b.strip() for item in config.eval.backends
                   for b in str(item).split(",") if b.strip())
  unknown = [b for b in backends if b not in EVAL_BACKENDS]
  if unknown or "exact" not in backends:
    raise ValueError(
        f"config.eval.backends={backends!r}: each must be one of {EVAL_BACKENDS} and "
        f"'exact' must be among them (it gives the released protocol's numbers), "
        f"e.g. --config.eval.backends=exact or --config.eval.backends=exact,scann.")
  return backends


def evaluate(config, paths: Paths, graphdef, params, mesh,
             sources=None, backends=None, write: bool = True,
             encoder: encode_lib.Encoder | None = None) -> dict[str, float]:
  """The released protocol on the validation split: results.json, table, npz,
  report.html.

  `backends` defaults to `config.eval.backends`."""
  from procir_jax.eval import recall, report, report_html

  backends = eval_backends(config) if backends is None else backends

  dcfg = data_config(config, paths, batch_size=config.data.eval_batch_size, cot=False,
                     max_views=config.eval.max_views, mesh=mesh)
  embeddings = encode_lib.encode_datasets(params, graphdef, mesh, dcfg,
                                          config.eval.split,
                                          sources or config.eval.sources, encoder)
  if not write:
    return recall.evaluate(embeddings, backends=backends).results_json("exact")
  results = None
  if jax.process_index() == 0:
    # Views for report.html's example queries, read only for the products shown.
    views = report_html.product_views(fashionmv.Products(paths.data_dir,
                                                         config.eval.split))
    results = report.evaluate_and_write(paths.workdir / "eval", embeddings,
                                        backends=backends, views=views)
    for d in results.datasets:
      print(f"  chance R@10 on {d.name}'s gallery of {d.num_gallery}: "
            f"{recall.chance_recall(10, d.num_gallery):.1f}")
    print(f"Results in {paths.workdir / 'eval'}")
    return results.results_json("exact")
  return {}


def run_sft(config, workdir: str) -> None:
  """Only the SFT stage (captioning from views); `train` starts from its result."""
  paths = prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  _train_stage(config, paths, load_model(config, paths, mesh), mesh, mode="sft",
               steps=config.sft.steps, train_cfg=stage_config(config, "sft"),
               name="sft")


def load_trained(config, workdir: str, *, which: str = "latest"):
  """(paths, mesh, graphdef, params): the model, with its trained state.

  The state comes from `model.checkpoint` when set, else from the workdir's own
  contrastive checkpoints when there are any, else the model directory as it is.
  `which`: "latest", or "best" by validation when checkpoints kept validation
  metrics (else the latest).
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which checkpoint: 'latest' or 'best', got {which!r}.")

  paths = prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  procir = load_model(config, paths, mesh)
  graphdef, params = nnx.split(procir, nnx.Param)
  directory = config.model.checkpoint or str(paths.workdir / "checkpoints" /
                                             "contrastive")
  checkpointer = ckpt_lib.Checkpointer(directory, best_metric=VALIDATION_METRIC) if (
      epath.Path(directory).exists()) else None
  if checkpointer is not None and checkpointer.latest_step() is not None:
    best = checkpointer.best_step() if which == "best" else None
    if which == "best" and best is None:
      logging.info("No checkpoint in %s kept validation metrics: taking the latest.",
                   directory)
    # Only the parameters: the optimizer's moments are never read.
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": params}, sharding.tree_shardings({"params": params}, mesh))
    if best is not None:
      step, restored = checkpointer.restore(best, abstract, partial=True)
    else:
      # Evaluation may run beside the training run that owns these checkpoints: skip
      # a damaged step but leave it where it is.
      step, restored = checkpointer.restore_latest(abstract, move_aside=False,
                                                   partial=True)
    params = restored["params"]
    logging.info("Using the trained state of step %d from %s%s.", step, directory,
                 f" (best {VALIDATION_METRIC})" if best is not None else "")
  elif config.model.checkpoint:
    raise FileNotFoundError(f"model.checkpoint={directory} holds no checkpoint.")
  if checkpointer is not None:
    checkpointer.close()
  return paths, mesh, graphdef, params


def run_eval(config, workdir: str) -> dict[str, float]:
  """Evaluates `model.hf_dir`, or its trained state (see `load_trained`)."""
  paths, mesh, graphdef, params = load_trained(config, workdir)
  check_evaluation_data(config, paths, validating=False)
  return evaluate(config, paths, graphdef, params, mesh)


def run_embed(config, workdir: str) -> None:
  """Exports gallery and query embeddings of every source to <workdir>/embeddings."""
  from procir_jax.eval import report

  paths, mesh, graphdef, params = load_trained(config, workdir)
  dcfg = data_config(config, paths, batch_size=config.data.eval_batch_size, cot=False,
                     max_views=config.eval.max_views, mesh=mesh)
  embeddings = encode_lib.encode_datasets(params, graphdef, mesh, dcfg,
                                          config.eval.split, config.eval.sources)
  if jax.process_index() == 0:
    for e in embeddings:
      path = report.save_embeddings(paths.workdir / "embeddings" / f"{e.dataset}.npz",
                                    e)
      print(f"{e.dataset}: {len(e.gallery_ids)} gallery products, {len(e.q)} queries "
            f"-> {path}")


def run_export(config, workdir: str) -> str:
  """Writes the trained model as a Hugging Face directory (see `export`)."""
  from procir_jax import export as export_lib

  paths, mesh, graphdef, params = load_trained(config, workdir,
                                               which=config.export.checkpoint)
  procir = nnx.merge(graphdef, params)
  out_dir = config.export.dir or str(paths.workdir / "hf_export")
  out = export_lib.export(procir.model, paths.model_dir, out_dir,
                          dtype=config.export.dtype,
                          max_shard_gb=config.export.max_shard_gb)
  if jax.process_index() == 0:
    print(f"Exported to {out}: load it with transformers' "
          f"Qwen3_5ForConditionalGeneration.from_pretrained and AutoProcessor, or "
          f"use it as --config.model.hf_dir.")
  return str(out)
