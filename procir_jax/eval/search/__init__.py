"""Nearest-neighbour search over unit embeddings (cosine = dot product).

Two backends answer the same question, "the k gallery rows with the highest dot
product with each query":

- `ExactSearch`: a jitted, batched matmul + top-k in JAX. Queries go in fixed
  size batches and the gallery in fixed size chunks, so memory stays bounded
  (1M x 1024 galleries fit) and each shape compiles once. It is the ground
  truth and runs on whatever device JAX uses (CPU, GPU or TPU).
- `ScannSearch`: ScaNN through `scann_ops_pybind` (no TensorFlow ops),
  configured from the gallery size by `ScannSettings`: brute force for small
  galleries, asymmetric hashing (AH) with int8 reordering for medium ones, and
  tree partitioning (about 2 sqrt(n) leaves) + AH + reordering for large ones.
  The leaves searched and candidates reordered are tuned at build time to
  reach a target recall@10 of exact search (0.95 by default) on held-out
  queries (`tuning`); `index.tuned_recall` is what was reached.
- `ShardedIndex`: shards (each exact or ScaNN, over a disjoint part of the
  catalogue) searched together and merged, for catalogues that are built a
  part at a time: in the catalogue's order (`build_sharded_index`), or
  partitioned by similarity so that a query searches only the shards nearest
  it (`build_partitioned_index`).

Both return `(indices, scores)`: int64 `[Q, k]` rows into the gallery and
float32 `[Q, k]` dot products, sorted by descending score with ties broken by
the lower gallery index. Slots with no result (only possible with ScaNN when a
partitioned search finds fewer than k candidates) hold index -1 and score -inf.

An index is saved to a directory that holds only relative paths, so it can be
moved or copied:

  index.json        format, format_version, backend, dimension, count,
                    normalize, settings, (scann) tuning
  ids.json          the product ids, one per gallery row
  embeddings.npy    (exact) the gallery, float32 [count, dimension]
  scann/            (scann) ScaNN's own serialized assets

A sharded index is a directory of such directories plus a manifest (see
`sharded`).

  index = build_index(gallery, product_ids, backend="scann")  # normalises
  index.save("workdir/index")
  index = load_index("workdir/index")
  ids, scores = index.search_ids(queries, k=10)

The package: `base` (the interface and the on-disk format), `exact`, `scann_index`,
`tuning`, `sharded` (the index), `partition` (routing rows to shards by
similarity), `sharded_build`, and here the entry points, `build_index`,
`build_sharded_index`, `build_partitioned_index` and `load_index`.
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
from procir_jax.eval.search.sharded import SHARDED_BACKEND, ShardedIndex
from procir_jax.eval.search import partition
from procir_jax.eval.search.sharded_build import (build_partitioned_index,
                                                  build_sharded_index,
                                                  untuned_shard_settings)
from procir_jax.eval.search.tuning import Tuning

__all__ = ["BACKENDS", "EMBEDDINGS_FILE", "FORMAT", "FORMAT_VERSION", "IDS_FILE",
           "INDEX_FILE", "SCANN_DIR", "SCANN_MODES", "SEARCH_TIME_SETTINGS",
           "SHARDED_BACKEND", "ExactSearch", "ScannSearch", "ScannSettings",
           "SearchIndex", "ShardedIndex", "Tuning", "available_cores",
           "build_index", "build_partitioned_index", "build_sharded_index",
           "partition", "untuned_shard_settings", "l2_normalize", "load_index",
           "read_metadata"]


def build_index(embeddings, ids=None, backend: str = "scann", settings=None,
                normalize: bool = True, tuning_queries=None, shard_rows: int = 0,
                **kwargs) -> SearchIndex:
  """An index of `backend` ("exact" or "scann") over the gallery.

  Args:
    embeddings: float32 [N, D] gallery.
    ids: N unique product ids.
    backend: "exact" or "scann".
    settings: ScaNN settings (`ScannSettings` or a mapping of its fields).
    normalize: L2-normalise gallery and queries, so scores are cosines.
    tuning_queries: [Q, D] queries ScaNN tunes its search on (say the
      evaluation's own); None makes them from the gallery. Exact search
      ignores them.
    shard_rows: when > 0 and below N, a `ShardedIndex` of consecutive parts of
      this many rows (the last may be shorter), each tuned on its own.
    **kwargs: more `ExactSearch` arguments.

  Returns:
    The index; `save(directory)` writes it, `load_index` reads it back.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if shard_rows < 0:
    raise ValueError(f"shard_rows must be >= 0 (0: one index), got {shard_rows}")
  num = len(embeddings)
  if shard_rows and num > shard_rows:
    ids = [str(i) for i in range(num)] if ids is None else list(ids)
    if len(ids) != num:
      raise ValueError(f"{len(ids)} ids for {num} gallery rows")
    parts = ((embeddings[i:i + shard_rows], ids[i:i + shard_rows])
             for i in range(0, num, shard_rows))
    return build_sharded_index(parts, backend=backend, settings=settings,
                               normalize=normalize,
                               tuning_queries=tuning_queries, **kwargs)
  if backend == "exact":
    return ExactSearch(embeddings, ids, normalize=normalize, **kwargs)
  if kwargs:
    raise ValueError(f"unexpected arguments for ScaNN: {sorted(kwargs)}")
  return ScannSearch(embeddings, ids, settings=settings, normalize=normalize,
                     tuning_queries=tuning_queries)



def load_index(directory, **kwargs) -> SearchIndex:
  """Opens a saved index: exact, ScaNN or sharded."""
  backend = read_metadata(directory)["backend"]
  if backend == "exact":
    return ExactSearch.load(directory, **kwargs)
  if backend == "scann":
    return ScannSearch.load(directory, **kwargs)
  if backend == SHARDED_BACKEND:
    return ShardedIndex.load(directory, **kwargs)
  raise ValueError(f"{directory}/{INDEX_FILE} names unknown backend "
                   f"{backend!r}; known: {BACKENDS + (SHARDED_BACKEND,)}")
