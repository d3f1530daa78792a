"""ScaNN search through `scann_ops_pybind`, tuned to a target recall of exact.

The index kind follows the gallery size (`ScannSettings`); the search-time
settings (leaves searched, candidates reordered) are tuned at build time until
recall@10 of exact search reaches `ScannSettings.target_recall` on a held-out
sample (see `tuning`).

Memory per vector (d = 1024, the defaults: 4-bit AH codes over 2-dim blocks,
int8 reordering): 1024 bytes of int8 reorder data, 256 of AH codes, 8 of tree
bookkeeping (each row's leaf, and its slot in the leaf's member list), about 4
of tree centres (4 d bytes per leaf, 2 sqrt(n) leaves), and the product id as a
Python string (about 60-70 bytes): about 1.36 KB, against 4 KB for float32
rows. `bytes_per_vector` computes it for an index; measured process memory of
a loaded 100K-row index agrees within 5% (1.43 KB measured).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

from absl import logging
import numpy as np

from procir_jax.eval.search import tuning as tuning_lib
from procir_jax.eval.search.base import (INDEX_FILE, SCANN_DIR, SearchIndex,
                                         _check_gallery, _check_queries,
                                         _read_common, _sort_results,
                                         id_bytes_per_vector)


SCANN_MODES = ("auto", "brute_force", "ah", "tree_ah")
SEARCH_TIME_SETTINGS = ("leaves_to_search", "reorder_num_neighbors",
                        "num_threads", "search_batch_size")
REORDER_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
# The highest target recall@10 that reorder_dtype="auto" rescores in int8: int8
# caps recall near 0.98-0.99 (see ScannSettings.reorder_dtype), and tuning
# needs room above the target for its margin of two standard errors.
INT8_MAX_TARGET = 0.96
# Tree leaves per sqrt(n) rows. Smaller leaves split fewer neighbourhoods between
# leaves: at 1M x 1024 well separated clusters (bench/search.py's `clusters`),
# 1000 leaves searched 1 at a time capped recall@10 near 0.98 even with bfloat16
# rescoring (rows of a query's cluster sat in a second leaf, ranked far down),
# and 88 leaves were needed for 0.99 (1,059 queries/s on 2 cores); 2000 leaves
# reached 0.99 at 1 leaf and 0.992 at 2 (8,591 queries/s), for 20% more build
# time (both trees trained on 250K rows; see TREE_TRAINING_ROWS_PER_LEAF).
# SOAR spilling (soar_lambda=1.5) at 1000 leaves did not help there.
LEAVES_PER_SQRT_N = 2.0
# Rows sampled to train the codebooks (AH), and the fewest sampled to train the
# tree.
TRAINING_SAMPLE = 250_000
# Rows sampled per tree leaf to train the tree. k-means on too thin a sample
# splits clusters between leaves: at 1M x 1024 `clusters` (10,000 clusters of
# 100 rows, 2000 leaves), a 250K-row sample (25 rows per cluster) left one leaf
# at recall@10 of exact 0.991 with 75 candidates rescored in bfloat16, and
# tuning for 0.99 needed 2 to 18 leaves; 250 rows per leaf (500K) reached 0.997
# at one leaf, as much as a 1M sample, for 100 s more build time (366 s).
TREE_TRAINING_ROWS_PER_LEAF = 250
# Settings that indexes of earlier versions may record and that no longer exist:
# all chose how the index was tuned, so loading ignores them.
RETIRED_SETTINGS = ("tuning_own_row_share",)
# Tuning queries when `tuning_sample_size` is 0: 1000, fewer for big galleries
# so that their exact top-10 pass stays near 2e12 flops, about 20 s on two
# cores: 2 x queries x rows x dim flops for given queries, twice that for
# gallery-derived ones, whose rows' own top 10 is found in the same pass (so
# they get half as many: 488 at 1M x 1024, given queries 976); at least 400,
# which estimate recall@10 to about +-0.01.
AUTO_TUNING_QUERIES = 1000
MIN_AUTO_TUNING_QUERIES = 400
EXACT_PASS_FLOPS = 2e12
# Targets above BASE_TUNING_TARGET get a sample (queries and exact-pass budget)
# (1 - BASE_TUNING_TARGET) / (1 - target) times as large, at most
# MAX_TUNING_SCALE: the margin of two standard errors must stay small beside
# the room left below recall 1 (see `tuning`). The usual count decides the
# settings it can; the rest are searched only for those it leaves in doubt.
BASE_TUNING_TARGET = 0.95
MAX_TUNING_SCALE = 5.0
# An index of mode "auto" whose tree must search this share of its leaves (or
# that scores every row already) is compared with flat AH indexes of these code
# sizes, tuned on the same queries, and the fastest that meets the target kept.
# On 100K x 1024 overlapping clusters the tree needed 448 of 632 leaves (821
# queries/s); flat AH with 4 dimensions per code needed none and rescored 750
# candidates (1,680 queries/s), both at recall@10 of exact above 0.98.
FLAT_FROM_LEAF_SHARE = 0.25
FLAT_DIMS_PER_BLOCK = (2, 4)
# A flat index scores every row's codes, so rescoring a share of the rows as
# well costs little beside that scan: its tuning may go that far, when that is
# above max_reorder_num_neighbors. The share is where rescoring in bfloat16
# costs what the finer code's longer scan does, so that the coarser code can
# still win: on 1M x 1024 overlapping clusters, the scan of 4 dimensions per
# code took 4.4 ms a query, of 2 dimensions 10.2 ms, and each candidate
# rescored 0.24 us (2 cores), so 2% of the rows. There, for 0.99 on gallery-
# derived queries, 4 dimensions per code needed 10,407 rescored (139 queries/s)
# and 2 dimensions 423 (97); within 0.4% the former missed it.
FLAT_MAX_REORDER_SHARE = 0.02


@dataclasses.dataclass(frozen=True)
class ScannSettings:
  """How a ScaNN index is built and searched; zeros mean "choose".

  `resolve(n, d)` turns "auto" and zeros into concrete values; the resolved
  settings, with the tuned search-time values, are what an index records and
  uses.

  Attributes:
    mode: "auto" (from the gallery size; with a target, an index that gains
      little from its tree is also compared with flat AH indexes of
      FLAT_DIMS_PER_BLOCK and the fastest kept), "brute_force", "ah"
      (asymmetric hashing + reordering) or "tree_ah" (partitioning + AH +
      reordering).
    brute_force_below: auto uses brute force for fewer gallery rows.
    tree_from: auto partitions galleries of at least this many rows.
    num_leaves: tree leaves; 0 gives round(LEAVES_PER_SQRT_N * sqrt(n)).
    leaves_to_search: leaves scored per query; 0 tunes it for target_recall
      (or, without a target, gives ceil(leaves_to_search_fraction *
      num_leaves)); a value given is kept as it is.
    leaves_to_search_fraction: see leaves_to_search.
    training_sample_size: rows sampled to train the AH codebooks; 0 gives
      min(n, TRAINING_SAMPLE).
    tree_training_sample_size: rows sampled to train the tree; 0 gives
      min(n, max(TRAINING_SAMPLE, TREE_TRAINING_ROWS_PER_LEAF * num_leaves)).
    min_partition_size: smallest tree leaf ScaNN keeps.
    training_iterations: k-means iterations for the tree.
    spherical: spherical k-means for the tree (unit-norm leaf centres). For
      unit vectors searched by dot product it finds the right leaves far more
      often: on the benchmark's clustered data, plain k-means leaves rank big
      multi-cluster leaves low and miss neighbours.
    dims_per_block: AH dimensions per 4-bit (lut16) or 8-bit code.
    anisotropic_quantization_threshold: AH score-aware loss threshold (None
      turns it off).
    hash_type: "lut16" or "lut256".
    reorder_num_neighbors: AH candidates rescored; 0 tunes it for
      target_recall (without a target: 250); a value given is kept. At search
      time at least k are rescored.
    reorder_dtype: "int8", "bfloat16" or "float32" copy of the gallery used
      for rescoring (1, 2 or 4 bytes per dimension), or "auto": int8 for
      targets up to `INT8_MAX_TARGET` (and without a target), bfloat16 above.
      int8 (per-dimension scales) caps what rescoring can reach: rescoring
      every candidate the index needs gave recall@10 of exact 0.986 with
      int8 and 0.997 with bfloat16 at 100K x 1024 well separated clusters
      (0.989 and 0.998 on strongly overlapping ones; 0.981 with int8 at 1M),
      as neighbours' scores there differ by less than int8's error. Returned
      scores carry that error (up to about 1e-3 for int8, 2e-4 for bfloat16).
    target_recall: recall@10 of exact search to reach on the tuning sample
      (see `tuning`); None or 0 tunes nothing and uses the fixed values
      above.
    tuning_sample_size: most tuning queries; 0: 1000, fewer (at least 400)
      for big galleries, so the exact pass stays near 2e12 flops (half as
      many gallery-derived queries as given ones); for targets above 0.95
      both grow in proportion to 1 / (1 - target), up to 5x at 0.99 (see
      `tuning_scale`).
    max_reorder_num_neighbors: the most candidates tuning may reorder (the
      flat indexes that mode "auto" compares with a tree may go up to
      FLAT_MAX_REORDER_SHARE of the rows, when that is more).
    tuning_neighbours_kept: gallery-derived tuning queries get the noise at
      which they keep this share of their row's exact top 10 in their own
      (see `tuning`); higher means less noise: easier queries, smaller
      settings.
    tuning_seed: seeds the tuning sample and its noise.
    soar_lambda: SOAR spilling strength for trees (None: off).
    num_neighbors: default k recorded in the ScaNN config.
    num_threads: search threads; 0 uses every core this process may use.
    search_batch_size: queries per ScaNN parallel batch.
    training_threads: build threads; 0 lets ScaNN decide.
  """

  mode: str = "auto"
  brute_force_below: int = 10_000
  tree_from: int = 100_000
  num_leaves: int = 0
  leaves_to_search: int = 0
  leaves_to_search_fraction: float = 0.03
  training_sample_size: int = 0
  tree_training_sample_size: int = 0
  min_partition_size: int = 50
  training_iterations: int = 12
  spherical: bool = True
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float | None = 0.2
  hash_type: str = "lut16"
  reorder_num_neighbors: int = 0
  reorder_dtype: str = "auto"
  soar_lambda: float | None = None
  num_neighbors: int = 10
  num_threads: int = 0
  search_batch_size: int = 256
  training_threads: int = 0
  target_recall: float | None = 0.95
  tuning_sample_size: int = 0
  max_reorder_num_neighbors: int = 1000
  tuning_neighbours_kept: float = tuning_lib.NEIGHBOURS_KEPT
  tuning_seed: int = 0

  def __post_init__(self):
    if self.mode not in SCANN_MODES:
      raise ValueError(f"ScannSettings.mode must be one of {SCANN_MODES}, "
                       f"got {self.mode!r}")
    if self.hash_type not in ("lut16", "lut256"):
      raise ValueError("ScannSettings.hash_type must be 'lut16' or 'lut256', "
                       f"got {self.hash_type!r}")
    if self.reorder_dtype not in ("auto", *REORDER_BYTES):
      raise ValueError("ScannSettings.reorder_dtype must be auto, float32, "
                       f"bfloat16 or int8, got {self.reorder_dtype!r}")
    if self.target_recall is not None and not 0 <= self.target_recall <= 1:
      raise ValueError("ScannSettings.target_recall must be in (0, 1] (None or "
                       f"0: no tuning), got {self.target_recall!r}")
    if not 0 < self.tuning_neighbours_kept <= 1:
      raise ValueError("ScannSettings.tuning_neighbours_kept must be in (0, 1], "
                       f"got {self.tuning_neighbours_kept!r}")
    if self.tuning_sample_size < 0 or self.max_reorder_num_neighbors < 1:
      raise ValueError("ScannSettings.tuning_sample_size must be >= 0 and "
                       "max_reorder_num_neighbors >= 1")

  @classmethod
  def from_config(cls, config=None) -> "ScannSettings":
    """From None, a ScannSettings, or a mapping (dict or ml_collections)."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    config = dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"unknown ScaNN settings {unknown}; known: "
                       f"{sorted(known)}")
    return cls(**config)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def resolve(self, num: int, dimension: int) -> "ScannSettings":
    """Concrete settings for a gallery of `num` rows of `dimension`."""
    del dimension  # The same rules fit every dimension ScaNN takes.
    mode = self.mode
    if mode == "auto":
      if num < self.brute_force_below:
        mode = "brute_force"
      elif num < self.tree_from:
        mode = "ah"
      else:
        mode = "tree_ah"
    num_leaves = self.num_leaves or max(
        1, round(LEAVES_PER_SQRT_N * math.sqrt(num)))
    leaves = self.leaves_to_search or max(
        1, math.ceil(self.leaves_to_search_fraction * num_leaves))
    dtype = self.reorder_dtype
    if dtype == "auto":
      dtype = auto_reorder_dtype(self.target_recall)
    return dataclasses.replace(
        self, mode=mode, num_leaves=num_leaves, reorder_dtype=dtype,
        leaves_to_search=min(leaves, num_leaves),
        training_sample_size=self.training_sample_size or min(
            num, TRAINING_SAMPLE),
        tree_training_sample_size=self.tree_training_sample_size or min(
            num, max(TRAINING_SAMPLE, TREE_TRAINING_ROWS_PER_LEAF * num_leaves)),
        reorder_num_neighbors=self.reorder_num_neighbors or 250)

  def tuning_scale(self) -> float:
    """How many times the usual tuning sample the target needs: 1 up to
    BASE_TUNING_TARGET, (1 - BASE_TUNING_TARGET) / (1 - target) above it, at
    most MAX_TUNING_SCALE."""
    room = 1.0 - (self.target_recall or 0.0)
    if room <= 0:
      return MAX_TUNING_SCALE
    # Rounded so that 0.05 / (1 - 0.99) gives 5, not 4.999...
    scale = round((1.0 - BASE_TUNING_TARGET) / room, 6)
    return min(MAX_TUNING_SCALE, max(1.0, scale))

  def tuning_queries(self, num: int, dimension: int, given: bool = False,
                     scaled: bool = True) -> int:
    """How many tuning queries a gallery of `num` rows gets: of the caller's
    (`given`), or made from gallery rows, which cost twice as much exact
    search; `scaled=False` leaves out the target's `tuning_scale`: the queries
    that decide every setting they can."""
    if self.tuning_sample_size:
      return min(num, self.tuning_sample_size)
    scale = self.tuning_scale() if scaled else 1.0
    flops_per_query = (2 if given else 4) * num * dimension
    budget = int(scale * EXACT_PASS_FLOPS / flops_per_query)
    return min(num, int(scale * AUTO_TUNING_QUERIES),
               max(MIN_AUTO_TUNING_QUERIES, budget))


def auto_reorder_dtype(target_recall: float | None) -> str:
  """What `reorder_dtype="auto"` rescores with for a target: int8 up to
  `INT8_MAX_TARGET` (and without a target), bfloat16 above."""
  return "bfloat16" if (target_recall or 0) > INT8_MAX_TARGET else "int8"


def available_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _scann_ops():
  # Imported on first use: `import scann` also loads TensorFlow (seconds).
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


def _reorder_type(name: str):
  from scann.scann_ops.py import scann_builder  # pylint: disable=g-import-not-at-top
  return {"float32": scann_builder.ReorderType.FLOAT32,
          "bfloat16": scann_builder.ReorderType.BFLOAT16,
          "int8": scann_builder.ReorderType.INT8}[name]


@dataclasses.dataclass(frozen=True)
class _TuningSample:
  """Tuning queries with their exact top 10, shared by the indexes compared."""

  queries: np.ndarray
  exact_indices: np.ndarray
  exact_scores: np.ndarray
  made: tuning_lib.Tuning  # how the queries were made
  seconds: float  # making them and their exact pass
  base: int  # the first `base` queries decide what they can (RecallMeter)


class ScannSearch(SearchIndex):
  """ScaNN searcher over a product gallery.

  Args:
    embeddings: float32 [N, D] gallery, L2-normalised.
    ids: N unique product ids (default: "0".."N-1").
    settings: a `ScannSettings`, a mapping of its fields (dict or
      ml_collections ConfigDict), or None for the defaults.
    normalize: L2-normalise the gallery and every query (cosine scores for
      embeddings of any norm).
    tuning_queries: float [Q, D] queries to tune the search-time settings on
      (say the evaluation's own queries); None makes them from the gallery
      (see `tuning`). At most `settings.tuning_sample_size` (or
      `settings.tuning_queries`) are used, drawn at random.
  """

  backend = "scann"

  def __init__(self, embeddings, ids=None, settings=None,
               normalize: bool = False, tuning_queries=None, *,
               _sample: "_TuningSample | None" = None):
    embeddings, ids = _check_gallery(embeddings, ids, normalize)
    super().__init__(ids, embeddings.shape[1], normalize)
    requested = ScannSettings.from_config(settings)
    self.settings = requested.resolve(*embeddings.shape)
    if tuning_queries is not None and not self.settings.target_recall:
      raise ValueError("tuning_queries were given but ScannSettings."
                       "target_recall is unset: give a target (e.g. 0.95)")
    try:
      self._searcher = self._build(embeddings, self.settings)
    except RuntimeError as e:
      raise ValueError(
          f"ScaNN could not build a {self.settings.mode} index over "
          f"{embeddings.shape[0]} x {embeddings.shape[1]} embeddings ({e}); "
          "for small galleries use mode='brute_force'") from e
    self._searcher.set_num_threads(self.threads)
    self.tuning, sample = self._tune(embeddings, requested, tuning_queries,
                                     _sample)
    if self.tuning.leaves_to_search or self.tuning.reorder_num_neighbors:
      self.settings = dataclasses.replace(
          self.settings,
          leaves_to_search=(self.tuning.leaves_to_search
                            or self.settings.leaves_to_search),
          reorder_num_neighbors=(self.tuning.reorder_num_neighbors
                                 or self.settings.reorder_num_neighbors))
    if sample is not None and self._flat_may_be_faster(requested):
      self._keep_the_fastest(embeddings, requested, sample)
    if _sample is None and self.tuning.met is False:
      # Only for the index kept, not for the alternatives compared with it.
      logging.warning("%s", self.tuning.note)

  def _flat_may_be_faster(self, requested: ScannSettings) -> bool:
    """Whether an index of the mode chosen for its size may lose to one that
    scores every row's codes: a tree that must search a large share of its
    leaves saves little (data without clusters), and coarser codes scan
    faster, their loss made up by rescoring more candidates."""
    s, t = self.settings, self.tuning
    if requested.mode != "auto" or s.mode == "brute_force":
      return False
    return (s.mode == "ah" or not t.met
            or t.leaves_to_search >= FLAT_FROM_LEAF_SHARE * s.num_leaves)

  def _keep_the_fastest(self, embeddings, requested, sample) -> None:
    """Builds flat AH indexes with FLAT_DIMS_PER_BLOCK, tunes each on the same
    queries (rescoring up to FLAT_MAX_REORDER_SHARE of the rows), times every
    one that meets the target on them and keeps the fastest (or, when none
    meets it, this one). One index is built at a time and the slower of two is
    dropped at once, so at most two are held."""
    k = min(tuning_lib.RECALL_K, self.count)

    def measured(index) -> dict[str, Any]:
      t, qps = index.tuning, None
      if t.met:
        queries = sample.queries[:sample.base]
        seconds = []
        for _ in range(2):  # the first also warms caches
          start = time.perf_counter()
          index.search(queries, k)
          seconds.append(time.perf_counter() - start)
        qps = round(len(queries) / max(min(seconds), 1e-9), 1)
      return dict(mode=index.settings.mode,
                  dims_per_block=index.settings.dims_per_block,
                  leaves_to_search=t.leaves_to_search,
                  reorder_num_neighbors=t.reorder_num_neighbors,
                  recall=t.recall, met=t.met, queries_per_s=qps, kept=False)

    s = self.settings
    max_reorder = max(requested.max_reorder_num_neighbors,
                      math.ceil(FLAT_MAX_REORDER_SHARE * self.count))
    best, timed = self, [measured(self)]
    best_row = timed[0]
    for dims in FLAT_DIMS_PER_BLOCK:
      if (s.mode, s.dims_per_block) == ("ah", dims):
        continue
      flat = ScannSearch(embeddings, self.ids, _sample=sample,
                         settings=dataclasses.replace(
                             requested, mode="ah", dims_per_block=dims,
                             max_reorder_num_neighbors=max_reorder))
      row = measured(flat)
      timed.append(row)
      if row["met"] and (not best_row["met"] or
                         row["queries_per_s"] > best_row["queries_per_s"]):
        best, best_row = flat, row
      del flat
    best_row["kept"] = True
    logging.info("ScaNN over %d rows: %s", self.count, "; ".join(
        f"{r['mode']} with {r['dims_per_block']} dims per code: recall "
        f"{r['recall']}, {r['queries_per_s'] or '-'} queries/s"
        f"{' (kept)' if r['kept'] else ''}" for r in timed))
    self.settings, self._searcher = best.settings, best._searcher
    self.tuning = dataclasses.replace(best.tuning, alternatives=timed)

  @property
  def threads(self) -> int:
    # Not recorded in the index: the machine that loads it may differ.
    return self.settings.num_threads or available_cores()

  @property
  def tuned_recall(self) -> float | None:
    """Recall@10 of exact on the tuning sample (None: not tuned)."""
    return self.tuning.recall

  @staticmethod
  def _build(embeddings, s: ScannSettings):
    builder = _scann_ops().builder(embeddings, s.num_neighbors, "dot_product")
    if s.training_threads:
      builder = builder.set_n_training_threads(s.training_threads)
    if s.mode == "brute_force":
      return builder.score_brute_force().build()
    aqt = (float("nan") if s.anisotropic_quantization_threshold is None
           else s.anisotropic_quantization_threshold)
    if s.mode == "tree_ah":
      builder = builder.tree(
          num_leaves=s.num_leaves, num_leaves_to_search=s.leaves_to_search,
          training_sample_size=s.tree_training_sample_size,
          min_partition_size=s.min_partition_size,
          training_iterations=s.training_iterations,
          spherical=s.spherical, soar_lambda=s.soar_lambda)
    builder = builder.score_ah(
        s.dims_per_block, anisotropic_quantization_threshold=aqt,
        training_sample_size=s.training_sample_size, hash_type=s.hash_type)
    return builder.reorder(s.reorder_num_neighbors,
                           quantize=_reorder_type(s.reorder_dtype)).build()

  def _tune(self, gallery, requested: ScannSettings, tuning_queries,
            sample: "_TuningSample | None"
            ) -> tuple[tuning_lib.Tuning, "_TuningSample | None"]:
    """Chooses leaves_to_search and reorder_num_neighbors (see `tuning`) on
    `sample`, or on a sample made from `tuning_queries` or the gallery;
    returns what it chose and the sample (None when nothing was tuned)."""
    s = self.settings
    if not s.target_recall:
      return tuning_lib.Tuning(note="no target_recall: fixed settings, recall "
                               "not measured"), None
    if s.mode == "brute_force":
      return tuning_lib.Tuning(
          target=s.target_recall, recall=1.0, met=True,
          note="brute force scores every row exactly: nothing to tune"), None
    start = time.perf_counter()
    if sample is None:
      sample = self._tuning_sample(gallery, tuning_queries)
    result = dataclasses.replace(sample.made, target=s.target_recall)
    k = min(tuning_lib.RECALL_K, self.count)
    tree = s.mode == "tree_ah"

    def search(q, leaves, reorder):
      return self.search(q, k, leaves_to_search=leaves or 0,
                         reorder_num_neighbors=reorder)[0]

    meter = tuning_lib.RecallMeter(search, sample.queries, sample.exact_indices,
                                   sample.exact_scores, gallery,
                                   base=sample.base)
    target = s.target_recall
    max_reorder = min(self.count, max(k, s.max_reorder_num_neighbors))
    leaves, reorder = tuning_lib.choose_settings(
        meter, target, k=k, num_leaves=s.num_leaves if tree else None,
        max_reorder=max_reorder,
        leaves=s.leaves_to_search if tree and requested.leaves_to_search else None,
        reorder=requested.reorder_num_neighbors or None)
    achieved, error = meter.recall(leaves, reorder)
    result.recall = round(achieved, 4)
    result.recall_stderr = round(error, 4)
    result.met = bool(achieved >= target)
    result.leaves_to_search = leaves
    result.reorder_num_neighbors = reorder
    result.evaluations = meter.evaluations
    result.seconds = round(sample.seconds + time.perf_counter() - start, 3)
    if not result.met:
      result.note = self._missed_target_message(requested, result)
    return result, sample

  def _tuning_sample(self, gallery, tuning_queries) -> "_TuningSample":
    """Tuning queries (the caller's, or gallery rows plus noise) and their
    exact top 10."""
    s = self.settings
    start = time.perf_counter()
    n = self.count
    k = min(tuning_lib.RECALL_K, n)
    rng = np.random.default_rng(s.tuning_seed)
    given = tuning_queries is not None
    num = s.tuning_queries(n, self.dimension, given=given)
    base = s.tuning_queries(n, self.dimension, given=given, scaled=False)
    made = tuning_lib.Tuning()
    rows = None
    if given:
      try:
        queries = _check_queries(tuning_queries, self.dimension,
                                 self.normalize)
      except ValueError as e:
        raise ValueError(f"tuning_queries: {e}") from e
      if queries.shape[0] == 0:
        raise ValueError("tuning_queries is empty: pass [Q, D] queries with "
                         "Q > 0, or None to make them from the gallery")
      # In random order: the first quarter screens settings (see tuning).
      queries = queries[rng.permutation(queries.shape[0])[:num]]
      made.queries = "given"
    else:
      rows = rng.choice(n, num, replace=False)
      made.noise_scale, made.pilot_neighbours_kept = (
          tuning_lib.calibrate_noise(gallery, rows[:tuning_lib.PILOT_ROWS],
                                     rng, s.tuning_neighbours_kept))
      queries = tuning_lib.noisy_rows(gallery, rows, made.noise_scale, rng)
      made.queries = "gallery"
    made.num_queries = int(queries.shape[0])
    exact_start = time.perf_counter()
    if rows is None:
      exact_indices, exact_scores = tuning_lib.exact_top_k(gallery, queries, k)
    else:
      # With the rows' own top k, in the same pass over the gallery, to record
      # how much of it the queries kept.
      both, both_scores = tuning_lib.exact_top_k(
          gallery, np.concatenate([queries, gallery[rows]]), k)
      exact_indices, exact_scores = both[:len(rows)], both_scores[:len(rows)]
      made.neighbours_kept = round(float(tuning_lib.neighbours_kept(
          exact_indices, both[len(rows):]).mean()), 4)
    made.exact_seconds = round(time.perf_counter() - exact_start, 3)
    return _TuningSample(queries, exact_indices, exact_scores, made,
                         time.perf_counter() - start,
                         base=min(base, len(queries)))

  def _missed_target_message(self, requested, result) -> str:
    s = self.settings
    where = (f"leaves_to_search={result.leaves_to_search} of {s.num_leaves} "
             if s.mode == "tree_ah" else "")
    advice = []
    fixed = [name for name in ("leaves_to_search", "reorder_num_neighbors")
             if getattr(requested, name)]
    if fixed:
      advice.append(f"leave {' and '.join(fixed)} at 0 so they are tuned")
    if s.mode == "tree_ah" and result.leaves_to_search < s.num_leaves:
      advice.append("search more leaves (a larger leaves_to_search)")
    if s.reorder_dtype != "float32":
      advice.append(f"rescore more precisely than reorder_dtype="
                    f"{s.reorder_dtype!r} (bfloat16: 2 bytes per dimension, "
                    "float32: 4)")
    advice.append(f"reorder more candidates (max_reorder_num_neighbors, now "
                  f"{s.max_reorder_num_neighbors})")
    if s.mode == "tree_ah":
      advice.append("use mode='ah', which scores every row")
    advice.append("use mode='brute_force' (exact), or lower target_recall")
    return (f"ScaNN {s.mode} index over {self.count} rows: recall@10 of exact "
            f"is {result.recall:.4f} on {result.num_queries} "
            f"{result.queries} tuning queries, below the target "
            f"{s.target_recall} even at {where}reorder_num_neighbors="
            f"{result.reorder_num_neighbors} ({s.reorder_dtype} reordering). "
            f"To reach it: {'; '.join(advice)}.")

  @classmethod
  def _from_searcher(cls, searcher, ids, dimension, settings, normalize,
                     tuning=None):
    self = cls.__new__(cls)
    SearchIndex.__init__(self, ids, dimension, normalize)
    self.settings = settings
    self.tuning = tuning or tuning_lib.Tuning()
    self._searcher = searcher
    self._searcher.set_num_threads(self.threads)
    return self

  def memory_per_vector(self) -> dict[str, float]:
    """Bytes of memory per gallery row, by part, when loaded (see module)."""
    s, d, n = self.settings, self.dimension, max(1, self.count)
    parts = {}
    if s.mode == "brute_force":
      parts["float32 rows"] = 4.0 * d
    else:
      blocks = math.ceil(d / s.dims_per_block)
      # lut16 codes are packed two per byte; the searcher without a tree
      # also keeps them unpacked, one per byte.
      parts["AH codes"] = blocks / 2 if s.hash_type == "lut16" else blocks
      if s.mode == "ah" and s.hash_type == "lut16":
        parts["AH codes"] += blocks
      parts[f"{s.reorder_dtype} reorder rows"] = float(
          REORDER_BYTES[s.reorder_dtype] * d)
      if s.mode == "tree_ah":
        # Each row's leaf and its entry in the leaf's member list (int32s);
        # SOAR spills each row into a second leaf.
        parts["tree"] = 8.0 + (4.0 if s.soar_lambda is not None else 0.0)
        parts["tree centres"] = 4.0 * d * s.num_leaves / n
      parts["codebooks"] = (4.0 * d * (16 if s.hash_type == "lut16" else 256)
                            / n)
    parts["id"] = id_bytes_per_vector(self.ids)
    return parts

  def describe(self) -> str:
    s, t = self.settings, self.tuning
    text = f"scann {s.mode}"
    if s.mode == "tree_ah":
      text += (f": {s.num_leaves} leaves, leaves_to_search="
               f"{s.leaves_to_search}")
    if s.mode != "brute_force":
      text += (f"{',' if s.mode == 'tree_ah' else ':'} reorder_num_neighbors="
               f"{s.reorder_num_neighbors} ({s.reorder_dtype}), "
               f"{s.dims_per_block} dims per code")
    if t.alternatives:
      text += (f" (the fastest of {len(t.alternatives)} indexes compared on "
               f"the tuning queries)")
    return f"{text}; {tuning_description(t)}"

  def search(self, queries, k: int = 10, *, leaves_to_search: int = 0,
             reorder_num_neighbors: int = 0):
    """See `SearchIndex.search`; the keyword arguments override settings."""
    queries = _check_queries(queries, self.dimension, self.normalize)
    k = max(1, min(int(k), self.count))
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    s = self.settings
    kwargs = {}
    if s.mode != "brute_force":
      kwargs["pre_reorder_num_neighbors"] = max(
          reorder_num_neighbors or s.reorder_num_neighbors, k)
    if s.mode == "tree_ah":
      kwargs["leaves_to_search"] = leaves_to_search or s.leaves_to_search
    queries = np.ascontiguousarray(queries)
    if queries.shape[0] == 1 or self.threads == 1:
      indices, scores = self._searcher.search_batched(
          queries, final_num_neighbors=k, **kwargs)
    else:
      indices, scores = self._searcher.search_batched_parallel(
          queries, final_num_neighbors=k, batch_size=s.search_batch_size,
          **kwargs)
    indices = np.asarray(indices).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    # ScaNN pads rows it cannot fill with index 0 and a NaN score.
    indices = np.where(np.isnan(scores), -1, indices)
    return _sort_results(indices, scores)

  def settings_dict(self):
    return self.settings.to_dict()

  def metadata_dict(self):
    return dict(tuning=self.tuning.to_dict())

  def _save_arrays(self, directory):
    assets = os.path.join(directory, SCANN_DIR)
    os.makedirs(assets, exist_ok=True)
    # relative_path: the asset list names files inside the folder only, so
    # the index directory can move.
    self._searcher.serialize(assets, relative_path=True)

  @classmethod
  def load(cls, directory, **overrides) -> "ScannSearch":
    """Loads a saved index.

    Args:
      directory: what `save` wrote.
      **overrides: search-time settings to change (leaves_to_search,
        reorder_num_neighbors, num_threads, search_batch_size); the rest are
        fixed when the index is built.

    Returns:
      The index, answering as it did when saved.
    """
    bad = sorted(set(overrides) - set(SEARCH_TIME_SETTINGS))
    if bad:
      raise ValueError(f"{bad} cannot change after the index is built; "
                       f"search-time settings: {SEARCH_TIME_SETTINGS}")
    meta, ids = _read_common(directory, "scann")
    assets = os.path.join(os.fspath(directory), SCANN_DIR)
    pbtxt = os.path.join(assets, "scann_assets.pbtxt")
    if not os.path.isfile(pbtxt):
      raise FileNotFoundError(
          f"{pbtxt} is missing: a ScaNN index keeps ScaNN's serialized assets "
          f"in {SCANN_DIR}/ (written by ScannSearch.save)")
    with open(pbtxt) as f:
      listed = re.findall(r'asset_path:\s*"([^"]*)"', f.read())
    missing = [p for p in listed + ["scann_config.pb"]
               if not os.path.isfile(os.path.join(assets, p))]
    if missing:
      raise FileNotFoundError(
          f"ScaNN index {assets} lacks {missing}; the directory is "
          "incomplete: copy it whole or rebuild the index")
    recorded = dict(meta.get("settings") or {})
    for name in RETIRED_SETTINGS:  # Build-time only: nothing to restore.
      recorded.pop(name, None)
    try:
      settings = ScannSettings.from_config(dict(recorded, **overrides))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{directory}/{INDEX_FILE} has bad settings: {e}") from e
    try:
      searcher = _scann_ops().load_searcher(assets)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"ScaNN could not load the index in {assets} ({e}); "
                       "the files are corrupt: rebuild the index") from e
    if searcher.size() != meta["count"]:
      raise ValueError(f"ScaNN index in {assets} holds {searcher.size()} rows, "
                       f"index.json says {meta['count']}")
    return cls._from_searcher(searcher, ids, meta["dimension"], settings,
                              bool(meta.get("normalize", False)),
                              tuning_lib.Tuning.from_dict(meta.get("tuning")))


def tuning_description(t: tuning_lib.Tuning) -> str:
  """One line on what tuning reached, for logs and tools."""
  if t.target is None:
    return "not tuned (no target recall)"
  if not t.num_queries:
    return f"recall@10 of exact {t.recall} ({t.note})"
  how = (f"gallery rows + noise of norm {t.noise_scale:.3g}, keeping "
         f"{t.neighbours_kept:.2f} of their rows' top 10" if t.queries == "gallery"
         else "the caller's queries")
  text = (f"recall@10 of exact {t.recall:.4f} (target {t.target}) on "
          f"{t.num_queries} tuning queries ({how}); tuned in {t.seconds:.1f} s")
  if not t.met:
    text += ": TARGET MISSED, see the warning logged at build time"
  return text




