"""The interface every search backend implements, and the on-disk format they share.

The format id stays `procir_jax.eval.search`, so indexes saved before the package
split still load."""

from __future__ import annotations

import abc
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

# The on-disk format (see the package docstring).
FORMAT = "procir_jax.eval.search"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
IDS_FILE = "ids.json"
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
BACKENDS = ("exact", "scann")
# Ids sampled to estimate their memory per vector.
_ID_SAMPLE = 10_000


def id_bytes_per_vector(ids: Sequence[str]) -> float:
  """Mean memory of a product id: its Python string plus the list's pointer."""
  if not ids:
    return 0.0
  step = max(1, len(ids) // _ID_SAMPLE)
  sample = ids[::step]
  return 8.0 + sum(sys.getsizeof(i) for i in sample) / len(sample)


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
  given = embeddings
  embeddings = np.asarray(embeddings, dtype=np.float32)
  # A copy made here (say from a float16 collection) is normalised in place: at
  # 1M x 1024 a second copy is 4 GB more at the peak of a shard's build.
  owned = embeddings is not given and not np.shares_memory(embeddings, given)
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
  if normalize and owned:
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True),
                             np.float32(1e-12))
  elif normalize:
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

  def metadata_dict(self) -> dict[str, Any]:
    """More top-level index.json entries (ScaNN: its tuning record)."""
    return {}

  @property
  def tuned_recall(self) -> float | None:
    """Recall@10 of exact search measured at build time (None: unknown)."""
    return None

  @abc.abstractmethod
  def memory_per_vector(self) -> dict[str, float]:
    """Estimated bytes of memory per gallery row, by part, once loaded."""

  @property
  def bytes_per_vector(self) -> float:
    """Estimated bytes of memory per gallery row (see memory_per_vector)."""
    return float(sum(self.memory_per_vector().values()))

  def describe(self) -> str:
    """One line on the index's kind, settings and measured recall."""
    return self.backend

  def save(self, directory) -> str:
    """Writes the index to `directory` (created if needed); returns the path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self._save_arrays(directory)
    with open(os.path.join(directory, IDS_FILE), "w") as f:
      json.dump(self.ids, f)
    self.save_settings(directory)
    return directory

  def save_settings(self, directory) -> None:
    """Rewrites only index.json (settings and tuning) of the index saved in
    `directory`: for search-time settings chosen after it was saved."""
    write_metadata(os.fspath(directory), backend=self.backend,
                   dimension=self.dimension, count=self.count,
                   normalize=self.normalize, settings=self.settings_dict(),
                   ids_file=IDS_FILE, **self.metadata_dict())

  @abc.abstractmethod
  def _save_arrays(self, directory: str) -> None:
    ...


def write_metadata(directory: str, *, backend: str, dimension: int, count: int,
                   normalize: bool, settings: dict[str, Any], **extra) -> None:
  """Writes index.json; last, as its presence marks a complete index."""
  meta = dict(format=FORMAT, format_version=FORMAT_VERSION, backend=backend,
              dimension=int(dimension), count=int(count), normalize=bool(normalize),
              settings=settings, **extra)
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(meta, f, indent=2)



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

