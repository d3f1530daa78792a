"""Encoding the evaluation galleries and queries with a (sharded) ProCIR model.

Per source dataset, as the FashionMV release's evaluation builds them: the gallery is
every source and target product of every row of that dataset's validation triplets
whose folder holds images (is in `fashionmv/products`), encoded as a product
document. That includes the products of rows that are no query because the other
product has no images, so a missing image folder leaves one product out of the
gallery, not its partner too. The queries are the rows whose two products have images,
as two-stage dialogues (embedding q, last `<emb_all>`; s, first). Rows are named
through the record index that every batch carries, so all hosts assemble the same
arrays.

One difference from the release: galleries are keyed by (source, product id), so an
id named by two datasets sits in both galleries; the release keeps it only in the
gallery of the first dataset whose row names it (a warning names such ids).
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import logging
from flax import nnx
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from procir_jax.data import fashionmv, pipeline
from procir_jax.eval import recall
from procir_jax import sharding
from tfds_fashionmv import release

SOURCES = ("deepfashion", "f200k", "fashiongen")


class Encoder:
  """Runs `ProCIR.embed` over pipeline batches on the mesh; returns host arrays."""

  def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    replicated = NamedSharding(mesh, P())

    def embed(params, part):
      with sharding.mesh_context(mesh):
        emb, _ = nnx.merge(graphdef, params).embed(part)
      return jax.lax.with_sharding_constraint(emb, replicated)

    self._embed = jax.jit(embed)
    by_row = sharding.batch_sharding(mesh)(3)

    def embed_rows(params, part):
      with sharding.mesh_context(mesh):
        emb, _ = nnx.merge(graphdef, params).embed(part)
      # Left split by row, so each process can take its own rows without any
      # process receiving the others' (catalogue-scale embedding, `embed_local`).
      return jax.lax.with_sharding_constraint(emb, by_row)

    self._embed_rows = jax.jit(embed_rows)

  def embed(self, params, part) -> np.ndarray:
    """[B, E, H] unit embeddings of one batch (global arrays or host arrays)."""
    return np.asarray(self._embed(params, part))

  def embed_local(self, params, batch) -> tuple[np.ndarray, np.ndarray]:
    """(record index [b], embeddings [b, E, H]) of this process's own rows.

    `batch` is the process-local batch of a "gallery" or "eval_query" loader; every
    process calls this together (one global step). Only the few bytes of shape
    agreement travel between processes: no process receives another's embeddings.
    Padding rows have index -1.
    """
    name = next(k for k in ("document", "query") if k in batch)
    arrays = pipeline.to_global({name: batch[name], "index": batch["index"]},
                                sharding.batch_sharding(self.mesh))
    emb = self._embed_rows(params, arrays[name])
    # Both are split alike along the batch axis, so the shards pair up by offset.
    return _local_rows(arrays["index"]), _local_rows(emb)

  def lower(self, params, part) -> jax.stages.Lowered:
    """The encode step lowered for (abstract) parameters and a batch, to compile
    ahead of time (see Trainer.lower)."""
    return self._embed.trace(params, part).lower()

  def run(self, params, loader, what: str, total: int
          ) -> tuple[dict[int, np.ndarray], list[str]]:
    """{record index: [E, H] embeddings} for every valid row, and skip messages."""
    sharding_for = sharding.batch_sharding(self.mesh)
    out, skipped, start, done = {}, [], time.perf_counter(), 0
    for batch in loader:
      name = next(k for k in ("document", "query") if k in batch)
      arrays = pipeline.to_global({name: batch[name], "index": batch["index"]},
                                  sharding_for)
      emb = self.embed(params, arrays[name])
      index = np.asarray(multihost_utils.process_allgather(
          batch["index"], tiled=True)) if jax.process_count() > 1 else batch["index"]
      for row, i in enumerate(index):
        if i >= 0:
          out[int(i)] = emb[row]
      skipped.extend(batch["meta"]["skipped"])
      done = len(out)
      elapsed = time.perf_counter() - start
      rate = done / max(elapsed, 1e-9)
      logging.info("Encoding %s: %d/%d (%.1f/s, ETA %.0fs)", what, done, total, rate,
                   (total - done) / max(rate, 1e-9))
    return out, skipped


def _local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-split global array that this process holds, in order
  (copies along unsplit mesh axes counted once)."""
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def evaluation_records(data_cfg: pipeline.DataConfig, split: str = "validation",
                       sources: Sequence[str] = SOURCES):
  """Per source: (gallery product keys, their records, joined query triplets).

  The gallery holds every product with images of every row of the source, the
  query rows' and the unusable rows' alike; the queries are the usable rows.
  """
  products = fashionmv.Products(data_cfg.data_dir, split)
  triplets = fashionmv.Triplets(data_cfg.data_dir, split)
  gallery: dict[str, set[fashionmv.ProductKey]] = {s: set() for s in sources}
  for i in range(len(triplets)):
    t = triplets[i]
    if t.source in gallery:
      gallery[t.source].update(
          (t.source, pid) for pid, has in ((t.source_id, t.source_has_images),
                                           (t.target_id, t.target_has_images))
          if has)
  _warn_shared_ids(gallery)
  out = {}
  for source in sources:
    # Also checks every row's image flags against `products`, so the gallery above
    # holds only products that are there.
    joined = fashionmv.JoinedTriplets(products, triplets, [source])
    keys = sorted(gallery[source])
    out[source] = (keys, products.select(keys), joined)
  return out


def _warn_shared_ids(gallery: dict[str, set[fashionmv.ProductKey]]) -> None:
  seen: dict[str, str] = {}
  shared = []
  for source, keys in gallery.items():
    for _, pid in sorted(keys):
      if pid in seen:
        shared.append(f"{pid!r} ({seen[pid]}, {source})")
      seen.setdefault(pid, source)
  if shared:
    logging.warning(
        "%d product ids are in the galleries of two sources, e.g. %s. Each source "
        "keeps its own product here; the release's evaluation keeps such an id only "
        "in the gallery of the first dataset whose row names it, so recall on the "
        "others may differ from its numbers.", len(shared), ", ".join(shared[:3]))


def _nothing_to_evaluate(source: str, split: str, gallery: int, queries: int) -> str:
  folder = release.image_folder(source, split)
  return (f"the {split} build holds {gallery} gallery products and {queries} usable "
          f"queries of {source}: was images/{folder} absent or empty when the TFDS "
          f"data was built? The build report lists the products without images and "
          f"the triplets they make unusable.")


def missing_sources(data_cfg: pipeline.DataConfig, split: str = "validation",
                    sources: Sequence[str] = SOURCES) -> dict[str, str]:
  """Sources the build holds nothing to evaluate for, each with the reason.

  A release may hold only some sources' images (its README has users prepare only the
  datasets they evaluate); the TFDS build then drops the other sources' products.
  """
  return {source: _nothing_to_evaluate(source, split, len(keys), len(joined))
          for source, (keys, _, joined) in evaluation_records(data_cfg, split,
                                                               sources).items()
          if not keys or not len(joined)}


def encode_datasets(params, graphdef, mesh, data_cfg: pipeline.DataConfig,
                    split: str = "validation", sources: Sequence[str] = SOURCES,
                    encoder: Encoder | None = None
                    ) -> list[recall.DatasetEmbeddings]:
  """Embeddings of each source's gallery and queries; a source the build holds nothing
  of is logged and returned empty, and the evaluation lists it as left out."""
  encoder = encoder or Encoder(graphdef, mesh)
  results = []
  for source, (keys, gallery_records, joined) in evaluation_records(
      data_cfg, split, sources).items():
    if not keys or not len(joined):
      logging.warning("Leaving %s out of the evaluation: %s", source,
                      _nothing_to_evaluate(source, split, len(keys), len(joined)))
      empty = np.zeros((0, 0), np.float32)
      results.append(recall.DatasetEmbeddings(
          dataset=source, gallery_ids=[], gallery=empty, source_ids=[], target_ids=[],
          q=empty, s=empty))
      continue
    docs, skipped = encoder.run(
        params, pipeline.make_loader("gallery", data_cfg, gallery_records, train=False),
        f"{source} gallery", len(keys))
    queries, skipped_q = encoder.run(
        params, pipeline.make_loader("eval_query", data_cfg, joined, train=False),
        f"{source} queries", len(joined))
    order = sorted(docs)
    rows = sorted(queries)
    trip = [joined[i].triplet for i in rows]
    dim = next(iter(docs.values())).shape[-1] if docs else 0
    results.append(recall.DatasetEmbeddings(
        dataset=source,
        gallery_ids=[keys[i][1] for i in order],
        gallery=(np.stack([docs[i][0] for i in order]) if order
                 else np.zeros((0, dim), np.float32)),
        source_ids=[t.source_id for t in trip],
        target_ids=[t.target_id for t in trip],
        texts=[t.texts[data_cfg.options.query_text] for t in trip],
        q=np.stack([queries[i][-1] for i in rows]),
        s=np.stack([queries[i][0] for i in rows]),
        skipped=skipped + skipped_q))
  return results


def embed_query(encoder: Encoder, params, builder, images: Sequence[np.ndarray],
                text: str, buckets) -> np.ndarray:
  """q for one query given as views (RGB uint8 arrays) and a modification text."""
  views = list(images)[:builder.options.max_views]
  processed = builder.processor.patchify(views)
  counts = [builder.processor.num_image_tokens(*im.shape[:2]) for im in views]
  tokens = builder.dialogues.two_stage_query(counts, text)
  sequence = builder.sequence(tokens, processed.patches, processed.image_grid_thw)
  buckets.check(sequence, "the query")
  part = buckets.collate([sequence], builder.dialogues.ids.pad, 2, True)
  return encoder.embed(params, jax.device_put(part, NamedSharding(encoder.mesh, P()))
                       )[0, -1]
