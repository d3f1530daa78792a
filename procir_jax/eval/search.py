"""Nearest-neighbour search over unit embeddings (cosine = dot product).

Two backends answer the same question, "the k gallery rows with the highest dot
product with each query":

- `ExactSearch`: a jitted, batched matmul + top-k in JAX. Queries go in fixed
  size batches and the gallery in fixed size chunks, so memory stays bounded
  (1M x 1024 galleries fit) and each shape compiles once. It is the ground
  truth and runs on whatever device JAX uses (CPU, GPU or TPU).
- `ScannSearch`: ScaNN through `scann_ops_pybind` (no TensorFlow ops),
  configured from the gallery size by `ScannSettings`: brute force for small
  galleries, asymmetric hashing (AH) with exact reordering for medium ones, and
  tree partitioning (about sqrt(n) leaves) + AH + reordering for large ones.

Both return `(indices, scores)`: int64 `[Q, k]` rows into the gallery and
float32 `[Q, k]` dot products, sorted by descending score with ties broken by
the lower gallery index. Slots with no result (only possible with ScaNN when a
partitioned search finds fewer than k candidates) hold index -1 and score -inf.

An index is saved to a directory that holds only relative paths, so it can be
moved or copied:

  index.json        format, format_version, backend, dimension, count,
                    normalize, settings
  ids.json          the product ids, one per gallery row
  embeddings.npy    (exact) the gallery, float32 [count, dimension]
  scann/            (scann) ScaNN's own serialized assets

  index = build_index(gallery, product_ids, backend="scann")  # normalises
  index.save("workdir/index")
  index = load_index("workdir/index")
  ids, scores = index.search_ids(queries, k=10)
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "procir_jax.eval.search"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
IDS_FILE = "ids.json"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
BACKENDS = ("exact", "scann")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit L2 norm, in float32 (zero rows stay zero)."""
  x = np.asarray(x, dtype=np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, eps)


def _sort_results(indices: np.ndarray, scores: np.ndarray):
  """Sorts each row by descending score, then ascending index; empties last."""
  indices = np.asarray(indices, dtype=np.int64)
  scores = np.asarray(scores, dtype=np.float32)
  empty = indices < 0
  scores = np.where(empty, -np.inf, scores).astype(np.float32)
  # lexsort keys: last is primary. Empty slots sort after every real result.
  tie_index = np.where(empty, np.iinfo(np.int64).max, indices)
  order = np.lexsort((tie_index, -scores.astype(np.float64)), axis=-1)
  indices = np.take_along_axis(indices, order, axis=-1)
  scores = np.take_along_axis(scores, order, axis=-1)
  return indices, scores


def _check_queries(queries, dimension: int, normalize: bool) -> np.ndarray:
  queries = np.asarray(queries, dtype=np.float32)
  if queries.ndim == 1:
    queries = queries[None]
  if queries.ndim != 2 or queries.shape[1] != dimension:
    raise ValueError(f"queries must have shape [Q, {dimension}], got "
                     f"{queries.shape}")
  return l2_normalize(queries) if normalize else queries


def _check_gallery(embeddings, ids, normalize: bool):
  embeddings = np.asarray(embeddings, dtype=np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] == 0:
    raise ValueError("gallery embeddings must have shape [N, D] with N > 0, "
                     f"got {embeddings.shape}")
  if not np.all(np.isfinite(embeddings)):
    bad = int(np.flatnonzero(~np.all(np.isfinite(embeddings), axis=1))[0])
    raise ValueError(f"gallery row {bad} has non-finite values")
  if ids is None:
    ids = [str(i) for i in range(embeddings.shape[0])]
  ids = [str(i) for i in ids]
  if len(ids) != embeddings.shape[0]:
    raise ValueError(f"{len(ids)} ids for {embeddings.shape[0]} gallery rows")
  if len(set(ids)) != len(ids):
    seen = set()
    dup = next(i for i in ids if i in seen or seen.add(i))
    raise ValueError(f"product id {dup!r} appears more than once in the "
                     "gallery")
  if normalize:
    embeddings = l2_normalize(embeddings)
  return embeddings, ids


class SearchIndex(abc.ABC):
  """A gallery of product embeddings that answers top-k dot-product queries."""

  backend: str = ""

  def __init__(self, ids: Sequence[str], dimension: int, normalize: bool):
    self.ids = list(ids)
    self.dimension = int(dimension)
    # Normalise gallery and queries, so scores are cosines whatever the norms.
    self.normalize = bool(normalize)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def count(self) -> int:
    return len(self.ids)

  @abc.abstractmethod
  def search(self, queries, k: int = 10):
    """Top-k gallery rows per query.

    Args:
      queries: float32 [Q, D] (or [D]) L2-normalised query embeddings.
      k: neighbours per query; more than the gallery size gives the gallery
        size.

    Returns:
      (indices int64 [Q, k], scores float32 [Q, k]), by descending score, ties
      by ascending index.
    """

  def search_ids(self, queries, k: int = 10):
    """Like `search`, with product ids (None for empty slots) for indices."""
    indices, scores = self.search(queries, k)
    ids = [[self.ids[i] if i >= 0 else None for i in row] for row in indices]
    return ids, scores

  def settings_dict(self) -> dict[str, Any]:
    return {}

  def save(self, directory) -> str:
    """Writes the index to `directory` (created if needed); returns the path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._save_arrays(directory)
    with open(os.path.join(directory, IDS_FILE), "w") as f:
      json.dump(self.ids, f)
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION,
                backend=self.backend, dimension=self.dimension,
                count=self.count, ids_file=IDS_FILE,
                normalize=self.normalize, settings=self.settings_dict())
    # index.json last: its presence marks a complete index.
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    return directory

  @abc.abstractmethod
  def _save_arrays(self, directory: str) -> None:
    ...


# ----------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "count"))
def _exact_topk(queries, gallery, *, k: int, count: int):
  """Top-k over a chunked gallery [C, chunk, D] for one query batch [B, D]."""
  num_chunks, chunk, _ = gallery.shape
  batch = queries.shape[0]
  chunk_k = min(k, chunk)

  def step(carry, xs):
    best_scores, best_indices = carry
    block, offset = xs
    # HIGHEST: accelerators would otherwise multiply in bf16/tf32.
    scores = jnp.dot(queries, block.T, precision=jax.lax.Precision.HIGHEST)
    index = offset + jnp.arange(chunk, dtype=jnp.int32)
    scores = jnp.where(index[None, :] < count, scores, -jnp.inf)
    top_scores, top_pos = jax.lax.top_k(scores, chunk_k)
    # Earlier chunks (lower indices) come first: top_k keeps the lower
    # position on ties, so ties resolve to the lower gallery index.
    merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)
    merged_indices = jnp.concatenate([best_indices, index[top_pos]], axis=1)
    best_scores, pos = jax.lax.top_k(merged_scores, k)
    best_indices = jnp.take_along_axis(merged_indices, pos, axis=1)
    return (best_scores, best_indices), None

  init = (jnp.full((batch, k), -jnp.inf, jnp.float32),
          jnp.full((batch, k), -1, jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  (scores, indices), _ = jax.lax.scan(step, init, (gallery, offsets))
  return indices, scores


class ExactSearch(SearchIndex):
  """Brute-force top-k with JAX: the ground truth.

  Args:
    embeddings: float32 [N, D] gallery (L2-normalised for cosine similarity).
    ids: N unique product ids (default: "0".."N-1").
    query_batch_size: queries per jitted call (smaller batches are padded to a
      power of two, so few shapes compile).
    gallery_chunk_size: gallery rows scored at once; bounds memory at about
      query_batch_size x gallery_chunk_size floats.
    device: where the gallery lives (default: JAX's default device).
    normalize: L2-normalise the gallery and every query (cosine scores for
      embeddings of any norm).
  """

  backend = "exact"

  def __init__(self, embeddings, ids=None, *, query_batch_size: int = 256,
               gallery_chunk_size: int = 32768, device=None,
               normalize: bool = False):
    embeddings, ids = _check_gallery(embeddings, ids, normalize)
    super().__init__(ids, embeddings.shape[1], normalize)
    self.query_batch_size = int(query_batch_size)
    self.embeddings = embeddings
    n = embeddings.shape[0]
    num_chunks = -(-n // int(gallery_chunk_size))
    # Even chunks, rounded to 8 rows, keep padding small.
    chunk = -(-n // num_chunks)
    chunk = -(-chunk // 8) * 8
    padded = np.zeros((num_chunks * chunk, self.dimension), np.float32)
    padded[:n] = embeddings
    padded = padded.reshape(num_chunks, chunk, self.dimension)
    self._gallery = jax.device_put(padded, device)

  def search(self, queries, k: int = 10):
    queries = _check_queries(queries, self.dimension, self.normalize)
    k = max(1, min(int(k), self.count))
    num = queries.shape[0]
    if num == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    batch = min(self.query_batch_size, max(8, 1 << (num - 1).bit_length()))
    out_indices, out_scores = [], []
    for start in range(0, num, batch):
      block = queries[start:start + batch]
      valid = block.shape[0]
      if valid < batch:
        block = np.concatenate(
            [block, np.zeros((batch - valid, self.dimension), np.float32)])
      indices, scores = _exact_topk(block, self._gallery, k=k,
                                    count=self.count)
      out_indices.append(np.asarray(indices)[:valid])
      out_scores.append(np.asarray(scores)[:valid])
    return (np.concatenate(out_indices).astype(np.int64),
            np.concatenate(out_scores).astype(np.float32))

  def settings_dict(self):
    return dict(query_batch_size=self.query_batch_size)

  def _save_arrays(self, directory):
    np.save(os.path.join(directory, EMBEDDINGS_FILE), self.embeddings)

  @classmethod
  def load(cls, directory, **kwargs) -> "ExactSearch":
    meta, ids = _read_common(directory, "exact")
    path = os.path.join(os.fspath(directory), EMBEDDINGS_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{path} is missing: an exact index keeps its gallery embeddings "
          "there (float32 [count, dimension]); rebuild and save the index")
    try:
      embeddings = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path} is not a readable .npy file: {e}") from e
    expected = (meta["count"], meta["dimension"])
    if embeddings.shape != expected:
      raise ValueError(f"{path} has shape {embeddings.shape}, index.json says "
                       f"{expected}")
    kwargs.setdefault("query_batch_size",
                      meta.get("settings", {}).get("query_batch_size", 256))
    # Saved embeddings are already normalised; queries still need it.
    index = cls(embeddings, ids, **kwargs)
    index.normalize = bool(meta.get("normalize", False))
    return index


# ----------------------------------------------------------------------------
# ScaNN
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Building and loading either backend
# ----------------------------------------------------------------------------


def build_index(embeddings, ids=None, backend: str = "scann", settings=None,
                normalize: bool = True, **kwargs) -> SearchIndex:
  """An index of `backend` ("exact" or "scann") over the gallery.

  Args:
    embeddings: float32 [N, D] gallery.
    ids: N unique product ids.
    backend: "exact" or "scann".
    settings: ScaNN settings (`ScannSettings` or a mapping of its fields).
    normalize: L2-normalise gallery and queries, so scores are cosines.
    **kwargs: more `ExactSearch` arguments.

  Returns:
    The index; `save(directory)` writes it, `load_index` reads it back.
  """
  if backend == "exact":
    return ExactSearch(embeddings, ids, normalize=normalize, **kwargs)
  if backend == "scann":
    if kwargs:
      raise ValueError(f"unexpected arguments for ScaNN: {sorted(kwargs)}")
    return ScannSearch(embeddings, ids, settings=settings, normalize=normalize)
  raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def read_metadata(directory) -> dict[str, Any]:
  """The index.json of a saved index, checked for format and version."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"search index directory {directory} does not exist")
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} is missing: {directory} is not a saved search index (or it "
        "was not saved completely); build one and call .save(directory)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}); rebuild the index") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} index file")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {meta.get('format_version')}; "
                     f"this code reads version {FORMAT_VERSION}: rebuild it")
  for key in ("backend", "dimension", "count"):
    if key not in meta:
      raise ValueError(f"{path} lacks {key!r}")
  return meta


def _read_common(directory, backend):
  meta = read_metadata(directory)
  if meta["backend"] != backend:
    raise ValueError(f"{directory} holds a {meta['backend']!r} index, not "
                     f"{backend!r}; use load_index to open either")
  path = os.path.join(os.fspath(directory), meta.get("ids_file", IDS_FILE))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: it should hold the "
                            f"{meta['count']} product ids of the index")
  try:
    with open(path) as f:
      ids = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from e
  if not isinstance(ids, list) or len(ids) != meta["count"]:
    raise ValueError(f"{path} should be a list of {meta['count']} product ids")
  return meta, ids


def load_index(directory, **kwargs) -> SearchIndex:
  """Opens a saved index of either backend."""
  backend = read_metadata(directory)["backend"]
  if backend == "exact":
    return ExactSearch.load(directory, **kwargs)
  if backend == "scann":
    return ScannSearch.load(directory, **kwargs)
  raise ValueError(f"{directory}/{INDEX_FILE} names unknown backend "
                   f"{backend!r}; known: {BACKENDS}")
