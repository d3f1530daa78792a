"""A catalogue split into shards, each its own index, searched together.

Each shard is an `ExactSearch` or `ScannSearch` over a disjoint part of the
catalogue with its own product ids (and, for ScaNN, its own tuning to the
target recall). A query goes to every shard; the per-shard top k are merged by
score, ties to the lower global row. Global rows number the shards' rows one
shard after another, so `ids` is the concatenation of the shards' ids.

On disk, a directory with one sub-directory per shard (an ordinary saved index)
and an index.json manifest naming them by relative path:

  index.json      format, backend "sharded", count, dimension, normalize,
                  shards: [{path, count, backend}], tuning (the shards')
  shard_00000/    a saved exact or ScaNN index
  shard_00001/    ...

Memory, measured at 10M x 1024 in 500K-row shards from a float16 collection
(bench/search_catalogue.py, on a 24 GB machine):

- Served: a ScaNN shard with the default settings holds per row 1024 bytes of
  int8 reorder data, 256 of 4-bit AH codes (512 two-dimension blocks), 8 of
  tree bookkeeping, about 8 of tree centres and a product id of about 70 bytes
  as a Python string: about 1.37 KB. The 20 shards loaded in a fresh process
  took 14.15 GiB peak resident memory (1.52 KB a row, the ids list included).
- Built: `build_sharded_index(..., directory=...)` saves each shard as soon as
  it is built and frees it, so the peak is one shard's build: about 13 GB for
  500K rows (the block read, its float32 copy, normalised in place, ScaNN's
  copies while it partitions and trains, and the new index), plus the ids
  seen so far (kept to check that they are unique: about 0.1 KB a row).
  1M-row shards went over 22 GB. The process does not give all of a shard's
  memory back: after 20 builds, loading the finished index in the same process
  went over 24 GB, where a fresh process needs 14.15 GiB; so tune and serve a
  catalogue of this size from a fresh process.
- Building without a directory keeps every finished shard in memory as well
  next to the shard being built.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np

from procir_jax.eval.search.base import (INDEX_FILE, SearchIndex, _check_queries,
                                         _sort_results, read_metadata,
                                         write_metadata)
from procir_jax.eval.search.exact import ExactSearch
from procir_jax.eval.search import tuning as tuning_lib
from procir_jax.eval.search.scann_index import ScannSearch

SHARDED_BACKEND = "sharded"
SHARD_BACKENDS = {"exact": ExactSearch, "scann": ScannSearch}


def shard_dir_name(number: int) -> str:
  return f"shard_{number:05d}"


def _check_unique(ids: Iterable[str], seen: set, where: str) -> None:
  for i in ids:
    if i in seen:
      raise ValueError(f"product id {i!r} of {where} is also in an earlier "
                       "shard; ids must be unique across the whole catalogue")
    seen.add(i)


def _shard_record(index: SearchIndex) -> tuple:
  """(rows, tuned recall, target, target met) of one shard."""
  tuning = getattr(index, "tuning", None)  # Exact shards have none.
  if tuning is None:
    return index.count, index.tuned_recall, None, True
  return index.count, index.tuned_recall, tuning.target, tuning.met


def aggregate_tuning(records) -> dict[str, Any]:
  """The shards' tuning in one record, from `_shard_record`s.

  recall is the row-weighted mean of the shards' (None if any is unknown):
  for a catalogue split at random, a query's global top 10 falls into the
  shards in proportion to their rows, and each shard returns its part as it
  returns its own top 10, so this estimates the merged index's recall.
  """
  recalls = [r for _, r, _, _ in records]
  known = bool(records) and None not in recalls
  total = sum(c for c, _, _, _ in records)
  targets = {t for _, _, t, _ in records if t is not None}
  met = [m for _, _, _, m in records]
  return dict(
      recall=(round(float(sum(c * r for c, r, _, _ in records) / total), 4)
              if known else None),
      min_recall=float(min(recalls)) if known else None,
      target=targets.pop() if len(targets) == 1 else None,
      met=None if None in met else all(met),
      shard_recalls=recalls)


class ShardedIndex(SearchIndex):
  """Shards searched together as one index over the whole catalogue.

  Args:
    shards: the per-shard indices (`ExactSearch` or `ScannSearch`), with one
      dimension and normalisation and, between them, unique ids.
  """

  backend = SHARDED_BACKEND

  def __init__(self, shards: Sequence[SearchIndex]):
    shards = list(shards)
    if not shards:
      raise ValueError("a sharded index needs at least one shard")
    first = shards[0]
    for number, shard in enumerate(shards):
      if isinstance(shard, ShardedIndex):
        raise ValueError(f"shard {number} is itself sharded; give its shards")
      if (shard.dimension, shard.normalize) != (first.dimension,
                                                first.normalize):
        raise ValueError(
            f"shard {number} is {shard.dimension}-d with normalize="
            f"{shard.normalize}, shard 0 {first.dimension}-d with normalize="
            f"{first.normalize}; build every shard the same way")
    seen = set()
    for number, shard in enumerate(shards):
      _check_unique(shard.ids, seen, f"shard {number}")
    del seen
    super().__init__([i for shard in shards for i in shard.ids],
                     first.dimension, first.normalize)
    self.shards = shards
    counts = [shard.count for shard in shards]
    self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(
        np.int64)

  def search(self, queries, k: int = 10, *, leaves_to_search: int = 0,
             reorder_num_neighbors: int = 0):
    """See `SearchIndex.search`; indices are global rows (into `ids`).

    The keyword arguments override every ScaNN shard's settings (leaves capped
    at each shard's count); exact shards ignore them.
    """
    queries = _check_queries(queries, self.dimension, self.normalize)
    k = max(1, min(int(k), self.count))
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    all_indices, all_scores = [], []
    for shard, offset in zip(self.shards, self.offsets):
      kwargs = {}
      if isinstance(shard, ScannSearch):
        kwargs = dict(reorder_num_neighbors=reorder_num_neighbors,
                      leaves_to_search=min(leaves_to_search,
                                           shard.settings.num_leaves))
      indices, scores = shard.search(queries, min(k, shard.count), **kwargs)
      all_indices.append(np.where(indices >= 0, indices + offset, -1))
      all_scores.append(scores)
    # Every shard's own top k holds every global top-k row it has.
    indices, scores = _sort_results(np.concatenate(all_indices, axis=1),
                                    np.concatenate(all_scores, axis=1))
    return indices[:, :k], scores[:, :k]

  def tune(self, queries, exact_indices, target: float = 0.95, *,
           max_reorder_num_neighbors: int = 1000, seed: int = 0):
    """Sets one leaves_to_search and reorder_num_neighbors for every ScaNN
    shard: the cheapest whose recall@k of the catalogue's exact top k reaches
    `target` on `queries` (less two standard errors, as `tuning` does).

    Tuning each shard on its own aims it at its own top 10. In a catalogue
    split at random, most of a shard's top 10 are not among the catalogue's,
    and finding those takes far more leaves than finding the catalogue's: at
    10M x 1024 (bench/search_catalogue.py's clusters, 500K-row shards), a
    shard tuned on its own searched 1316 of its 1414 leaves. This measures
    what the merged search returns instead. `save_settings` keeps the result.

    Args:
      queries: float [Q, D] tuning queries (say the evaluation's own).
      exact_indices: int [Q, k] their exact top k over the whole catalogue, in
        this index's global rows (`tuning.exact_top_k_blocks` over the
        catalogue's blocks in shard order gives them).
      target: recall@k of exact to reach.
      max_reorder_num_neighbors: the most candidates a shard may reorder.
      seed: orders the queries (the first quarter screens settings).

    Returns:
      The `tuning.Tuning` recorded in every ScaNN shard.
    """
    scann = [s for s in self.shards if isinstance(s, ScannSearch)
             and s.settings.mode != "brute_force"]
    if not scann:  # Exact and brute-force shards have nothing to tune.
      return tuning_lib.Tuning(target=target, recall=1.0, met=True,
                               note="every shard scores every row exactly")
    start = time.perf_counter()
    queries = _check_queries(queries, self.dimension, self.normalize)
    exact_indices = np.asarray(exact_indices)
    if exact_indices.shape[0] != queries.shape[0]:
      raise ValueError(f"{queries.shape[0]} tuning queries but exact results "
                       f"for {exact_indices.shape[0]}")
    k = exact_indices.shape[1]
    order = np.random.default_rng(seed).permutation(queries.shape[0])
    queries, exact_indices = queries[order], exact_indices[order]

    def search(q, leaves, reorder):
      return self.search(q, k, leaves_to_search=leaves or 0,
                         reorder_num_neighbors=reorder)[0]

    meter = tuning_lib.RecallMeter(search, queries, exact_indices, None, None)
    trees = [s.settings.num_leaves for s in scann if s.settings.mode == "tree_ah"]
    leaves, reorder = tuning_lib.choose_settings(
        meter, target, k=k, num_leaves=max(trees) if trees else None,
        max_reorder=max(k, max_reorder_num_neighbors))
    achieved, error = meter.recall(leaves, reorder)
    result = tuning_lib.Tuning(
        target=target, recall=round(achieved, 4), recall_stderr=round(error, 4),
        met=bool(achieved >= target), num_queries=int(queries.shape[0]),
        queries="given", leaves_to_search=leaves, reorder_num_neighbors=reorder,
        evaluations=meter.evaluations,
        seconds=round(time.perf_counter() - start, 3),
        note="tuned across the shards, on the catalogue's exact top k")
    for shard in scann:
      shard.tuning = result
      shard.settings = dataclasses.replace(
          shard.settings, reorder_num_neighbors=reorder,
          leaves_to_search=min(leaves or shard.settings.leaves_to_search,
                               shard.settings.num_leaves))
    if not result.met:
      logging.warning("sharded index of %d rows: recall@%d of exact %.4f on %d "
                      "queries, below the target %s even at leaves_to_search=%s, "
                      "reorder_num_neighbors=%d", self.count, k, achieved,
                      result.num_queries, target, leaves, reorder)
    return result

  def _write_manifest(self, directory: str) -> None:
    write_manifest(directory, [_shard_entry(n, s) for n, s in enumerate(self.shards)],
                   self.dimension, self.normalize, self.tuning_dict())

  def save_settings(self, directory) -> None:
    """Rewrites the shards' and the manifest's index.json (see `tune`)."""
    directory = os.fspath(directory)
    for number, shard in enumerate(self.shards):
      shard.save_settings(os.path.join(directory, shard_dir_name(number)))
    self._write_manifest(directory)

  @property
  def tuned_recall(self) -> float | None:
    """Row-weighted mean of the shards' tuned recall@10 (None: unknown)."""
    return self.tuning_dict()["recall"]

  def tuning_dict(self) -> dict[str, Any]:
    """The shards' tuning, aggregated (see `aggregate_tuning`)."""
    return aggregate_tuning([_shard_record(s) for s in self.shards])

  def memory_per_vector(self) -> dict[str, float]:
    total = {}
    for shard in self.shards:
      for part, size in shard.memory_per_vector().items():
        total[part] = total.get(part, 0.0) + size * shard.count / self.count
    return total

  def describe(self) -> str:
    kinds = sorted({s.backend for s in self.shards})
    t = self.tuning_dict()
    text = (f"sharded: {len(self.shards)} shards ({', '.join(kinds)}), "
            f"{self.count} rows")
    if t["recall"] is None:
      return f"{text}; recall@10 of exact not measured for every shard"
    text += (f"; recall@10 of exact {t['recall']:.4f} (row-weighted mean of "
             f"the shards', lowest {t['min_recall']:.4f}")
    if t["target"] is not None:
      text += f", target {t['target']}"
    text += ")"
    if t["met"] is False:
      text += ": TARGET MISSED in some shard, see the build warnings"
    return text

  def settings_dict(self):
    return dict(shards=len(self.shards))

  def _save_arrays(self, directory):
    for number, shard in enumerate(self.shards):
      shard.save(os.path.join(directory, shard_dir_name(number)))

  def save(self, directory) -> str:
    """Writes each shard to a sub-directory, then the manifest (the shards hold
    the ids: no ids file of its own)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._save_arrays(directory)
    self._write_manifest(directory)
    return directory

  @classmethod
  def load(cls, directory, **overrides) -> "ShardedIndex":
    """Opens a saved sharded index; `overrides` go to every shard's load."""
    directory = os.fspath(directory)
    meta = read_metadata(directory)
    path = os.path.join(directory, INDEX_FILE)
    if meta["backend"] != SHARDED_BACKEND:
      raise ValueError(f"{directory} holds a {meta['backend']!r} index, not a "
                       "sharded one; use load_index to open any index")
    entries = meta.get("shards")
    if not isinstance(entries, list) or not entries:
      raise ValueError(f"{path} lists no shards; rebuild the index")
    shards = []
    for number, entry in enumerate(entries):
      name = entry.get("path") if isinstance(entry, dict) else None
      if (not isinstance(name, str) or os.path.isabs(name)
          or os.path.normpath(name).startswith(os.pardir)):
        raise ValueError(f"{path}: shard {number} has path {name!r}; shard "
                         "paths must lie inside the index directory")
      shard_path = os.path.join(directory, name)
      if not os.path.isdir(shard_path):
        raise FileNotFoundError(
            f"shard {number} of the sharded index {directory} is missing: "
            f"{shard_path} does not exist; copy the index directory whole, "
            "or rebuild it")
      try:
        backend = read_metadata(shard_path)["backend"]
        if backend not in SHARD_BACKENDS:
          raise ValueError(f"its backend is {backend!r}; shards must be one "
                           f"of {sorted(SHARD_BACKENDS)}")
        shard = SHARD_BACKENDS[backend].load(shard_path, **overrides)
      except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"shard {number} ({shard_path}) of the sharded index "
                      f"{directory} cannot be loaded: {e}") from e
      if shard.count != entry.get("count"):
        raise ValueError(f"shard {number} ({shard_path}) holds {shard.count} "
                         f"rows, {path} says {entry.get('count')}")
      shards.append(shard)
    index = cls(shards)
    if index.count != meta["count"] or index.dimension != meta["dimension"]:
      raise ValueError(f"{path} says {meta['count']} x {meta['dimension']}, "
                       f"its shards hold {index.count} x {index.dimension}")
    return index


def _shard_entry(number: int, shard: SearchIndex) -> dict[str, Any]:
  """A shard's line in the manifest."""
  return dict(path=shard_dir_name(number), count=shard.count, backend=shard.backend)


def write_manifest(directory: str, entries, dimension: int, normalize: bool,
                   tuning: dict[str, Any]) -> None:
  write_metadata(directory, backend=SHARDED_BACKEND, dimension=dimension,
                 count=sum(e["count"] for e in entries), normalize=normalize,
                 settings=dict(shards=len(entries)), shards=list(entries),
                 tuning=tuning)


def build_sharded_index(shards, backend: str = "scann", settings=None,
                        normalize: bool = True, tuning_queries=None,
                        directory=None, **kwargs) -> ShardedIndex:
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
    **kwargs: more `ExactSearch` arguments.

  Returns:
    The `ShardedIndex` (already saved when `directory` was given).
  """
  from procir_jax.eval.search import build_index  # pylint: disable=g-import-not-at-top
  built, entries, records, seen = [], [], [], set()
  offset = 0
  dimension = None
  for number, (embeddings, ids) in enumerate(shards):
    rows = len(embeddings)
    if ids is None:
      ids = [str(offset + i) for i in range(rows)]
    ids = [str(i) for i in ids]
    _check_unique(ids, seen, f"shard {number}")
    try:
      index = build_index(embeddings, ids, backend=backend, settings=settings,
                          normalize=normalize, tuning_queries=tuning_queries,
                          **kwargs)
    except ValueError as e:
      raise ValueError(f"shard {number} (catalogue rows {offset} to "
                       f"{offset + rows - 1}): {e}") from e
    if dimension is None:
      dimension = index.dimension
    elif index.dimension != dimension:
      raise ValueError(f"shard {number} is {index.dimension}-d, shard 0 "
                       f"{dimension}-d")
    logging.info("shard %d: %d rows; %s", number, index.count,
                 index.describe())
    offset += rows
    if directory is None:
      built.append(index)
      continue
    index.save(os.path.join(os.fspath(directory), shard_dir_name(number)))
    entries.append(_shard_entry(number, index))
    records.append(_shard_record(index))
    del index  # Frees the shard before the next one is built.
  if not built and not entries:
    raise ValueError("no shards were given: pass an iterable of (embeddings, "
                     "ids) pairs")
  if directory is None:
    return ShardedIndex(built)
  write_manifest(os.fspath(directory), entries, dimension, normalize,
                 aggregate_tuning(records))
  return ShardedIndex.load(directory)
