"""ScaNN search, configured from the gallery size, through `scann_ops_pybind`."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import numpy as np

from procir_jax.eval.search.base import (INDEX_FILE, SCANN_DIR, SearchIndex,
                                         _check_gallery, _check_queries,
                                         _read_common, _sort_results)


SCANN_MODES = ("auto", "brute_force", "ah", "tree_ah")
SEARCH_TIME_SETTINGS = ("leaves_to_search", "reorder_num_neighbors",
                        "num_threads", "search_batch_size")


@dataclasses.dataclass(frozen=True)
class ScannSettings:
  """How a ScaNN index is built and searched; zeros mean "choose from size".

  `resolve(n, d)` turns "auto" and zeros into concrete values; the resolved
  settings are what an index records and uses.

  Attributes:
    mode: "auto" (from the gallery size), "brute_force", "ah" (asymmetric
      hashing + reordering) or "tree_ah" (partitioning + AH + reordering).
    brute_force_below: auto uses brute force for fewer gallery rows.
    tree_from: auto partitions galleries of at least this many rows.
    num_leaves: tree leaves; 0 gives round(sqrt(n)).
    leaves_to_search: leaves scored per query; 0 gives
      ceil(leaves_to_search_fraction * num_leaves).
    leaves_to_search_fraction: see leaves_to_search.
    training_sample_size: rows sampled to train the tree and AH codebooks; 0
      gives min(n, 250000).
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
    reorder_num_neighbors: AH candidates rescored exactly; 0 gives 250. At
      search time at least k are rescored.
    reorder_dtype: "float32", "bfloat16" or "int8" copy used for reordering.
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
  min_partition_size: int = 50
  training_iterations: int = 12
  spherical: bool = True
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float | None = 0.2
  hash_type: str = "lut16"
  reorder_num_neighbors: int = 0
  reorder_dtype: str = "float32"
  soar_lambda: float | None = None
  num_neighbors: int = 10
  num_threads: int = 0
  search_batch_size: int = 256
  training_threads: int = 0

  def __post_init__(self):
    if self.mode not in SCANN_MODES:
      raise ValueError(f"ScannSettings.mode must be one of {SCANN_MODES}, "
                       f"got {self.mode!r}")
    if self.hash_type not in ("lut16", "lut256"):
      raise ValueError("ScannSettings.hash_type must be 'lut16' or 'lut256', "
                       f"got {self.hash_type!r}")
    if self.reorder_dtype not in ("float32", "bfloat16", "int8"):
      raise ValueError("ScannSettings.reorder_dtype must be float32, bfloat16 "
                       f"or int8, got {self.reorder_dtype!r}")

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
    num_leaves = self.num_leaves or max(1, round(math.sqrt(num)))
    leaves = self.leaves_to_search or max(
        1, math.ceil(self.leaves_to_search_fraction * num_leaves))
    return dataclasses.replace(
        self, mode=mode, num_leaves=num_leaves,
        leaves_to_search=min(leaves, num_leaves),
        training_sample_size=self.training_sample_size or min(num, 250_000),
        reorder_num_neighbors=self.reorder_num_neighbors or 250)


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


class ScannSearch(SearchIndex):
  """ScaNN searcher over a product gallery.

  Args:
    embeddings: float32 [N, D] gallery, L2-normalised.
    ids: N unique product ids (default: "0".."N-1").
    settings: a `ScannSettings`, a mapping of its fields (dict or
      ml_collections ConfigDict), or None for the defaults.
    normalize: L2-normalise the gallery and every query (cosine scores for
      embeddings of any norm).
  """

  backend = "scann"

  def __init__(self, embeddings, ids=None, settings=None,
               normalize: bool = False):
    embeddings, ids = _check_gallery(embeddings, ids, normalize)
    super().__init__(ids, embeddings.shape[1], normalize)
    self.settings = ScannSettings.from_config(settings).resolve(
        *embeddings.shape)
    try:
      self._searcher = self._build(embeddings, self.settings)
    except RuntimeError as e:
      raise ValueError(
          f"ScaNN could not build a {self.settings.mode} index over "
          f"{embeddings.shape[0]} x {embeddings.shape[1]} embeddings ({e}); "
          "for small galleries use mode='brute_force'") from e
    self._searcher.set_num_threads(self.threads)

  @property
  def threads(self) -> int:
    # Not recorded in the index: the machine that loads it may differ.
    return self.settings.num_threads or available_cores()

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
          training_sample_size=s.training_sample_size,
          min_partition_size=s.min_partition_size,
          training_iterations=s.training_iterations,
          spherical=s.spherical, soar_lambda=s.soar_lambda)
    builder = builder.score_ah(
        s.dims_per_block, anisotropic_quantization_threshold=aqt,
        training_sample_size=s.training_sample_size, hash_type=s.hash_type)
    return builder.reorder(s.reorder_num_neighbors,
                           quantize=_reorder_type(s.reorder_dtype)).build()

  @classmethod
  def _from_searcher(cls, searcher, ids, dimension, settings, normalize):
    self = cls.__new__(cls)
    SearchIndex.__init__(self, ids, dimension, normalize)
    self.settings = settings
    self._searcher = searcher
    self._searcher.set_num_threads(self.threads)
    return self

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
    try:
      settings = ScannSettings.from_config(
          dict(meta.get("settings") or {}, **overrides))
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
                              bool(meta.get("normalize", False)))




