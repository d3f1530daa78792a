"""Builds a gallery search index (ScaNN or exact) that tools/search.py can query.

From embeddings an evaluation or `--config.mode=embed` wrote:

  python tools/build_index.py \
      --embeddings=workdir/base/eval/embeddings/deepfashion.npz \
      --out=workdir/base/index/deepfashion

  python tools/build_index.py --embeddings=workdir/base/embeddings/validation \
      --shard_rows=500000 --out=workdir/base/index/catalogue

A collection directory is read one --shard_rows block at a time (all of it when 0),
so a catalogue bigger than memory is indexed in parts.

Or from a model and the products of a split (every source, or one):

  python tools/build_index.py --config=configs/base.py --workdir=workdir/base \
      --split=validation --source=deepfashion --out=workdir/base/index/deepfashion

The index directory holds the searcher's files and the product ids with relative
paths only, so it can be copied anywhere and loaded there.

A ScaNN index is tuned at build time to return, on held-out queries, a share
--target_recall (0.95) of exact search's top 10: the evaluation's own queries when
the embeddings file holds them, or --tuning_queries=<npy> (--tune_on=auto), else
gallery rows plus noise. The tool prints the recall reached, the settings chosen and
the memory per vector. --shard_rows=N builds one index per N rows (a sharded index,
searched as one); each shard is built in a fresh child process and saved as soon as
it is built. With tuning queries, the shards are then tuned together on the whole
catalogue's exact top 10 (a second pass over the embeddings); without, each shard
tunes on its own rows, which asks for more than the merged search needs when the
catalogue is split at random.

--shard_by=similarity partitions the catalogue instead: one k-means centre per shard
(fitted on a sample), each row to the nearest shard with room (shards of at most
--shard_rows rows, 15% more shards than the rows need), in one pass that also finds
the tuning queries' exact top 10; then, with tuning queries, the whole index is tuned
and each query searches only the shards nearest it:

  python tools/build_index.py --embeddings=workdir/base/embeddings/catalogue \
      --shard_rows=500000 --shard_by=similarity --tuning_queries=queries.npy \
      --out=workdir/base/index/catalogue

The pass writes each shard's rows to a scratch directory inside --out (free disk about
the size of the embeddings), and deletes them as the shards are built.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from procir_jax.eval import search
from procir_jax.eval.search import tuning

_EMBEDDINGS = flags.DEFINE_string(
    "embeddings", None, "An embeddings/<dataset>.npz, or a collection directory that "
    "--config.mode=embed wrote (embeddings/<name>/).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (to "
                                          "encode the products with a model).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (model, data, "
                               "checkpoints).")
_SPLIT = flags.DEFINE_string("split", "validation", "Products split to index.")
_SOURCE = flags.DEFINE_string("source", None, "Only this source (deepfashion, f200k, "
                              "fashiongen); ids are only unique within a source.")
_OUT = flags.DEFINE_string("out", None, "Index directory to write.", required=True)
_BACKEND = flags.DEFINE_enum("backend", "scann", ["scann", "exact"], "Searcher.")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 0, "Rows per shard (0: one index).",
                                   lower_bound=0)
_TARGET_RECALL = flags.DEFINE_float("target_recall", 0.95, "ScaNN: recall@10 of exact "
                                    "search to tune for (0: no tuning, fixed "
                                    "settings).", lower_bound=0, upper_bound=1)
_TUNE_ON = flags.DEFINE_enum("tune_on", "auto", ["auto", "queries", "gallery"],
                             "ScaNN tuning queries: the embeddings file's queries "
                             "(q, or --tuning_queries), gallery rows plus noise, or "
                             "auto: queries when there are some.")
_SHARD_BY = flags.DEFINE_enum(
    "shard_by", "order", ["order", "similarity"], "With --shard_rows: shards of "
    "consecutive rows (order), or a partition by similarity (each row to the shard "
    "of its nearest k-means centre, so that with --tuning_queries each query "
    "searches only the shards nearest it; needs free disk about the size of the "
    "embeddings, for one pass that sorts the rows into their shards).")
_FRESH_PROCESSES = flags.DEFINE_bool(
    "fresh_process_per_shard", True, "Build each shard in a fresh child process, "
    "which gives its memory back when it exits (a long-lived process keeps part of "
    "each ScaNN build's).")
_TUNING_QUERIES = flags.DEFINE_string(
    "tuning_queries", None, "A .npy of float [Q, D] queries to tune ScaNN on, in "
    "place of the embeddings file's q (a collection has none).")


def _from_model():
  from procir_jax import factories, modes
  from procir_jax.data import fashionmv, pipeline
  from procir_jax.eval import encode as encode_lib

  config = _CONFIG.value
  paths, mesh, graphdef, params = modes.load_trained(config, _WORKDIR.value)
  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir, mesh=mesh)
  products = fashionmv.Products(paths.data_dir, _SPLIT.value)
  keys = [k for k in products.keys() if _SOURCE.value in (None, k[0])]
  records = products.select(keys)
  docs, skipped = encode_lib.Encoder(graphdef, mesh).run(
      params, pipeline.make_loader("gallery", dcfg, records, train=False),
      "products", len(keys))
  for message in skipped:
    print(f"skipped: {message}", file=sys.stderr)
  order = sorted(docs)
  ids = [keys[i][1] if _SOURCE.value else f"{keys[i][0]}/{keys[i][1]}" for i in order]
  return np.stack([docs[i][0] for i in order]), ids


def _tuning_queries(queries):
  """The queries ScaNN tunes on, or None for gallery-derived ones."""
  if _TUNE_ON.value == "gallery":
    return None
  if _TUNING_QUERIES.value:
    queries = np.load(_TUNING_QUERIES.value)
    if queries.ndim != 2:
      raise app.UsageError(f"--tuning_queries={_TUNING_QUERIES.value} holds "
                           f"shape {queries.shape}, not [queries, dim]")
  if queries is None or not len(queries):
    if _TUNE_ON.value == "queries":
      raise app.UsageError("--tune_on=queries needs queries: --embeddings=<npz> "
                           "holding q, or --tuning_queries=<npy>; or use "
                           "--tune_on=gallery")
    return None
  return queries


def main(argv):
  del argv
  queries = None
  if _EMBEDDINGS.value and os.path.isdir(_EMBEDDINGS.value):
    _from_collection(_EMBEDDINGS.value)
    return
  if _EMBEDDINGS.value:
    with np.load(_EMBEDDINGS.value) as data:
      embeddings, ids = data["gallery"], [str(i) for i in data["gallery_ids"]]
      if "q" in data.files:
        queries = data["q"].reshape(-1, embeddings.shape[-1])
  elif _CONFIG.value is not None and _WORKDIR.value:
    embeddings, ids = _from_model()
  else:
    raise app.UsageError("Pass --embeddings=<npz>, or --config and --workdir.")
  shard_rows = _SHARD_ROWS.value
  if shard_rows and len(ids) > shard_rows:
    def blocks():
      return ((ids[i:i + shard_rows], embeddings[i:i + shard_rows])
              for i in range(0, len(ids), shard_rows))
    if _SHARD_BY.value == "similarity":
      index = _build_partitioned(blocks, len(ids), embeddings.shape[1],
                                 embeddings.dtype,
                                 embeddings[_sample_rows(len(ids))],
                                 _tuning_queries(queries))
    else:
      index = _build_sharded(blocks, _tuning_queries(queries))
    path = _OUT.value
  else:
    index = search.build_index(embeddings, ids, **_build_kwargs(
        _tuning_queries(queries)))
    path = index.save(_OUT.value)
  _report(index, path, embeddings.shape[1])


def _build_kwargs(tuning_queries):
  tune = bool(_TARGET_RECALL.value)
  return dict(backend=_BACKEND.value,
              tuning_queries=tuning_queries if tune else None,
              settings=dict(target_recall=_TARGET_RECALL.value or None)
              if _BACKEND.value == "scann" else None)


def _build_sharded(blocks, tuning_queries, exact_blocks=None):
  """One index per block of `blocks()` (each saved as soon as it is built).

  With tuning queries, the ScaNN shards are tuned together on the whole
  catalogue's exact top 10 (`ShardedIndex.tune`; the exact pass reads
  `exact_blocks()`, else the blocks, again); without, each shard tunes on its
  own rows plus noise.
  """
  kwargs = _build_kwargs(tuning_queries)
  together = _BACKEND.value == "scann" and kwargs["tuning_queries"] is not None
  if together:
    kwargs.update(tuning_queries=None,
                  settings=search.untuned_shard_settings(kwargs["settings"]))
  # Each shard is saved as soon as it is built and then freed.
  index = search.build_sharded_index(
      _rows_first(blocks()), directory=_OUT.value,
      fresh_processes=_FRESH_PROCESSES.value, **kwargs)
  if together:
    queries = search.l2_normalize(tuning_queries)
    # In small blocks: the loaded index is in memory, and a whole part's scores
    # (queries x rows) and their sort would be gigabytes more.
    rows = tuning.EXACT_BLOCK_ROWS
    exact, _ = tuning.exact_top_k_blocks(
        (search.l2_normalize(emb[i:i + rows])
         for _, emb in (exact_blocks or blocks)()
         for i in range(0, len(emb), rows)), queries, tuning.RECALL_K)
    index.tune(queries, exact, _TARGET_RECALL.value)
    index.save_settings(_OUT.value)
  return index


def _rows_first(blocks):
  """(rows, ids) of each (ids, rows) block, holding no reference to a block once
  it is given (a shard's rows are freed while its child process builds it)."""
  blocks = iter(blocks)
  while True:
    try:
      yield _swap(next(blocks))
    except StopIteration:
      return


def _swap(pair):
  return pair[1], pair[0]


def _sample_rows(count: int) -> np.ndarray:
  """Sorted random rows of a catalogue of `count` to fit the partition on."""
  size = search.partition.sample_size(
      search.partition.num_parts(count, _SHARD_ROWS.value))
  return np.sort(np.random.default_rng(0).choice(count, min(count, size),
                                                 replace=False))


def _build_partitioned(blocks, count, dim, dtype, sample, tuning_queries):
  """Shards partitioned by similarity (`search.build_partitioned_index`): with
  tuning queries, tuned as a whole, each query searching the nearest shards."""
  kwargs = _build_kwargs(tuning_queries)
  return search.build_partitioned_index(
      blocks, count=count, dim=dim, capacity=_SHARD_ROWS.value,
      directory=_OUT.value, sample=sample, storage_dtype=dtype,
      fresh_processes=_FRESH_PROCESSES.value, **kwargs)


def _from_collection(directory: str) -> None:
  """Indexes a collection --config.mode=embed wrote, one --shard_rows block at a
  time (a collection holds no queries: tuning uses --tuning_queries, else gallery
  rows plus noise)."""
  from procir_jax.eval import collection as collection_lib

  coll = collection_lib.open_collection(directory)
  tuning_queries = _tuning_queries(None)
  if _SHARD_ROWS.value and len(coll) > _SHARD_ROWS.value:
    def blocks():
      return coll.iter_blocks(_SHARD_ROWS.value)
    if _SHARD_BY.value == "similarity":
      index = _build_partitioned(blocks, len(coll), coll.dim, coll.dtype,
                                 coll.rows(_sample_rows(len(coll))),
                                 tuning_queries)
    else:
      # The exact pass reads small blocks: at 10M x 1024, reading it in shards
      # (two 2 GB blocks in flight) beside the loaded 14 GB index peaked at 20 GB.
      index = _build_sharded(
          blocks, tuning_queries,
          lambda: coll.iter_blocks(tuning.EXACT_BLOCK_ROWS))
    path = _OUT.value
  else:
    index = search.build_index(coll.load().astype(np.float32), coll.ids,
                               **_build_kwargs(tuning_queries))
    path = index.save(_OUT.value)
  _report(index, path, coll.dim)


def _report(index, path: str, dim: int) -> None:
  ids = index.ids
  print(f"Indexed {len(ids)} products ({dim}-d, {_BACKEND.value}) in {path}")
  print(f"Index: {index.describe()}")
  if isinstance(index, search.ShardedIndex):
    for number, shard in enumerate(index.shards):
      print(f"  shard {number}: {shard.count} rows; {shard.describe()}")
  memory = ", ".join(f"{name} {size:.0f}"
                     for name, size in index.memory_per_vector().items())
  print(f"Memory: {index.bytes_per_vector:.0f} bytes per vector ({memory}); "
        f"{index.bytes_per_vector * len(ids) / 2**20:.1f} MiB in all")


if __name__ == "__main__":
  app.run(main)
