"""What `main` runs: one function per `--config.mode`.

Each mode provisions its data and model (`provision`), builds what it needs from the
config (`factories`) and runs: training stages, evaluation, embedding, export.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax

from procir_jax import factories
from procir_jax import provision
from procir_jax import sharding
from procir_jax.data import fashionmv, pipeline, product_keys
from procir_jax.eval import encode as encode_lib
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax.train import loop as loop_lib
from procir_jax.train import optimizer as opt_lib
from procir_jax.train import resume as resume_lib
from procir_jax.train import step as step_lib


def _train_stage(config, paths: provision.Paths, procir, mesh, *, mode: str,
                 steps: int, train_cfg, name: str,
                 validate=None) -> tuple[Any, step_lib.Trainer]:
  data_mode = "sft" if mode == "sft" else "contrastive"
  dcfg = factories.data_config(config, data_dir=paths.data_dir,
                               model_dir=paths.model_dir,
                               batch_size=config.data.global_batch_size, mesh=mesh)
  records = pipeline.records_for(data_mode, dcfg, "train")
  loader = pipeline.make_loader(data_mode, dcfg, records, train=True)
  checkpointer = ckpt_lib.Checkpointer(
      str(paths.workdir / "checkpoints" / name), max_to_keep=config.train.max_to_keep,
      best_metric=factories.VALIDATION_METRIC if validate else None)
  schedule = resume_lib.checked_schedule(
      checkpointer.saved_config(), config.to_dict(),
      "sft" if mode == "sft" else "train", train_cfg,
      allow=config.train.allow_resume_changes, where=str(checkpointer.directory))
  trainer = step_lib.Trainer(
      procir, opt_lib.make_optimizer(schedule, nnx.state(procir, nnx.Param)), mesh,
      factories.loss_config(config),
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


def check_evaluation_data(config, paths: provision.Paths, *, validating: bool) -> None:
  """Before any training or encoding: names the sources the build holds nothing to
  evaluate for (the evaluation leaves them out), and stops when nothing is left."""
  factories.eval_backends(config)  # a bad value stops here, not after training
  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir)
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
  paths = provision.prepare(config, workdir)
  check_evaluation_data(config, paths, validating=bool(config.train.eval_every))
  mesh = sharding.make_mesh(config.mesh.to_dict())
  procir = factories.load_model(config, paths.model_dir, mesh)
  if config.procir.sft:
    state, trainer = _train_stage(config, paths, procir, mesh, mode="sft",
                                  steps=config.sft.steps,
                                  train_cfg=factories.stage_config(config, "sft"),
                                  name="sft")
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


def evaluate(config, paths: provision.Paths, graphdef, params, mesh,
             sources=None, backends=None, write: bool = True,
             encoder: encode_lib.Encoder | None = None) -> dict[str, float]:
  """The released protocol on the validation split: results.json, table, npz,
  report.html.

  `backends` defaults to `config.eval.backends`."""
  from procir_jax.eval import recall, report
  from procir_jax.eval.pages import report_page

  backends = factories.eval_backends(config) if backends is None else backends

  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir, mesh=mesh)
  embeddings = encode_lib.encode_datasets(params, graphdef, mesh, dcfg,
                                          config.eval.split,
                                          sources or config.eval.sources, encoder)
  if not write:
    return recall.evaluate(embeddings, backends=backends).results_json("exact")
  results = None
  if jax.process_index() == 0:
    # Views for report.html's example queries, read only for the products shown.
    views = report_page.product_views(fashionmv.Products(paths.data_dir,
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
  paths = provision.prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  _train_stage(config, paths, factories.load_model(config, paths.model_dir, mesh),
               mesh, mode="sft", steps=config.sft.steps,
               train_cfg=factories.stage_config(config, "sft"), name="sft")


def load_trained(config, workdir: str, *, which: str = "latest"):
  """(paths, mesh, graphdef, params): the model, with its trained state.

  The state comes from `model.checkpoint` when set, else from the workdir's own
  contrastive checkpoints when there are any, else the model directory as it is.
  `which`: see `factories.load_trained`.
  """
  paths = provision.prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  graphdef, params, _ = _load_trained(config, paths, mesh, which)
  return paths, mesh, graphdef, params


def _checkpoint_dir(config, paths: provision.Paths) -> str:
  return config.model.checkpoint or str(paths.contrastive_checkpoints)


def _load_trained(config, paths: provision.Paths, mesh, which: str = "latest"):
  return factories.load_trained(
      config, paths.model_dir, mesh, checkpoint_dir=_checkpoint_dir(config, paths),
      which=which, required=bool(config.model.checkpoint))


def run_eval(config, workdir: str) -> dict[str, float]:
  """Evaluates `model.hf_dir`, or its trained state (see `load_trained`)."""
  paths, mesh, graphdef, params = load_trained(config, workdir)
  check_evaluation_data(config, paths, validating=False)
  return evaluate(config, paths, graphdef, params, mesh)


EMBED_COLLECTIONS = ("products", "evaluation")


def run_embed(config, workdir: str) -> None:
  """Embeds what `config.embed.collection` names (see configs/base.py, README):

  "products": every product of `embed.split` (of `embed.sources`; all when empty) of
  the TFDS dataset `embed.dataset` in `embed.data_dir` (empty: the run's data) into a
  sharded collection under <workdir>/embeddings/<embed.name>, each process writing
  its own shards; a rerun finishes an interrupted one (procir_jax/eval/collection.py).
  "evaluation": the evaluation's gallery and query embeddings of every source of
  `eval.sources` to <workdir>/embeddings/<source>.npz.
  """
  e = config.embed
  if e.collection == "evaluation":
    _embed_evaluation(config, workdir)
    return
  from procir_jax.eval import collection as collection_lib

  if e.collection not in EMBED_COLLECTIONS:
    raise ValueError(f"config.embed.collection must be one of {EMBED_COLLECTIONS}, "
                     f"got {e.collection!r}.")
  if e.dtype not in collection_lib.DTYPES:
    raise ValueError(f"config.embed.dtype must be one of {collection_lib.DTYPES}, got "
                     f"{e.dtype!r}.")
  for field, unit in (("shard_size", "products"), ("key_block_records", "records")):
    if not isinstance(e[field], int) or e[field] < 1:
      raise ValueError(f"config.embed.{field} must be a whole number of {unit} "
                       f">= 1, got {e[field]!r}.")
  sources = factories.config_names(e.sources)
  paths = provision.prepare(config, workdir)
  data_dir = e.data_dir or paths.data_dir
  # Every process reads a share of the records' keys, kept for reruns.
  products = fashionmv.Products(
      data_dir, e.split, dataset=e.dataset, keys=functools.partial(
          product_keys.shared_scan, block_records=e.key_block_records,
          directory=paths.workdir / "product_keys" /
          f"{e.dataset.replace('/', '_')}-{e.split}"))
  keys = products.keys()
  absent = [s for s in sources if not any(k[0] == s for k in keys)]
  if absent:
    held = sorted({k[0] for k in keys})
    raise ValueError(f"config.embed.sources={sources}: {e.dataset} {e.split} in "
                     f"{data_dir} holds no products of {absent}; it holds {held}.")
  keys = [k for k in keys if not sources or k[0] in sources]
  mesh = sharding.make_mesh(config.mesh.to_dict())
  graphdef, params, step = _load_trained(config, paths, mesh)
  trained = dict(dir=str(epath.Path(_checkpoint_dir(config, paths)).resolve())
                 if step is not None else "", step=step)
  name = e.name or "-".join(
      ([e.dataset.replace("/", "_")] if e.dataset != "fashionmv/products" else [])
      + [e.split, *sources])
  if "/" in name or name in (".", ".."):
    raise ValueError(f"config.embed.name must be a folder name (it goes under "
                     f"<workdir>/embeddings/), got {name!r}.")
  directory = paths.workdir / "embeddings" / name
  dcfg = factories.eval_data_config(config, data_dir=data_dir,
                                    model_dir=paths.model_dir, mesh=mesh)
  stats = collection_lib.write_collection(
      directory, [collection_lib.product_id(k) for k in keys], products.select(keys),
      encoder=encode_lib.Encoder(graphdef, mesh), params=params, data_cfg=dcfg,
      dim=nnx.merge(graphdef, params).model.config.text.hidden_size,
      fingerprint=factories.embedding_fingerprint(config, paths.model_dir, trained),
      collection=dict(dataset=e.dataset, data_dir=str(epath.Path(data_dir).resolve()),
                      split=e.split, sources=list(sources),
                      version=str(products.version)),
      dtype=e.dtype, shard_size=e.shard_size)
  if jax.process_index() == 0:
    opened = collection_lib.open_collection(directory)
    print(f"{name}: {len(opened)} products, {opened.dim}-d {opened.dtype.name} in "
          f"{opened.num_shards} shards ({stats['kept']} kept from an earlier run) -> "
          f"{directory}; read it with "
          f"procir_jax.eval.collection.open_collection({str(directory)!r}).")


def _embed_evaluation(config, workdir: str) -> None:
  """Gallery and query embeddings of every source to <workdir>/embeddings/*.npz."""
  from procir_jax.eval import report

  paths, mesh, graphdef, params = load_trained(config, workdir)
  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir, mesh=mesh)
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


MODES = {"train": run_train, "sft": run_sft, "eval": run_eval, "embed": run_embed,
         "export": run_export}
