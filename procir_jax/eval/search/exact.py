"""Exact search: a jitted, batched matmul and top-k in JAX, the ground truth."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from procir_jax.eval.search.base import (EMBEDDINGS_FILE, SearchIndex, _check_gallery,
                                         _check_queries, _read_common,
                                         id_bytes_per_vector)


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

  @property
  def tuned_recall(self) -> float:
    return 1.0  # Exact search is the reference.

  def memory_per_vector(self) -> dict[str, float]:
    # The gallery twice: on the host (what `save` writes) and, padded, on
    # the device JAX searches with (the same RAM when that is the CPU).
    rows = self._gallery.shape[0] * self._gallery.shape[1]
    return {"float32 rows": 4.0 * self.dimension,
            "float32 rows on device": (4.0 * self.dimension * rows
                                       / max(1, self.count)),
            "id": id_bytes_per_vector(self.ids)}

  def describe(self) -> str:
    return "exact (JAX matmul + top-k): recall@10 of exact 1.0 by definition"

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



