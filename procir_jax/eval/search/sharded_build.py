"""Building a `ShardedIndex`: in the catalogue's order, or partitioned by similarity.

- `build_sharded_index`: one index per part of the catalogue as given (say
  consecutive blocks of a collection), each saved as soon as it is built.
- `build_partitioned_index`: the rows routed to shards by similarity first
  (`partition`), so that a query searches only the shards nearest it; tuned as
  a whole on the catalogue's exact top 10 when tuning queries are given.

Either can build each shard in a fresh child process (`fresh_processes=True`),
which gives all of a shard's build memory back to the system when it exits: a
long-lived process that built 20 ScaNN shards of 500K x 1024 kept enough of
their memory that loading the finished 10M-row index beside it went over 24 GB,
where a fresh process needs 14.2 GiB.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import time
from typing import Callable, Iterable

from absl import logging
import numpy as np

from procir_jax.eval.search import partition
from procir_jax.eval.search import tuning as tuning_lib
from procir_jax.eval.search.base import l2_normalize
from procir_jax.eval.search.scann_index import (ScannSettings,
                                                auto_reorder_dtype)
from procir_jax.eval.search.sharded import (ShardedIndex, _check_unique,
                                            _shard_record, aggregate_tuning,
                                            shard_dir_name, shard_entry,
                                            write_manifest)

DEFAULT_TARGET = 0.95


def untuned_shard_settings(settings) -> ScannSettings:
  """`settings` for shards that are tuned together afterwards: no tuning of
  their own, but the rescoring precision their target asks for (int8 caps
  recall@10 near 0.98)."""
  s = ScannSettings.from_config(settings)
  dtype = s.reorder_dtype
  if dtype == "auto":
    dtype = auto_reorder_dtype(s.target_recall)
  return dataclasses.replace(s, target_recall=None, reorder_dtype=dtype)


def _build_shard(embeddings, ids, build_kwargs, directory):
  """Builds one shard, saves it when `directory` is given; what the manifest and
  the log need about it. Runs in the caller or in a fresh child process (then
  `embeddings` is the path of a .npy file holding them)."""
  from procir_jax.eval.search import build_index  # pylint: disable=g-import-not-at-top
  if isinstance(embeddings, str):
    embeddings = np.load(embeddings, mmap_mode="r")
  index = build_index(embeddings, ids, **build_kwargs)
  info = dict(count=index.count, dimension=index.dimension,
              backend=index.backend, record=_shard_record(index),
              describe=index.describe())
  if directory is None:
    return index, info
  index.save(directory)
  return None, info


class _Builder:
  """Calls `_build_shard` here, or each time in a fresh spawned process."""

  def __init__(self, fresh_processes: bool):
    self._stack = contextlib.ExitStack()
    self._pool = None
    if fresh_processes:
      # spawn, not fork: the parent may hold threads (TensorFlow's, ScaNN's),
      # and one task per child so each shard's memory goes with its process.
      self._pool = self._stack.enter_context(
          concurrent.futures.ProcessPoolExecutor(
              max_workers=1, mp_context=multiprocessing.get_context("spawn"),
              max_tasks_per_child=1))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)

  def rows(self, embeddings, directory):
    """What `__call__` takes as the shard's rows: the array, or for a child the
    path of a .npy file beside the shard holding them (not a pipe: pickling
    them would hold a second copy here while the child builds)."""
    if self._pool is None:
      return embeddings
    path = directory.rstrip(os.sep) + ".rows.npy"
    np.save(path, np.asarray(embeddings))
    return path

  def __call__(self, rows, ids, build_kwargs, directory):
    if self._pool is None:
      return _build_shard(rows, ids, build_kwargs, directory)
    try:
      return self._pool.submit(_build_shard, rows, ids, build_kwargs,
                               directory).result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          "the child process building a shard died (killed for memory? a "
          "shard's ScaNN build takes about 26 bytes per row per dimension at "
          "its peak); build smaller shards") from e
    finally:
      os.remove(rows)


def build_sharded_index(shards, backend: str = "scann", settings=None,
                        normalize: bool = True, tuning_queries=None,
                        directory=None, *, centres=None,
                        fresh_processes: bool = False,
                        **kwargs) -> ShardedIndex:
  """A sharded index, built one shard at a time.

  Args:
    shards: an iterable of (embeddings [N_i, D], ids) pairs, say a generator
      reading one part of the catalogue at a time; ids may be None (then the
      global row numbers "0", "1", ... are used). Ids must be unique across
      shards.
    backend: "scann" or "exact", for every shard.
    settings: ScaNN settings for every shard (each is tuned on its own).
    normalize: L2-normalise gallery and queries.
    tuning_queries: queries every ScaNN shard is tuned on (None: each makes
      its own from its rows).
    directory: when given, each shard is saved there as soon as it is built
      and freed, and the index returned is loaded back at the end, so only
      one shard's build is ever in memory; when None, every shard stays in
      memory.
    centres: float [shards, D]: the shards partition the catalogue by
      similarity around these centres (see `build_partitioned_index`).
    fresh_processes: build each shard in a fresh child process (needs
      `directory`), which returns its memory to the system when it exits.
    **kwargs: more `ExactSearch` arguments.

  Returns:
    The `ShardedIndex` (already saved when `directory` was given).
  """
  if fresh_processes and directory is None:
    raise ValueError("fresh_processes=True saves each shard from its child "
                     "process: give a directory")
  build_kwargs = dict(backend=backend, settings=settings, normalize=normalize,
                      tuning_queries=tuning_queries, **kwargs)
  built, entries, records, seen = [], [], [], set()
  offset = 0
  dimension = None
  with _Builder(fresh_processes) as build:
    number = -1
    # Not enumerate(): it keeps its last item between steps, and with it the
    # shard's rows while the shard is built.
    for embeddings, ids in shards:
      number += 1
      rows = len(embeddings)
      if ids is None:
        ids = [str(offset + i) for i in range(rows)]
      ids = [str(i) for i in ids]
      _check_unique(ids, seen, f"shard {number}")
      where = (None if directory is None
               else os.path.join(os.fspath(directory), shard_dir_name(number)))
      start = time.perf_counter()
      if where is not None:
        os.makedirs(os.path.dirname(where), exist_ok=True)
      shard_rows = build.rows(embeddings, where)
      del embeddings  # With a child, the rows wait in a file, not here.
      try:
        index, info = build(shard_rows, ids, build_kwargs, where)
      except ValueError as e:
        raise ValueError(f"shard {number} (catalogue rows {offset} to "
                         f"{offset + rows - 1}): {e}") from e
      del shard_rows  # Frees the shard's rows before the next are read.
      if dimension is None:
        dimension = info["dimension"]
      elif info["dimension"] != dimension:
        raise ValueError(f"shard {number} is {info['dimension']}-d, shard 0 "
                         f"{dimension}-d")
      logging.info("shard %d: %d rows in %.0f s; %s", number, info["count"],
                   time.perf_counter() - start, info["describe"])
      offset += rows
      if directory is None:
        built.append(index)
        continue
      entries.append(shard_entry(number, info["count"], info["backend"]))
      records.append(info["record"])
  if not built and not entries:
    raise ValueError("no shards were given: pass an iterable of (embeddings, "
                     "ids) pairs")
  if directory is None:
    return ShardedIndex(built, centres=centres)
  index = ShardedIndex.load(
      _write_partial_manifest(directory, entries, dimension, normalize,
                              aggregate_tuning(records), centres))
  return index


def _write_partial_manifest(directory, entries, dimension, normalize, tuning,
                            centres) -> str:
  """The manifest of shards saved one by one (and their centres, if any)."""
  directory = os.fspath(directory)
  routing = None
  if centres is not None:
    np.save(os.path.join(directory, partition.CENTRES_FILE),
            np.asarray(centres, np.float32))
    # Untuned: every query searches every shard until `ShardedIndex.tune`.
    routing = dict(centres=partition.CENTRES_FILE, shards_to_search=0)
  write_manifest(directory, entries, dimension, normalize, tuning, routing)
  return directory


def build_partitioned_index(
    blocks: Callable[[], Iterable[tuple[list[str], np.ndarray]]], *,
    count: int, dim: int, capacity: int, directory, sample: np.ndarray,
    backend: str = "scann", settings=None, normalize: bool = True,
    tuning_queries=None, storage_dtype="float32", scratch_dir=None,
    fresh_processes: bool = False, seed: int = 0) -> ShardedIndex:
  """A sharded index whose shards partition the catalogue by similarity.

  Fits one centre per shard on `sample` (`partition.fit_centres`), routes
  every row to its nearest shard with room in one pass over `blocks()`
  (writing each shard's rows to `scratch_dir`), builds and saves each shard
  from its rows, then, with tuning queries, tunes the whole index on the
  catalogue's exact top 10 (computed in the same pass): the shards each query
  searches, and every ScaNN shard's leaves and reordering. Without tuning
  queries, each ScaNN shard tunes on its own rows (plus noise) and every query
  searches every shard: the recall holds, but the partition buys no speed.

  Args:
    blocks: a callable giving (ids, float rows) blocks over the catalogue, in
      any order; it is called once.
    count: rows in the catalogue.
    dim: their dimension.
    capacity: the most rows a shard may hold (what one shard's build fits in
      memory); `partition.num_parts` shards are made.
    directory: where the index is saved.
    sample: float [M, D] rows of the catalogue to fit the centres on (at least
      as many as the shards; `partition.sample_size` is plenty).
    backend: "scann" or "exact", for every shard.
    settings: ScaNN settings for every shard; their target_recall (0.95 when
      unset) is the target of the whole index with tuning queries.
    normalize: L2-normalise gallery and queries.
    tuning_queries: float [Q, D] queries to tune the whole index on.
    storage_dtype: dtype of the rows in the scratch files (the catalogue's).
    scratch_dir: where the shards' rows wait to be built (default: a hidden
      directory in `directory`); needs free disk about the catalogue's size.
    fresh_processes: build each shard in a fresh child process.
    seed: of the k-means start.

  Returns:
    The saved `ShardedIndex`.
  """
  start = time.perf_counter()
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  parts = partition.num_parts(count, capacity)
  centres = partition.fit_centres(sample, parts, seed=seed)
  logging.info("partition: %d centres fitted on %d sample rows in %.0f s",
               parts, len(sample), time.perf_counter() - start)
  files = partition.PartFiles(
      scratch_dir or os.path.join(directory, ".partition_scratch"), parts, dim,
      storage_dtype)
  split = partition.Split(partition.Router(centres, capacity), files, normalize)
  target = ScannSettings.from_config(settings).target_recall or DEFAULT_TARGET
  try:
    routed = split.route(blocks())
    exact = None
    if tuning_queries is not None:
      queries = l2_normalize(tuning_queries) if normalize else np.asarray(
          tuning_queries, np.float32)
      exact, _ = tuning_lib.exact_top_k_blocks(routed, queries,
                                               tuning_lib.RECALL_K)
    else:
      for _ in routed:
        pass
    if files.counts.sum() != count:
      raise ValueError(f"the catalogue's blocks held {files.counts.sum()} rows "
                       f"where count={count} was given")
    logging.info("partition: %d rows routed in %.0f s", count,
                 time.perf_counter() - start)
    keep = np.flatnonzero(files.counts)

    def shard_rows():
      for number in keep:
        yield files.read(number)
        files.remove(number)  # The shard is saved: its rows are not needed.

    shard_settings = settings
    if tuning_queries is not None and backend == "scann":
      shard_settings = untuned_shard_settings(settings)
    index = build_sharded_index(
        shard_rows(), backend=backend, settings=shard_settings,
        normalize=normalize, directory=directory, centres=centres[keep],
        fresh_processes=fresh_processes)
  finally:
    files.remove_all()
  if exact is not None:
    index.tune(queries, split.order[exact], target)
    index.save_settings(directory)
  logging.info("partitioned index of %d rows in %d shards built in %.0f s; %s",
               count, len(index.shards), time.perf_counter() - start,
               index.describe())
  return index
