"""Objects built from a config: the pipeline's settings, the model, its trained
parameters, the loss. Each takes plain directories, so tools, benchmarks and tests
build the same objects the modes do without a workdir."""

from __future__ import annotations

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from procir_jax import procir as procir_lib
from procir_jax import sharding
from procir_jax.data import bucketing, examples, pipeline
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import ModelOptions, grow_vocab, load_pretrained
from procir_jax.train import checkpoint as ckpt_lib

# What validation during training reports and keeps the best checkpoints by.
VALIDATION_METRIC = "Average_R@10"

EVAL_BACKENDS = ("exact", "scann")


def data_config(config, *, data_dir: str, model_dir: str, batch_size: int,
                cot: bool | None = None, max_views: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> pipeline.DataConfig:
  """The pipeline's settings for batches that `mesh` will split (None: one device).

  `cot` and `max_views` override the config's (the evaluation encodes without
  reasoning and with `eval.max_views`)."""
  p = config.procir
  views = config.data.max_views if max_views is None else max_views
  return pipeline.DataConfig(
      data_dir=data_dir, model_dir=model_dir, global_batch_size=batch_size,
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


def eval_data_config(config, *, data_dir: str, model_dir: str,
                     mesh: jax.sharding.Mesh | None = None,
                     batch_size: int | None = None) -> pipeline.DataConfig:
  """The settings the evaluation encodes with: no reasoning, `eval.max_views` views
  (the release always encodes 5), `data.eval_batch_size` unless given."""
  return data_config(config, data_dir=data_dir, model_dir=model_dir,
                     batch_size=batch_size or config.data.eval_batch_size, cot=False,
                     max_views=config.eval.max_views, mesh=mesh)


def model_options(config, mesh: jax.sharding.Mesh) -> ModelOptions:
  """The model's execution options, "auto" resolved for the mesh's devices."""
  return ModelOptions(attention=config.model.attention,
                      delta_rule=config.model.delta_rule, remat=config.model.remat,
                      scan_layers=config.model.scan_layers,
                      interpret_kernels=config.model.interpret_kernels).for_platform(
                          mesh.devices.flat[0].platform)


def load_model(config, model_dir: str, mesh: jax.sharding.Mesh) -> procir_lib.ProCIR:
  """The Qwen3.5 model (vocabulary grown for <emb_all> if needed) with ProCIR's head."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
  model = load_pretrained(model_dir, dtype=dtype, options=model_options(config, mesh))
  tokenizer = tok.load_tokenizer(model_dir)
  missing = len(tokenizer) - model.config.text.vocab_size
  if missing > 0:
    logging.info("Growing the vocabulary by %d token(s) for %s.", missing,
                 tok.EMB_TOKEN)
    grow_vocab(model, missing)
  processor = ImageProcessor.from_pretrained(model_dir,
                                             backend=config.data.image_backend)
  return procir_lib.ProCIR(model, config.loss.temperature, processor.pixel_norm)


def load_trained(config, model_dir: str, mesh: jax.sharding.Mesh, *,
                 checkpoint_dir: str | None, which: str = "latest",
                 required: bool = False):
  """(graphdef, params, step): the model of `model_dir` with the trained parameters
  of `checkpoint_dir`'s step `step` when it holds a checkpoint, else the model
  directory as it is and step None (or FileNotFoundError when `required`). The step
  is the one restored, not one listed before: a training run may save beside this.

  Only the parameters are restored: the optimizer's moments are never read.
  `which`: "latest", or "best" by validation when checkpoints kept validation
  metrics (else the latest).
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which checkpoint: 'latest' or 'best', got {which!r}.")
  graphdef, params = nnx.split(load_model(config, model_dir, mesh), nnx.Param)
  if not checkpoint_dir or not epath.Path(checkpoint_dir).exists():
    checkpointer = None
  else:
    checkpointer = ckpt_lib.Checkpointer(checkpoint_dir,
                                         best_metric=VALIDATION_METRIC)
  try:
    if checkpointer is None or checkpointer.latest_step() is None:
      if required:
        raise FileNotFoundError(f"{checkpoint_dir} holds no checkpoint.")
      return graphdef, params, None
    best = checkpointer.best_step() if which == "best" else None
    if which == "best" and best is None:
      logging.info("No checkpoint in %s kept validation metrics: taking the latest.",
                   checkpoint_dir)
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
    logging.info("Using the trained state of step %d from %s%s.", step,
                 checkpoint_dir, f" (best {VALIDATION_METRIC})" if best is not None
                 else "")
    return graphdef, restored["params"], step
  finally:
    if checkpointer is not None:
      checkpointer.close()


def loss_config(config) -> procir_lib.LossConfig:
  return procir_lib.LossConfig(**config.loss.to_dict())


def stage_config(config, section: str):
  """`train` settings with a stage's overrides (e.g. the SFT stage's steps and lr)."""
  merged = ml_collections.ConfigDict(config.train.to_dict())
  merged.update(config[section].to_dict())
  return merged


def eval_backends(config) -> tuple[str, ...]:
  """`config.eval.backends`, checked: exact search (the released protocol) and
  optionally ScaNN, reported beside it with its top-10 overlap with exact."""
  backends = config_names(config.eval.backends)
  unknown = [b for b in backends if b not in EVAL_BACKENDS]
  if unknown or "exact" not in backends:
    raise ValueError(
        f"config.eval.backends={backends!r}: each must be one of {EVAL_BACKENDS} and "
        f"'exact' must be among them (it gives the released protocol's numbers), "
        f"e.g. --config.eval.backends=exact or --config.eval.backends=exact,scann.")
  return backends


def config_names(value) -> tuple[str, ...]:
  """A tuple of names from a config value; a command line gives "a,b" as one string."""
  items = (value,) if isinstance(value, str) else tuple(value or ())
  return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def embedding_fingerprint(config, model_dir: str, trained: dict) -> dict:
  """What embeddings depend on: the model directory (its files' sizes and times), the
  trained state (`trained`: {"dir", "step"}), and the config keys that change an
  embedding. A collection records it, and a rerun with another one is refused."""
  model_dir = epath.Path(model_dir).resolve()
  files = {}
  for f in sorted(model_dir.iterdir()):
    if f.is_file():
      stat = f.stat()
      files[f.name] = [int(stat.length), int(stat.mtime)]
  # remat only trades memory for recomputation: the same numbers either way.
  model = {k: v for k, v in config.model.to_dict().items() if k != "remat"}
  return dict(
      model_dir=str(model_dir), model_files=files, checkpoint=trained, model=model,
      data=dict(image_backend=config.data.image_backend,
                lengths=list(config.data.lengths), patches=list(config.data.patches),
                max_views=config.eval.max_views),
      procir=config.procir.to_dict())
