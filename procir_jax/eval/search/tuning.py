"""Choosing ScaNN's search-time settings to reach a target recall@10 of exact.

An approximate index is only useful if it returns what exact search would, and
how many leaves and reordered candidates that takes depends on the data: on
well separated clusters a few percent of the leaves suffice, on overlapping
ones (or for queries far from every gallery row) the same settings return 0.7
of the exact top 10. So `ScannSearch` measures instead of guessing: it takes a
held-out sample of queries, computes their exact top 10 by brute force, and
searches for the cheapest settings whose recall@10 of exact reaches the target.

Tuning queries are the caller's (`tuning_queries=`, say the evaluation's own
queries) or made from the gallery: sampled rows plus isotropic Gaussian noise,
all with one noise norm `s` (relative to the unit rows). Too little noise and
every query sits on its own row, inside its own leaf: easy, and the tuned
settings are too small for real queries, which land near, not on, their
targets. Too much and the queries are random directions whose exact top 10 are
rows from all over the gallery, tied by the noise: hard for any index, and
unlike a real query, whose neighbours are products like its target. So `s` is
set from the data, such that a query keeps about half of its row's own top 10
(`NEIGHBOURS_KEPT`) in its exact top 10: it lands inside its target's
neighbourhood, not on the target and not outside it. On a pilot of
`PILOT_ROWS` rows, the exact top 10 of noisy copies is found for each `s` on
the grid `NOISE_GRID` (factors of 2) and at three more points where the share
crosses the target, and `s` is interpolated (in log s) to it; the exact pass
over the tuning sample then records the share its queries really have.

Measured at 100K x 1024 on the benchmark's synthetic data (bench/search.py),
whose real queries are rows plus noise of norm 0.5 (`clusters`) and 1.0
(`overlap`): keeping half the neighbours takes norm about 0.8 and 2.4, so the
gallery-derived queries are somewhat harder than the real ones and the tuned
settings err on the safe side. Why not noise that keeps the own row the
nearest for, say, 90% of queries? In 1024 dimensions that takes norm 4 to 6:
the own row survives such noise, but the other nine of the top 10 become
random rows, and at 1M rows settings tuned on such queries searched 878 of
1000 leaves where the real queries needed 1.

Recall@10 of exact is the mean over queries of the share of the exact top 10
that the index returns; a returned row whose exact score ties the 10th best
(within float32 rounding) counts too, so duplicate gallery rows do not read as
misses.

The search, cheapest first: leaves are the dominant cost of a tree search, so
with generous reordering the fewest leaves that reach the target are found
(doubling from 1, then bisection to within a tenth), then the fewest reordered
candidates at those leaves (bisection between k and the generous number, in
log space, as each try costs about the same scan of the leaves, to within a
quarter or k / 2: rescoring a few more candidates costs little; but never
wider than `REORDER_GAP` candidates, as the thousands a flat index may rescore
do cost). Each step
searches the tuning sample with the built index, whose search-time settings
change per call: nothing is rebuilt. A setting passes when its recall on the
whole sample, less two standard errors of that mean, reaches the target:
picking the cheapest setting that passes favours settings the sample happens
to flatter, and the margin keeps the recall on fresh queries at the target (at
1M x 1024, a setting tuned without it to 0.950 on 488 queries gave 0.942 on
1000 others; with one standard error, 0.953 on 1000 tuning queries gave 0.949
on 1000 others). A setting is first tried on a quarter of the sample and rejected
there when it falls short of the target by more than two standard errors (at
least 0.01); only settings that may pass are measured on the whole sample.

The margin shrinks with the square root of the sample, the room between the
target and what an index can reach shrinks with 1 - target: at 1M x 1024 well
separated clusters a tree trained on 250K rows reached recall@10 of exact
0.991 to 0.994 at one or two leaves, and two standard errors over 976 queries
were 0.0034, so for a target of 0.99 that sample chose 5 leaves (8,067
queries/s, against 10,960 at the 2 leaves that 4882 queries chose). So
`ScannSettings` gives targets above 0.95 a sample up to five times larger (in
proportion to 1 / (1 - target)), of which the usual number (`base`) still
decides every setting it can, clearly passing or clearly failing; only
settings it leaves in doubt are searched with the rest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import numpy as np

# Recall is measured at this depth (the depth `recall.OVERLAP_K` reports).
RECALL_K = 10
# Share of its row's exact top 10 a gallery-derived tuning query keeps in its
# own (the default of `ScannSettings.tuning_neighbours_kept`).
NEIGHBOURS_KEPT = 0.5
# Candidate noise norms (relative to the unit gallery rows), from 1/16 to 16.
NOISE_GRID = tuple(2.0 ** e for e in range(-4, 5))
PILOT_ROWS = 64
# A setting passes when mean recall - MARGIN_SE standard errors >= target.
MARGIN_SE = 2.0
# Exact scores closer than this tie (float32 sums over ~1000 dims).
TIE_TOLERANCE = 2e-6
# Share of the tuning sample (at least QUICK_MIN queries) that first screens a
# setting, and the least shortfall that rejects it there.
QUICK_SHARE = 0.25
QUICK_MIN = 100
QUICK_MARGIN = 0.01
# Gallery rows scored per block in the exact pass: [queries, block] floats.
EXACT_BLOCK_ROWS = 16384
# Reordering is bisected to within a quarter of the count found, or within this
# many candidates when that is less. Rescoring 1,000 more costs about 0.24 ms a
# query (bfloat16 rows of 1024 dims, 2 cores), a few percent of a 1M-row flat
# scan (4.4 ms); a quarter of the 12,000 that such an index may need is 10%.
REORDER_GAP = 1000


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int,
                block_rows: int = EXACT_BLOCK_ROWS):
  """Exact top-k by dot product, with numpy, a block of gallery rows at a time.

  Not `ExactSearch`: that keeps a padded copy of the gallery and a device copy of it,
  two more gallery-sized arrays while ScaNN's build holds its own, where the peak
  build memory is what bounds a shard's size (sharded.py).

  Args:
    gallery: float32 [N, D].
    queries: float32 [Q, D].
    k: neighbours per query (at most N).
    block_rows: gallery rows per block; memory is about Q x block_rows floats.

  Returns:
    (indices int64 [Q, k], scores float32 [Q, k]) by descending score, ties by
    ascending index.
  """
  return exact_top_k_blocks(
      (gallery[start:start + block_rows]
       for start in range(0, gallery.shape[0], block_rows)), queries, k)


def exact_top_k_blocks(blocks: Iterable[np.ndarray], queries: np.ndarray,
                       k: int):
  """`exact_top_k` over a gallery given as consecutive blocks of rows.

  For galleries that are read a part at a time, say a sharded collection on
  disk (`Collection.iter_blocks`); blocks of another float dtype are scored in
  float32. Once every query holds k rows, only rows beating its k-th best
  score are merged, so the cost is the matrix product and one comparison per
  score.

  Args:
    blocks: float [rows_i, D] arrays, the gallery's rows in order.
    queries: float32 [Q, D].
    k: neighbours per query (fewer when the gallery has fewer rows).

  Returns:
    (indices int64 [Q, k], scores float32 [Q, k]), indices counting rows across
    the blocks, by descending score, ties by ascending index.
  """
  k = int(k)
  queries = np.asarray(queries, np.float32)
  num = queries.shape[0]
  best_scores = np.zeros((num, 0), np.float32)
  best_indices = np.zeros((num, 0), np.int64)
  end = 0
  for block in blocks:
    start, end = end, end + len(block)
    scores = queries @ np.asarray(block, np.float32).T
    if best_scores.shape[1] < k:
      # Until every query holds k rows, keep each block's own top k.
      width = min(k, scores.shape[1])
      part = np.argpartition(-scores, width - 1, axis=1)[:, :width]
      cand_scores = np.take_along_axis(scores, part, axis=1)
      cand_indices = part + start
    else:
      rows, cols = np.nonzero(scores > best_scores[:, -1:])
      if rows.size == 0:
        continue
      # Candidates per query, padded to the largest count.
      counts = np.bincount(rows, minlength=num)
      width = int(counts.max())
      slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts,
                                              counts)
      cand_scores = np.full((num, width), -np.inf, np.float32)
      cand_indices = np.full((num, width), np.iinfo(np.int64).max, np.int64)
      cand_scores[rows, slot] = scores[rows, cols]
      cand_indices[rows, slot] = cols + start
    merged_scores = np.concatenate([best_scores, cand_scores], axis=1)
    merged_indices = np.concatenate([best_indices, cand_indices], axis=1)
    # Sorted by (score desc, index asc), so ties keep the lower row and the
    # last column is each query's k-th best.
    order = np.lexsort((merged_indices, -merged_scores.astype(np.float64)),
                       axis=1)[:, :k]
    best_scores = np.take_along_axis(merged_scores, order, axis=1)
    best_indices = np.take_along_axis(merged_indices, order, axis=1)
  return best_indices, best_scores


def recall_of_exact(found: np.ndarray, exact_indices: np.ndarray,
                    exact_scores: np.ndarray, gallery: np.ndarray,
                    queries: np.ndarray) -> np.ndarray:
  """Each query's share of its exact top-k that `found` holds (ties count).

  Args:
    found: int [Q, >=k] rows an index returned (-1: empty slot).
    exact_indices: int [Q, k] exact top-k.
    exact_scores: float [Q, k] their scores, descending.
    gallery: float32 [N, D], to score returned rows exactly; None (a gallery
      not in memory) counts only the exact top k's own rows.
    queries: float32 [Q, D].

  Returns:
    float [Q]: recall@k of exact per query, in [0, 1]; its mean is the
    index's.
  """
  k = exact_indices.shape[1]
  found = np.asarray(found)[:, :k]
  valid = found >= 0
  in_exact = (found[:, :, None] == exact_indices[:, None, :]).any(axis=2)
  if gallery is not None:
    rows = gallery[np.where(valid, found, 0)]
    true_scores = np.einsum("qd,qkd->qk", queries, rows)
    in_exact |= true_scores >= exact_scores[:, -1:] - TIE_TOLERANCE
  hits = (valid & in_exact).sum(axis=1)
  return np.minimum(hits, k) / k


def noisy_rows(gallery: np.ndarray, rows: np.ndarray, scale: float,
               rng: np.random.Generator) -> np.ndarray:
  """Unit queries: gallery rows plus Gaussian noise of norm about `scale`."""
  dim = gallery.shape[1]
  noise = rng.standard_normal((len(rows), dim), dtype=np.float32)
  queries = gallery[rows] + noise * np.float32(scale / np.sqrt(dim))
  return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True),
                              1e-12)


def neighbours_kept(query_top: np.ndarray, row_top: np.ndarray) -> np.ndarray:
  """Per query, the share of its row's top k that is in its own top k."""
  same = (query_top[:, :, None] == row_top[:, None, :]).any(axis=2)
  return same.mean(axis=1)


def _kept_shares(gallery, rows, row_top, scales, rng) -> np.ndarray:
  """For each noise norm, the mean share of row neighbours noisy rows keep."""
  queries = np.concatenate([noisy_rows(gallery, rows, s, rng) for s in scales])
  query_top, _ = exact_top_k(gallery, queries, row_top.shape[1])
  kept = neighbours_kept(query_top, np.tile(row_top, (len(scales), 1)))
  return kept.reshape(len(scales), len(rows)).mean(axis=1)


def calibrate_noise(gallery: np.ndarray, rows: np.ndarray,
                    rng: np.random.Generator, share: float = NEIGHBOURS_KEPT):
  """The noise norm at which noisy rows keep about `share` of their top 10.

  The grid brackets the norm, three more norms inside the bracket (factors of
  2 ** 0.25) place it, and it is interpolated in log(norm) between the two
  that straddle `share`.

  Args:
    gallery: float32 [N, D] unit rows.
    rows: pilot rows (PILOT_ROWS of them).
    rng: noise source.
    share: the share of a row's exact top 10 its noisy copy should keep.

  Returns:
    (scale, {noise norm: mean share of their rows' top 10 the pilot queries
    kept}).
  """
  row_top, _ = exact_top_k(gallery, gallery[rows], RECALL_K)
  scales = list(NOISE_GRID)
  shares = list(_kept_shares(gallery, rows, row_top, scales, rng))
  passing = [i for i, f in enumerate(shares) if f >= share]
  if passing and passing[-1] + 1 < len(scales):
    low = scales[passing[-1]]
    inside = [low * 2.0 ** (e / 4) for e in (1, 2, 3)]
    scales[passing[-1] + 1:passing[-1] + 1] = inside
    shares[passing[-1] + 1:passing[-1] + 1] = _kept_shares(
        gallery, rows, row_top, inside, rng)
  table = {f"{s:.4g}": round(float(f), 4) for s, f in zip(scales, shares)}
  passing = [i for i, f in enumerate(shares) if f >= share]
  if not passing:  # Even little noise reshuffles the top 10 (near-ties).
    return scales[0], table
  i = passing[-1]  # More noise, fewer neighbours kept: the largest passing.
  if i + 1 == len(scales):
    return scales[-1], table
  # Between two norms, the share falls about linearly in log(norm).
  fraction = (shares[i] - share) / max(shares[i] - shares[i + 1], 1e-9)
  return float(scales[i] * (scales[i + 1] / scales[i]) ** fraction), table


def smallest_passing(low: int, high: int, passes: Callable[[int], bool],
                     tolerance: float = 0.1, high_passes: bool = False,
                     step: int = 1, max_gap: float = math.inf):
  """The smallest value in [low, high] that passes, for a monotone test.

  Doubles from `low` until a value passes, then bisects between the last
  failing and the first passing value until they are within `tolerance` of
  the passing one, or `max_gap` when that is less (but never less than
  `step`). With `high_passes` (known already), bisects the whole range in log
  space instead: fewer tests when each costs about the same whatever the value.

  Returns:
    (value, True), or (high, False) when even `high` fails.
  """
  failing, value = None, low
  if high_passes:
    if passes(low):
      return low, True
    failing, value = low, high
  else:
    while not passes(value):
      if value >= high:
        return high, False
      failing, value = value, min(2 * value, high)
    if failing is None:
      return value, True
  while value - failing > max(step, min(int(tolerance * value), max_gap)):
    middle = (int(round(np.sqrt(failing * value))) if high_passes
              else (failing + value) // 2)
    middle = min(max(middle, failing + 1), value - 1)
    if passes(middle):
      value = middle
    else:
      failing = middle
  return value, True


def choose_settings(meter: "RecallMeter", target: float, *, k: int,
                    num_leaves: int | None, max_reorder: int,
                    leaves: int | None = None, reorder: int | None = None):
  """The cheapest (leaves_to_search, reorder_num_neighbors) that pass.

  Leaves first, the dominant cost, with generous reordering; then the fewest
  candidates reordered at those leaves (see the module's docstring).

  Args:
    meter: measures the settings.
    target: recall@k of exact to reach.
    k: the depth of recall.
    num_leaves: tree leaves (None: no tree; leaves are then None).
    max_reorder: the most candidates to reorder.
    leaves: kept as given (not tuned) when set.
    reorder: kept as given when set.

  Returns:
    (leaves, reorder).
  """
  tuned_leaves = num_leaves is not None and not leaves
  search_reorder = reorder or max_reorder
  leaves_found = True
  if tuned_leaves:
    leaves, leaves_found = smallest_passing(
        1, num_leaves, lambda x: meter.passes(x, search_reorder, target))
  if reorder or not leaves_found:
    return leaves, search_reorder
  # Tuned leaves passed with max_reorder already.
  if tuned_leaves or meter.passes(leaves, max_reorder, target):
    reorder, _ = smallest_passing(
        k, max_reorder, lambda x: meter.passes(leaves, x, target),
        tolerance=0.25, high_passes=True, step=max(1, k // 2),
        max_gap=REORDER_GAP)
    return leaves, reorder
  return leaves, max_reorder


class RecallMeter:
  """Measures recall@k of exact for search settings, screening on subsets.

  Args:
    search: (queries, leaves, reorder) -> found rows [Q, >=k].
    queries: float32 [Q, D] tuning queries.
    exact_indices: int [Q, k] their exact top k.
    exact_scores: float [Q, k] its scores (None without a gallery).
    gallery: float32 [N, D], or None (see `recall_of_exact`).
    base: the first `base` queries decide every setting they can (see
      `passes`); the rest are searched only for settings they leave in doubt.
      None: the whole sample decides.
  """

  def __init__(self, search, queries, exact_indices, exact_scores, gallery,
               base: int | None = None):
    self._search = search
    self._args = (exact_indices, exact_scores, gallery, queries)
    self.queries = queries
    self.base = min(len(queries), base or len(queries))
    self.quick = min(self.base, max(QUICK_MIN, int(QUICK_SHARE * self.base)))
    # (leaves, reorder, queries) -> (mean recall, its standard error).
    self._measured: dict[tuple, tuple[float, float]] = {}
    self.evaluations: list[list[Any]] = []

  def _measure(self, leaves, reorder, num):
    exact_indices, exact_scores, gallery, queries = self._args
    found = self._search(queries[:num], leaves, reorder)
    per_query = recall_of_exact(
        found, exact_indices[:num],
        None if exact_scores is None else exact_scores[:num], gallery,
        queries[:num])
    self.evaluations.append([leaves, reorder, num,
                             round(float(per_query.mean()), 4)])
    return per_query

  def _stats(self, leaves, reorder, num) -> tuple[float, float]:
    """(mean recall@k of exact over the first `num` queries, its standard
    error), measured once."""
    key = (leaves, reorder, num)
    if key not in self._measured:
      per_query = self._measure(leaves, reorder, num)
      self._measured[key] = (float(per_query.mean()),
                             _standard_error(per_query))
    return self._measured[key]

  def recall(self, leaves, reorder) -> tuple[float, float]:
    """(mean recall@k of exact over the whole sample, its standard error)."""
    return self._stats(leaves, reorder, len(self.queries))

  def passes(self, leaves, reorder, target: float) -> bool:
    """Whether recall, less MARGIN_SE standard errors, reaches `target`: on
    the first `base` queries when that decides it (it passes there, or its
    mean falls short of the target), else on the whole sample. A quarter of
    the base first rejects settings that fall well short."""
    whole = len(self.queries)
    if (leaves, reorder, whole) not in self._measured:
      if self.quick < self.base:
        mean, error = self._stats(leaves, reorder, self.quick)
        if mean < target - max(QUICK_MARGIN, 2 * error):
          return False
      if self.base < whole:
        mean, error = self._stats(leaves, reorder, self.base)
        if mean - MARGIN_SE * error >= target:
          return True
        if mean < target:
          return False
    mean, error = self.recall(leaves, reorder)
    return mean - MARGIN_SE * error >= target


def _standard_error(values: np.ndarray) -> float:
  if len(values) < 2:
    return 0.0
  return float(values.std(ddof=1) / np.sqrt(len(values)))


@dataclasses.dataclass
class Tuning:
  """What tuning chose and measured; saved in index.json as "tuning".

  Attributes:
    target: recall@10 of exact aimed for (None: no tuning, fixed settings).
    recall: recall@10 of exact the chosen settings reach on the tuning sample
      (None when not measured).
    recall_stderr: the standard error of that mean over the queries.
    met: whether recall >= target.
    num_queries: tuning queries used.
    queries: how they were made: "gallery" (rows plus noise), "given" (the
      caller's), or "none".
    noise_scale: the noise norm of gallery-derived queries.
    neighbours_kept: mean share of its row's exact top 10 that a
      gallery-derived query keeps in its own.
    pilot_neighbours_kept: noise norm -> that share over the pilot queries.
    leaves_to_search: chosen (tree modes).
    reorder_num_neighbors: chosen.
    evaluations: [leaves_to_search, reorder_num_neighbors, queries, recall]
      measured, in order.
    seconds: wall time of tuning (exact pass included).
    exact_seconds: wall time of the exact top-10 pass.
    note: why nothing was tuned, or the warning given when the target was
      missed.
    alternatives: the indexes compared on these queries, when a flat index
      might beat the one chosen for the gallery's size: each one's mode,
      dims_per_block, tuned settings, recall, met, queries_per_s (measured
      when met) and kept.
  """

  target: float | None = None
  recall: float | None = None
  recall_stderr: float | None = None
  met: bool | None = None
  num_queries: int = 0
  queries: str = "none"
  noise_scale: float | None = None
  neighbours_kept: float | None = None
  pilot_neighbours_kept: dict[str, float] | None = None
  leaves_to_search: int | None = None
  reorder_num_neighbors: int | None = None
  evaluations: list[list[Any]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  exact_seconds: float = 0.0
  note: str = ""
  alternatives: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data) -> "Tuning":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(data or {}).items() if k in known})
