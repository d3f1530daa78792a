"""Splitting a catalogue into shards by similarity, so a query needs few of them.

A catalogue split in consecutive blocks (in id order, that is at random for
search) puts a few rows of every neighbourhood into every shard. Every query
then has to search every shard, and deep into each: at 10M x 1024 in 20
shards of 500K rows, 544 of each shard's 1414 leaves for recall@10 of 0.95.

A partitioned index routes each row to the shard of its nearest centre
instead: the centres come from spherical k-means on a sample of the catalogue,
one per shard, and a query then searches only the few shards whose centres
are nearest to it (`ShardedIndex(..., centres=...)`; how many is tuned with
the other search settings). This is the top level of a two-level tree whose
second level is each shard's own ScaNN tree.

A shard's size is capped (`capacity`: the rows whose build fits in memory). A
row whose nearest shard is full goes to the nearest shard with room, where
queries find it when they search more shards; so the shards are made a little
more numerous than the rows strictly need (`SLACK`).

The split is one streaming pass: each block of rows is routed and appended to
its shards' files in a scratch directory, as raw rows in the catalogue's dtype
(float16 for a float16 collection), so the pass needs free disk about the size
of the catalogue, and memory for one block. Each shard is then built from its
file, which is deleted once the shard is saved.

Why k-means written here: ScaNN trains its own partitioner in C++ and gives no
Python access to it, and FAISS is not a dependency of this project; a few
iterations of spherical k-means over a sample of some 100 rows per centre is
a handful of matrix products.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np

from procir_jax.eval.search.base import l2_normalize

# Shards made beyond what the rows need at full capacity, so that rows whose
# nearest shard is full have room near it.
SLACK = 1.15
# Sample rows per centre for k-means (at least MIN_SAMPLE in all).
SAMPLE_PER_CENTRE = 256
MIN_SAMPLE = 20_000
KMEANS_ITERATIONS = 20
# Rows scored against the centres at a time.
_ROUTE_BLOCK = 65536
CENTRES_FILE = "centres.npy"


def num_parts(count: int, capacity: int) -> int:
  """Shards for `count` rows at most `capacity` each, with `SLACK` to spare."""
  if capacity < 1:
    raise ValueError(f"a shard must hold at least 1 row, got capacity {capacity}")
  return max(1, math.ceil(count * SLACK / capacity))


def sample_size(parts: int) -> int:
  return max(MIN_SAMPLE, SAMPLE_PER_CENTRE * parts)


def fit_centres(sample: np.ndarray, parts: int, *, seed: int = 0,
                iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
  """Spherical k-means: `parts` unit centres of the (unit) sample's rows.

  Starts from k-means++ seeds (each next seed a row drawn with probability
  proportional to its squared distance from the nearest seed so far, so that
  well separated groups each get one); a centre that loses every row is moved
  to the row its centre fits worst, so none stays empty.

  Returns:
    float32 [parts, D], unit rows.
  """
  sample = l2_normalize(sample)
  if sample.ndim != 2 or len(sample) < parts:
    raise ValueError(f"{parts} centres need at least {parts} sample rows, got "
                     f"shape {sample.shape}")
  rng = np.random.default_rng(seed)
  chosen = [int(rng.integers(len(sample)))]
  # Squared distance between unit rows: 2 - 2 cos.
  distance = np.maximum(2 - 2 * sample @ sample[chosen[0]], 0)
  for _ in range(parts - 1):
    total = distance.sum()
    row = (int(rng.choice(len(sample), p=distance / total)) if total > 0
           else int(rng.integers(len(sample))))
    chosen.append(row)
    distance = np.minimum(distance, np.maximum(2 - 2 * sample @ sample[row], 0))
  centres = sample[chosen].copy()
  for _ in range(iterations):
    scores = sample @ centres.T
    nearest = scores.argmax(axis=1)
    fit = scores[np.arange(len(sample)), nearest]
    sums = np.zeros_like(centres)
    np.add.at(sums, nearest, sample)
    counts = np.bincount(nearest, minlength=parts)
    for empty in np.flatnonzero(counts == 0):
      worst = int(fit.argmin())
      sums[empty], fit[worst] = sample[worst], np.inf
    centres = l2_normalize(sums)
  return centres


def nearest_parts(rows: np.ndarray, centres: np.ndarray, count: int) -> np.ndarray:
  """int [N, count]: each row's `count` nearest centres, nearest first."""
  scores = np.asarray(rows, np.float32) @ centres.T
  count = min(count, centres.shape[0])
  if count == centres.shape[0]:
    return np.argsort(-scores, axis=1, kind="stable")
  top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1,
                     kind="stable")
  return np.take_along_axis(top, order, axis=1)


def positions_in_groups(groups: np.ndarray) -> np.ndarray:
  """int [N]: how many earlier elements share each element's value (its
  position among its group, in order)."""
  first = np.argsort(groups, kind="stable")
  ordered = groups[first]
  positions = np.empty(len(groups), np.int64)
  positions[first] = np.arange(len(groups)) - np.searchsorted(ordered, ordered)
  return positions


class Router:
  """Assigns rows to the nearest centre's shard that still has room.

  Args:
    centres: float32 [S, D] unit centres.
    capacity: the most rows a shard takes.
  """

  def __init__(self, centres: np.ndarray, capacity: int):
    self.centres = np.asarray(centres, np.float32)
    self.capacity = int(capacity)
    self.counts = np.zeros(len(self.centres), np.int64)
    self.spilled = 0  # rows that went to other than their nearest shard

  def assign(self, rows: np.ndarray) -> np.ndarray:
    """int [N]: the shard of each (normalised) row, in row order."""
    parts = len(self.centres)
    if len(rows) > self.capacity * parts - self.counts.sum():
      raise ValueError(f"{len(rows)} more rows do not fit in {parts} shards of "
                       f"{self.capacity} rows holding {self.counts.sum()}")
    out = np.full(len(rows), -1, np.int64)
    # Rows by preference: the nearest first, then the next nearest, ...
    for start in range(0, len(rows), _ROUTE_BLOCK):
      block = rows[start:start + _ROUTE_BLOCK]
      order = nearest_parts(block, self.centres, parts)
      pending = np.arange(len(block))
      for rank in range(parts):
        if not len(pending):
          break
        want = order[pending, rank]
        # The first rows (in row order) wanting each shard take its room.
        taken = positions_in_groups(want) < (self.capacity - self.counts)[want]
        out[start + pending[taken]] = want[taken]
        np.add.at(self.counts, want[taken], 1)
        if rank:
          self.spilled += int(taken.sum())
        pending = pending[~taken]
    return out


class PartFiles:
  """The rows of each shard, appended to files in a scratch directory.

  Each shard has `part_NNNNN.rows` (raw rows of `dtype`, row-major) and
  `part_NNNNN.ids` (a JSON string per line). `read(n)` gives one back and
  `remove(n)` deletes it.
  """

  def __init__(self, directory: str, parts: int, dim: int, dtype):
    self.directory = os.fspath(directory)
    self.dim = int(dim)
    self.dtype = np.dtype(dtype)
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)  # Left by an interrupted build.
    os.makedirs(self.directory)
    self.counts = np.zeros(parts, np.int64)
    self._rows = [open(self._path(n, "rows"), "wb") for n in range(parts)]
    self._ids = [open(self._path(n, "ids"), "w", encoding="utf-8")
                 for n in range(parts)]

  def _path(self, number: int, suffix: str) -> str:
    return os.path.join(self.directory, f"part_{number:05d}.{suffix}")

  def append(self, rows: np.ndarray, ids: Sequence[str], parts: np.ndarray):
    """Appends each row (and id) to its part's files, in row order."""
    rows = np.asarray(rows, self.dtype)
    for number in np.unique(parts):
      chosen = np.flatnonzero(parts == number)
      self._rows[number].write(np.ascontiguousarray(rows[chosen]).tobytes())
      self._ids[number].writelines(json.dumps(ids[i]) + "\n" for i in chosen)
      self.counts[number] += len(chosen)

  def close(self) -> None:
    for f in self._rows + self._ids:
      f.close()

  def read(self, number: int) -> tuple[np.ndarray, list[str]]:
    rows = np.fromfile(self._path(number, "rows"), self.dtype).reshape(
        -1, self.dim)
    with open(self._path(number, "ids"), encoding="utf-8") as f:
      ids = [json.loads(line) for line in f]
    if len(ids) != len(rows) or len(rows) != self.counts[number]:
      raise ValueError(f"{self._path(number, 'rows')}: {len(rows)} rows and "
                       f"{len(ids)} ids where {self.counts[number]} were "
                       "written; is the disk full?")
    return rows, ids

  def remove(self, number: int) -> None:
    for suffix in ("rows", "ids"):
      os.remove(self._path(number, suffix))

  def remove_all(self) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)


class Split:
  """One streaming pass that routes a catalogue's rows to their shards' files.

  `route(blocks)` yields each block as routed (normalised when `normalize`),
  say for an exact pass beside it; once it is exhausted, `order` holds, for
  each catalogue row in the order given, its row in the partitioned index
  (shards one after another, each in the order its rows came).
  """

  def __init__(self, router: Router, files: PartFiles, normalize: bool):
    self.router, self.files, self.normalize = router, files, normalize
    self._placed = []  # (shard, position in it) of each row, a block at a time
    self.order: np.ndarray | None = None

  def route(self, blocks: Iterable[tuple[Sequence[str], np.ndarray]]
            ) -> Iterator[np.ndarray]:
    files = self.files
    for ids, block in blocks:
      if len(ids) != len(block):
        raise ValueError(f"a block of {len(block)} rows came with {len(ids)} "
                         "ids")
      rows = (l2_normalize(block) if self.normalize
              else np.asarray(block, np.float32))
      before = files.counts.copy()
      parts = self.router.assign(rows)
      # Position of each row in its shard: after what it held, in row order.
      self._placed.append((parts, before[parts] + positions_in_groups(parts)))
      files.append(block, list(ids), parts)
      yield rows
    files.close()
    offsets = np.concatenate([[0], np.cumsum(files.counts)[:-1]])
    self.order = np.concatenate([np.zeros(0, np.int64)] +
                                [offsets[p] + r for p, r in self._placed])
    self._placed = []
    logging.info("partitioned %d rows into %d shards (%d to %d rows); %d "
                 "went to other than their nearest shard (it was full)",
                 files.counts.sum(), len(files.counts), files.counts.min(),
                 files.counts.max(), self.router.spilled)
