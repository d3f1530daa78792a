"""grain input pipelines for each ProCIR mode, from TFDS records to global batches.

    records (tfds.data_source)  ->  IndexSampler (seeded shuffle, per-epoch reshuffle,
    ShardByJaxProcess)  ->  MakeExample (decode, patchify, render dialogues; workers)
    ->  Batch(collate into bucketed static shapes)  ->  global jax.Arrays on the mesh

The loader's iterator has `get_state()`/`set_state()`, so training resumes on the
exact next example (checkpoint it with `grain.checkpoint.CheckpointHandler`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from absl import flags
from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np

from procir_jax.data import dialogue
from procir_jax.data import bucketing, examples, fashionmv
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import (PROCIR_MAX_PIXELS, PROCIR_MIN_PIXELS,
                                               ImageProcessor)

MODES = ("contrastive", "sft", "gallery", "eval_query")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  data_dir: str  # where `tfds build` wrote fashionmv/
  model_dir: str  # tokenizer, chat template and preprocessor config come from here
  global_batch_size: int
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever (training)
  worker_count: int = 0  # grain worker processes; 0 decodes in the main process
  worker_buffer_size: int = 2
  skip_bad_examples: bool = False  # else a bad example stops with its product id
  min_pixels: int = PROCIR_MIN_PIXELS
  max_pixels: int = PROCIR_MAX_PIXELS
  image_backend: str = "torchvision"  # image_processing.BACKENDS
  buckets: bucketing.Buckets = bucketing.Buckets()
  options: examples.ExampleOptions = examples.ExampleOptions()
  # Image groups per process-local batch: one per local batch shard of the mesh
  # (sharding.local_batch_shards), so each device holds the images of its own rows.
  image_groups: int = 1


class _PaddedSource:
  """Pads a source with None records up to a multiple, so every process gets the
  same number of full evaluation batches; None rows become padding rows."""

  def __init__(self, source, multiple: int):
    self._source = source
    self._len = -(-len(source) // multiple) * multiple

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    return self._source[index] if index < len(self._source) else None

  def __repr__(self) -> str:
    return f"Padded({self._source!r}, {self._len})"


class _Indexed:
  """Records paired with their index, so batches can say which record each row is."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    return int(index), self._source[index]

  def __repr__(self) -> str:
    return repr(self._source)


class MakeExample(grain.transforms.Map):
  """(index, record) -> {"sequences", "ids", "error", "index"}; bad input raises or
  is marked skipped."""

  def __init__(self, builder: examples.ExampleBuilder, mode: str,
               buckets: bucketing.Buckets, skip_bad: bool):
    self._builder, self._mode = builder, mode
    self._buckets, self._skip_bad = buckets, skip_bad

  def map(self, indexed):
    index, record = indexed
    if record is None:  # evaluation padding
      return {"sequences": None, "ids": None, "error": None, "index": -1}
    ids = examples.example_ids(record)
    try:
      sequences = getattr(self._builder, self._mode)(record)
      for name, value in sequences.items():
        if isinstance(value, examples.EncodedSequence):
          self._buckets.check(value, f"{name} of {_describe(ids)}")
    except examples.BadExampleError as e:
      if not self._skip_bad:
        raise examples.BadExampleError(
            f"{e} (set data.skip_bad_examples=True to skip such examples; they are "
            f"counted and logged)") from e
      return {"sequences": None, "ids": ids, "error": str(e), "index": index}
    return {"sequences": sequences, "ids": ids, "error": None, "index": index}


def _describe(ids: Mapping[str, str]) -> str:
  if "product_id" in ids:
    return f"product {ids['product_id']!r} ({ids['source']})"
  return (f"triplet row {ids['row']} ({ids['source']}: {ids['source_id']!r} -> "
          f"{ids['target_id']!r})")


class Collate:
  """grain batch_fn: examples -> one batch of bucketed arrays plus host metadata."""

  def __init__(self, names: Sequence[str], num_emb: Mapping[str, int],
               with_images: Mapping[str, bool], buckets: bucketing.Buckets,
               pad_id: int, batch_size: int, image_groups: int = 1,
               patch_dim: int | None = None):
    self.names, self.num_emb, self.with_images = tuple(names), num_emb, with_images
    self.buckets, self.pad_id, self.batch_size = buckets, pad_id, batch_size
    self.image_groups, self.patch_dim = image_groups, patch_dim

  def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    items = list(items) + [{"sequences": None, "ids": None, "error": None,
                            "index": -1}] * (self.batch_size - len(items))
    valid = np.asarray([it["sequences"] is not None for it in items])
    # Which record each row is (-1: padding); travels with the arrays so that hosts
    # can name the rows of a global batch.
    index = np.asarray([it["index"] if it["sequences"] is not None else -1
                        for it in items], np.int32)
    batch: dict[str, Any] = {"valid": valid, "index": index}
    for name in self.names:
      batch[name] = self.buckets.collate(
          [it["sequences"][name] if it["sequences"] else None for it in items],
          self.pad_id, self.num_emb[name], self.with_images[name],
          image_groups=self.image_groups, patch_dim=self.patch_dim)
      flag = f"has_{name}"
      if any(it["sequences"] and flag in it["sequences"] for it in items):
        batch[flag] = np.asarray([bool(it["sequences"] and it["sequences"][flag])
                                  for it in items])
    batch["meta"] = {
        "ids": [it["ids"] for it in items],
        "skipped": [it["error"] for it in items if it["error"]],
    }
    return batch


def _num_emb(mode: str, options: examples.ExampleOptions) -> dict[str, int]:
  query = 2 if options.two_stage else 1
  return {"query": query, "document": 1, "source_caption": 1, "target_caption": 1,
          "sft": 0}


_WITH_IMAGES = {"query": True, "document": True, "sft": True,
                "source_caption": False, "target_caption": False}


def make_collate(mode: str, config: DataConfig, pad_id: int, batch_size: int,
                 patch_dim: int | None = None) -> Collate:
  if batch_size % config.image_groups:
    raise ValueError(f"The local batch of {batch_size} does not split into "
                     f"{config.image_groups} image groups (one per local batch "
                     f"shard); make the batch size a multiple of the data-parallel "
                     f"device count.")
  return Collate(examples.sequence_names(mode, config.options),
                 _num_emb(mode, config.options), _WITH_IMAGES, config.buckets, pad_id,
                 batch_size, config.image_groups, patch_dim)


def make_builder(config: DataConfig) -> tuple[examples.ExampleBuilder, int]:
  """The example builder for the model directory, and the pad id."""
  tokenizer = tok.load_tokenizer(config.model_dir)
  # A Qwen3.5 checkpoint's own pixel budget is far wider; ProCIR sets its own.
  processor = ImageProcessor.from_pretrained(
      config.model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
      backend=config.image_backend)
  builder = examples.ExampleBuilder(dialogue.Dialogues(tokenizer), processor,
                                    config.options)
  return builder, tok.special_token_ids(tokenizer).pad


def records_for(mode: str, config: DataConfig, split: str,
                sources: Sequence[str] | None = None,
                product_keys: Sequence[fashionmv.ProductKey] | None = None):
  """The random-access records a mode reads."""
  if mode not in MODES:
    raise ValueError(f"Unknown data mode {mode!r}; one of {MODES}.")
  products = fashionmv.Products(config.data_dir, split)
  if mode in ("contrastive", "eval_query"):
    return fashionmv.JoinedTriplets(
        products, fashionmv.Triplets(config.data_dir, split), sources)
  if product_keys is not None:
    return products.select(product_keys)
  return products


def make_loader(mode: str, config: DataConfig, records, *, train: bool
                ) -> grain.DataLoader:
  """A grain DataLoader over `records` yielding process-local batches.

  Training: seeded shuffle with a new order each epoch, full batches only. Evaluation:
  file order, one pass, the last batch padded with invalid rows, and the same number
  of batches on every process.
  """
  processes = jax.process_count()
  if config.global_batch_size % processes:
    raise ValueError(f"global_batch_size {config.global_batch_size} must divide "
                     f"evenly over {processes} processes.")
  local_batch = config.global_batch_size // processes
  if not train:
    records = _PaddedSource(records, local_batch * processes)
  if len(records) < local_batch * processes:
    raise ValueError(f"{len(records)} {mode} records cannot fill one global batch of "
                     f"{config.global_batch_size}; lower the batch size.")
  if config.worker_count and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (notebooks,
    # tests, other projects) nothing has parsed them, so take the defaults.
    flags.FLAGS.mark_as_parsed()
  builder, pad_id = make_builder(config)
  sampler = grain.samplers.IndexSampler(
      num_records=len(records),
      shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
      shuffle=train, num_epochs=config.num_epochs if train else 1, seed=config.seed)
  collate = make_collate(mode, config, pad_id, local_batch,
                         patch_dim=3 * builder.processor.patch_size ** 2)
  return grain.DataLoader(
      data_source=_Indexed(records), sampler=sampler,
      operations=[MakeExample(builder, mode, config.buckets,
                              config.skip_bad_examples),
                  grain.transforms.Batch(local_batch, drop_remainder=train,
                                         batch_fn=collate)],
      worker_count=config.worker_count, worker_buffer_size=config.worker_buffer_size)


# --- onto the mesh ---------------------------------------------------------------


def device_part(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The arrays a step consumes (host metadata left out)."""
  return {k: v for k, v in batch.items() if k != "meta"}


def agree_on_shapes(batch: Mapping[str, Any]) -> dict[str, Any]:
  """Pads every process's arrays to the largest bucket any process picked.

  Processes bucket their own examples, so they can choose different sizes; global
  arrays need one shape. Padding is zeros, which every mask already marks as padding.
  """
  part = device_part(batch)
  if jax.process_count() == 1:
    return part
  leaves, treedef = jax.tree.flatten(part)
  shapes = np.asarray([list(x.shape) + [0] * (4 - x.ndim) for x in leaves], np.int32)
  largest = np.max(multihost_utils.process_allgather(shapes), axis=0)
  padded = []
  for x, target in zip(leaves, largest):
    widths = [(0, int(t) - s) for s, t in zip(x.shape, target)]
    padded.append(np.pad(x, widths) if any(w for _, w in widths) else x)
  return jax.tree.unflatten(treedef, padded)


def to_global(batch: Mapping[str, Any], sharding_for) -> dict[str, jax.Array]:
  """Process-local batch -> global jax.Arrays, split along the batch axis.

  `sharding_for(ndim)` gives the NamedSharding of an array of that rank (batch axis
  first, over the mesh's data axes).
  """
  part = agree_on_shapes(batch)

  def put(path, x):
    try:
      return jax.make_array_from_process_local_data(sharding_for(x.ndim), x)
    except ValueError as e:
      name = jax.tree_util.keystr(path)
      hint = (" Images are packed in DataConfig.image_groups groups; set it to the "
              "process's batch shards (sharding.local_batch_shards(mesh))."
              if "patches" in name or "image_grid" in name else "")
      raise ValueError(f"Batch array {name} of shape {x.shape} does not split over "
                       f"the mesh: {e}{hint}") from e

  return jax.tree_util.tree_map_with_path(put, part)


def log_skips(batch: Mapping[str, Any], counter: dict[str, int]) -> None:
  """Counts and logs the examples a batch skipped (data.skip_bad_examples)."""
  for message in batch["meta"]["skipped"]:
    counter["skipped"] = counter.get("skipped", 0) + 1
    logging.warning("Skipped example %d: %s", counter["skipped"], message)
