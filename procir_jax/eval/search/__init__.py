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

The package: `base` (the interface and the on-disk format), `exact`, `scann_index`,
and here the two entry points, `build_index` and `load_index`.
"""

from __future__ import annotations

from procir_jax.eval.search.base import (BACKENDS, EMBEDDINGS_FILE, FORMAT,
                                         FORMAT_VERSION, IDS_FILE, INDEX_FILE,
                                         SCANN_DIR, SearchIndex, l2_normalize,
                                         read_metadata)
from procir_jax.eval.search.exact import ExactSearch
from procir_jax.eval.search.scann_index import (SCANN_MODES, SEARCH_TIME_SETTINGS,
                                                ScannSearch, ScannSettings,
                                                available_cores)

__all__ = ["BACKENDS", "EMBEDDINGS_FILE", "FORMAT", "FORMAT_VERSION", "IDS_FILE",
           "INDEX_FILE", "SCANN_DIR", "SCANN_MODES", "SEARCH_TIME_SETTINGS",
           "ExactSearch", "ScannSearch", "ScannSettings", "SearchIndex",
           "available_cores", "build_index", "l2_normalize", "load_index",
           "read_metadata"]


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



def load_index(directory, **kwargs) -> SearchIndex:
  """Opens a saved index of either backend."""
  backend = read_metadata(directory)["backend"]
  if backend == "exact":
    return ExactSearch.load(directory, **kwargs)
  if backend == "scann":
    return ScannSearch.load(directory, **kwargs)
  raise ValueError(f"{directory}/{INDEX_FILE} names unknown backend "
                   f"{backend!r}; known: {BACKENDS}")
