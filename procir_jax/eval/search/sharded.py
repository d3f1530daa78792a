"""A catalogue split into shards, each its own index, searched together.

Each shard is an `ExactSearch` or `ScannSearch` over a disjoint part of the
catalogue with its own product ids (and, for ScaNN, its own tuning to the
target recall). The per-shard top k are merged by score, ties to the lower
global row. Global rows number the shards' rows one shard after another, so
`ids` is the concatenation of the shards' ids.

A catalogue split in its own order sends every query to every shard. One
partitioned by similarity (`partition`, `build_partitioned_index`) has a centre
per shard, and a query searches only the `shards_to_search` shards whose
centres are nearest to it; `tune` chooses that number with the shards' search
settings, on the catalogue's exact top 10.

On disk, a directory with one sub-directory per shard (an ordinary saved index)
and an index.json manifest naming them by relative path:

  index.json      format, backend "sharded", count, dimension, normalize,
                  shards: [{path, count, backend}], tuning (the shards', or
                  the whole index's when partitioned), routing (partitioned
                  only: centres file, shards_to_search, what tuning measured)
  centres.npy     (partitioned) float32 [shards, dimension]
  shard_00000/    a saved exact or ScaNN index
  shard_00001/    ...

Memory, measured at 10M x 1024 in 500K-row shards from a float16 collection
(bench/search_catalogue.py, on a 24 GB machine):

- Served: a ScaNN shard with the default settings holds per row 1024 bytes of
  int8 reorder data, 256 of 4-bit AH codes (512 two-dimension blocks), 8 of
  tree bookkeeping, about 8 of tree centres and a product id of about 70 bytes
  as a Python string: about 1.37 KB. The 20 shards loaded in a fresh process
  took 14.15 GiB peak resident memory (1.52 KB a row, the ids list included).
- Built (`sharded_build`): each shard is saved as soon as it is built and
  freed, so the peak is one shard's build: about 13 GB for 500K rows (the
  block read, its float32 copy, normalised in place, ScaNN's copies while it
  partitions and trains, and the new index), plus the ids seen so far (kept
  to check that they are unique: about 0.1 KB a row). 1M-row shards went over
  22 GB. A process that builds shard after shard keeps part of each build's
  memory: after 20 builds, loading the finished index beside it went over
  24 GB, where a fresh process needs 14.15 GiB. So `tools/build_index.py`
  builds each shard in a fresh child process (`fresh_processes=True`); its own
  process then loads the index and tunes it, which at 10M peaked at 20.7 GiB
  (the loaded index, the collection's ids and the exact pass, which read
  500K-row blocks then and reads 16K-row blocks now).
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
from procir_jax.eval.search import partition
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
    centres: float32 [shards, D], for a catalogue partitioned by similarity
      (`partition`): each shard's centre, to which its rows are nearest. A
      query then searches only the `shards_to_search` shards whose centres are
      nearest to it. None: every query searches every shard.
    shards_to_search: shards each query searches (0: all), with centres.
  """

  backend = SHARDED_BACKEND

  def __init__(self, shards: Sequence[SearchIndex], centres=None,
               shards_to_search: int = 0):
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
    if centres is not None:
      centres = np.asarray(centres, np.float32)
      if centres.shape != (len(shards), self.dimension):
        raise ValueError(f"centres of shape {centres.shape} for {len(shards)} "
                         f"shards of dimension {self.dimension}; give one "
                         "centre per shard")
    self.centres = centres
    self.shards_to_search = self._shards_to_search(shards_to_search)
    # What tuning measured for each number of shards searched (partitioned).
    self.routing_evaluations: list[list[Any]] = []
    # The tuning of the whole (partitioned) index, when measured.
    self.routing_tuning: tuning_lib.Tuning | None = None

  @property
  def partitioned(self) -> bool:
    return self.centres is not None

  def _shards_to_search(self, count: int) -> int:
    if count < 0:
      raise ValueError(f"shards_to_search must be >= 0 (0: all), got {count}")
    if not self.partitioned:
      return len(self.shards)
    return min(int(count) or len(self.shards), len(self.shards))

  def search(self, queries, k: int = 10, *, leaves_to_search: int = 0,
             reorder_num_neighbors: int = 0, shards_to_search: int = 0):
    """See `SearchIndex.search`; indices are global rows (into `ids`).

    The keyword arguments override the index's settings: the shards a query
    searches (partitioned indexes; 0: the index's own), and every ScaNN
    shard's leaves (capped at each shard's count) and reordered candidates;
    exact shards ignore the last two.
    """
    queries = _check_queries(queries, self.dimension, self.normalize)
    k = max(1, min(int(k), self.count))
    num = queries.shape[0]
    if num == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    searched = (self._shards_to_search(shards_to_search) if shards_to_search
                else self.shards_to_search)
    if searched < len(self.shards):
      # slots[q, j]: the j-th nearest shard of query q.
      slots = partition.nearest_parts(queries, self.centres, searched)
    else:
      slots = np.broadcast_to(np.arange(len(self.shards)),
                              (num, len(self.shards)))
    all_indices = np.full((num, searched * k), -1, np.int64)
    all_scores = np.full((num, searched * k), -np.inf, np.float32)
    for number, (shard, offset) in enumerate(zip(self.shards, self.offsets)):
      rows, slot = np.nonzero(slots == number)
      if not len(rows):
        continue
      kwargs = {}
      if isinstance(shard, ScannSearch):
        kwargs = dict(reorder_num_neighbors=reorder_num_neighbors,
                      leaves_to_search=min(leaves_to_search,
                                           shard.settings.num_leaves))
      indices, scores = shard.search(queries[rows], min(k, shard.count),
                                     **kwargs)
      columns = slot[:, None] * k + np.arange(indices.shape[1])
      all_indices[rows[:, None], columns] = np.where(indices >= 0,
                                                     indices + offset, -1)
      all_scores[rows[:, None], columns] = scores
    # Every shard's own top k holds every global top-k row it has.
    indices, scores = _sort_results(all_indices, all_scores)
    return indices[:, :k], scores[:, :k]

  def tune(self, queries, exact_indices, target: float = 0.95, *,
           max_reorder_num_neighbors: int = 1000, seed: int = 0):
    """Sets one leaves_to_search and reorder_num_neighbors for every ScaNN
    shard, and for a partitioned index the shards each query searches: the
    fastest whose recall@k of the catalogue's exact top k reaches `target` on
    `queries` (less two standard errors, as `tuning` does).

    Tuning each shard on its own aims it at its own top 10. In a catalogue
    split at random, most of a shard's top 10 are not among the catalogue's,
    and finding those takes far more leaves than finding the catalogue's: at
    10M x 1024 (bench/search_catalogue.py's clusters, 500K-row shards), a
    shard tuned on its own searched 1316 of its 1414 leaves. This measures
    what the merged search returns instead. `save_settings` keeps the result.

    A partitioned index tries 1, 2, 4, ... shards per query (then all), each
    with its cheapest passing leaves and reordering, times the search of the
    tuning queries with each, and keeps the fastest. It stops at the first
    number that passes with a single leaf (more shards cannot search fewer),
    or that is slower than one that passed.

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
    if not scann and not self.partitioned:
      # Exact and brute-force shards have nothing to tune.
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
    trees = [s.settings.num_leaves for s in scann if s.settings.mode == "tree_ah"]
    num_shards = len(self.shards)
    counts = [1 << i for i in range(num_shards.bit_length())
              if (1 << i) < num_shards] if self.partitioned else []
    self.routing_evaluations = []
    best = None  # (seconds, searched, meter, leaves, reorder)
    for searched in counts + [num_shards]:
      meter = tuning_lib.RecallMeter(
          lambda q, leaves, reorder, searched=searched: self.search(
              q, k, leaves_to_search=leaves or 0,
              reorder_num_neighbors=reorder, shards_to_search=searched)[0],
          queries, exact_indices, None, None)
      leaves, reorder = tuning_lib.choose_settings(
          meter, target, k=k, num_leaves=max(trees) if trees else None,
          max_reorder=max(k, max_reorder_num_neighbors))
      passed = meter.passes(leaves, reorder, target)
      seconds = None
      if self.partitioned:
        begin = time.perf_counter()
        self.search(queries, k, leaves_to_search=leaves or 0,
                    reorder_num_neighbors=reorder, shards_to_search=searched)
        seconds = round(time.perf_counter() - begin, 4)
        self.routing_evaluations.append(
            [searched, leaves, reorder, round(meter.recall(leaves, reorder)[0], 4),
             seconds, passed])
      if passed and best is not None and seconds > best[0]:
        break
      if passed or searched == num_shards and best is None:
        best = (seconds, searched, meter, leaves, reorder)
      if passed and (leaves or 1) <= 1:
        break
    _, searched, meter, leaves, reorder = best
    achieved, error = meter.recall(leaves, reorder)
    result = tuning_lib.Tuning(
        target=target, recall=round(achieved, 4), recall_stderr=round(error, 4),
        met=bool(achieved >= target), num_queries=int(queries.shape[0]),
        queries="given", leaves_to_search=leaves, reorder_num_neighbors=reorder,
        evaluations=meter.evaluations,
        seconds=round(time.perf_counter() - start, 3),
        note="tuned across the shards, on the catalogue's exact top k" +
        (f", searching {searched} of {num_shards} shards per query"
         if self.partitioned else ""))
    self.shards_to_search = searched
    if self.partitioned:
      self.routing_tuning = result
    for shard in scann:
      shard.tuning = result
      shard.settings = dataclasses.replace(
          shard.settings, reorder_num_neighbors=reorder,
          leaves_to_search=min(leaves or shard.settings.leaves_to_search,
                               shard.settings.num_leaves))
    if not result.met:
      logging.warning("sharded index of %d rows: recall@%d of exact %.4f on %d "
                      "queries, below the target %s even at leaves_to_search=%s, "
                      "reorder_num_neighbors=%d, shards_to_search=%d", self.count,
                      k, achieved, result.num_queries, target, leaves, reorder,
                      searched)
    return result

  def routing_dict(self) -> dict[str, Any] | None:
    """The manifest's "routing" record (None: not partitioned)."""
    if not self.partitioned:
      return None
    return dict(
        centres=partition.CENTRES_FILE, shards_to_search=self.shards_to_search,
        tuning=self.routing_tuning and self.routing_tuning.to_dict(),
        evaluations=self.routing_evaluations,
        evaluations_columns=["shards_to_search", "leaves_to_search",
                             "reorder_num_neighbors", "recall", "seconds",
                             "passed"])

  def _write_manifest(self, directory: str) -> None:
    write_manifest(directory, [shard_entry(n, s.count, s.backend)
                               for n, s in enumerate(self.shards)],
                   self.dimension, self.normalize, self.tuning_dict(),
                   self.routing_dict())

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
    """The shards' tuning, aggregated (see `aggregate_tuning`); for a
    partitioned index tuned as a whole, that tuning's recall."""
    record = aggregate_tuning([_shard_record(s) for s in self.shards])
    tuned = self.routing_tuning
    if self.partitioned and tuned is not None:
      record.update(recall=tuned.recall, min_recall=tuned.recall,
                    target=tuned.target, met=tuned.met)
    return record

  def memory_per_vector(self) -> dict[str, float]:
    total = {}
    for shard in self.shards:
      for part, size in shard.memory_per_vector().items():
        total[part] = total.get(part, 0.0) + size * shard.count / self.count
    if self.partitioned:
      total["shard centres"] = self.centres.nbytes / self.count
    return total

  def describe(self) -> str:
    kinds = sorted({s.backend for s in self.shards})
    t = self.tuning_dict()
    text = (f"sharded: {len(self.shards)} shards ({', '.join(kinds)}), "
            f"{self.count} rows")
    if self.partitioned:
      text += (f", partitioned by similarity: each query searches the "
               f"{self.shards_to_search} of {len(self.shards)} shards nearest it")
    if t["recall"] is None:
      return f"{text}; recall@10 of exact not measured for every shard"
    if self.partitioned and self.routing_tuning is not None:
      text += (f"; recall@10 of exact {t['recall']:.4f} (the merged search, "
               "on the tuning queries")
    else:
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
    if self.partitioned:
      np.save(os.path.join(directory, partition.CENTRES_FILE), self.centres)

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
    routing = meta.get("routing")
    centres = None
    if routing:
      centres_path = os.path.join(directory, routing.get("centres") or "")
      if (os.path.isabs(routing.get("centres") or "/")
          or not os.path.isfile(centres_path)):
        raise FileNotFoundError(
            f"{path} says the index is partitioned, but its centres file "
            f"{centres_path} is missing; copy the index directory whole, or "
            "rebuild it")
      centres = np.load(centres_path, allow_pickle=False)
    try:
      index = cls(shards, centres=centres,
                  shards_to_search=(routing or {}).get("shards_to_search", 0))
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    if routing:
      index.routing_evaluations = list(routing.get("evaluations") or [])
      if routing.get("tuning"):
        index.routing_tuning = tuning_lib.Tuning.from_dict(routing["tuning"])
    if index.count != meta["count"] or index.dimension != meta["dimension"]:
      raise ValueError(f"{path} says {meta['count']} x {meta['dimension']}, "
                       f"its shards hold {index.count} x {index.dimension}")
    return index


def shard_entry(number: int, count: int, backend: str) -> dict[str, Any]:
  """A shard's line in the manifest."""
  return dict(path=shard_dir_name(number), count=int(count), backend=backend)


def write_manifest(directory: str, entries, dimension: int, normalize: bool,
                   tuning: dict[str, Any],
                   routing: dict[str, Any] | None = None) -> None:
  extra = {} if routing is None else dict(routing=routing)
  write_metadata(directory, backend=SHARDED_BACKEND, dimension=dimension,
                 count=sum(e["count"] for e in entries), normalize=normalize,
                 settings=dict(shards=len(entries)), shards=list(entries),
                 tuning=tuning, **extra)
