"""ProCIR: embeddings at `<emb_all>` and the training objectives.

* CIR retrieval: InfoNCE between query embeddings q and the target documents' d, with
  every other document of the *global* batch as a negative (under jit the similarity
  matrix spans all data-parallel shards).
* Caption-based alignment: the source embedding s (first turn) against the source
  product's caption embedding, and d against its own product's caption embedding.
* Chain-of-thought guidance: next-token loss on the reasoning tokens in the think
  blocks.
* SFT (its own mode): next-token loss on the long caption given the views.

Rows that are padding (`valid` false) or lack a caption take no part in any loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from procir_jax import batch_forward
from procir_jax.data.image_processing import PixelNorm
from procir_jax.models.qwen3_5 import Qwen3_5Model


@dataclasses.dataclass(frozen=True)
class LossConfig:
  retrieval: float = 1.0
  align_source: float = 1.0  # used when the data has captions (align on)
  align_document: float = 1.0
  cot: float = 1.0  # used when queries carry reasoning (cot on)
  temperature: float = 0.05
  learn_temperature: bool = True
  # The LM losses score every target token, projecting onto the vocabulary this many
  # tokens at a time (a static shape); chunks holding no target token are skipped.
  lm_chunk_tokens: int = 64


class ProCIR(nnx.Module):
  """The encoder and ProCIR's own parameter: the (learnable) temperature."""

  def __init__(self, model: Qwen3_5Model, temperature: float = 0.05,
               pixel_norm: PixelNorm = batch_forward.QWEN_PIXEL_NORM):
    """`pixel_norm`: the model directory's image normalisation, applied on the
    device to the pipeline's uint8 patches (ImageProcessor.pixel_norm)."""
    self.model = model
    self.pixel_norm = pixel_norm
    self.log_temperature = nnx.Param(jnp.asarray(np.log(temperature), jnp.float32))

  @property
  def temperature(self) -> jax.Array:
    return jnp.exp(self.log_temperature[...])

  def embed(self, part: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(unit embeddings [B, E, H] at every `<emb_all>`, last hidden states)."""
    return self.embed_together([part])[0]

  def embed_together(self, parts: list[Mapping[str, jax.Array]]
                     ) -> list[tuple[jax.Array, jax.Array]]:
    """`embed` of several batches in one model pass."""
    hiddens = batch_forward.encode_together(self.model, parts, self.pixel_norm)
    return [(batch_forward.gather_embeddings(h, p["emb_positions"]), h)
            for h, p in zip(hiddens, parts)]


def info_nce(queries: jax.Array, keys: jax.Array, temperature: jax.Array,
             row_valid: jax.Array, key_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of matching row i to key i among all valid keys; accuracy."""
  logits = (queries @ keys.T) / temperature
  logits = jnp.where(key_valid[None, :], logits, -1e9)
  labels = jnp.arange(queries.shape[0])
  log_p = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  weight = row_valid.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  accuracy = ((jnp.argmax(logits, -1) == labels) * weight).sum() / count
  return (nll * weight).sum() / count, accuracy


def lm_loss(model: Qwen3_5Model, hidden: jax.Array, input_ids: jax.Array,
            loss_mask: jax.Array, chunk_tokens: int) -> jax.Array:
  """Mean next-token loss over every token `loss_mask` marks.

  The marked positions are packed to the front of each row and projected onto the
  vocabulary `chunk_tokens` at a time, so the [B, chunk, vocab] logits are the
  largest array, whatever the target length. A chunk that holds no marked token in
  any row is skipped at run time, so the cost follows the longest target in the
  batch; each chunk's logits are recomputed in the backward pass, not stored.
  """
  target_mask = loss_mask[:, 1:]
  batch, length = target_mask.shape
  chunks = -(-length // chunk_tokens)
  positions = jax.vmap(
      lambda m: jnp.nonzero(m, size=chunks * chunk_tokens, fill_value=0)[0])(
          target_mask)
  counts = target_mask.sum(axis=1)
  scored = jnp.arange(chunks * chunk_tokens)[None, :] < counts[:, None]
  states = jnp.take_along_axis(hidden[:, :-1], positions[..., None], axis=1)
  targets = jnp.take_along_axis(input_ids[:, 1:], positions, axis=1)

  @jax.checkpoint
  def chunk_nll(states, targets, weight):
    logits = model.lm_logits(states).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None],
                               axis=-1)[..., 0]
    return (nll * weight).sum()

  def by_chunk(x):  # [B, chunks * chunk_tokens, ...] -> [chunks, B, chunk_tokens, ...]
    x = x.reshape((batch, chunks, chunk_tokens) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def body(total, chunk):
    states, targets, weight = chunk
    return total + jax.lax.cond(weight.any(), chunk_nll, lambda *_: jnp.float32(0),
                                states, targets, weight), None

  # One compiled chunk, run as often as needed; unrolled when the model's options
  # ask for a loop-free program (XLA's cost analysis counts a loop body once).
  unroll = chunks if getattr(model, "options", None) is not None and (
      model.options.unroll_loops) else 1
  total, _ = jax.lax.scan(body, jnp.float32(0),
                          (by_chunk(states), by_chunk(targets),
                           by_chunk(scored.astype(jnp.float32))), unroll=unroll)
  return total / jnp.maximum(counts.sum().astype(jnp.float32), 1.0)


def contrastive_losses(procir: ProCIR, batch: Mapping[str, Any], cfg: LossConfig,
                       cot: bool) -> dict[str, jax.Array]:
  """Every objective term of a contrastive batch (unweighted), plus metrics.

  `cot`: the queries carry reasoning (the data's chain-of-thought switch).
  """
  valid = batch["valid"]
  tau = procir.temperature if cfg.learn_temperature else jnp.float32(cfg.temperature)
  # Queries and documents both carry images: one model pass for the two.
  (query_emb, query_hidden), (doc_emb, _) = procir.embed_together(
      [batch["query"], batch["document"]])
  q, d = query_emb[:, -1], doc_emb[:, 0]
  out = {"temperature": tau}
  out["retrieval"], out["retrieval_accuracy"] = info_nce(q, d, tau, valid, valid)
  if "source_caption" in batch:
    s = query_emb[:, 0]
    (cs, _), (ct, _) = procir.embed_together(
        [batch["source_caption"], batch["target_caption"]])
    cs, ct = cs[:, 0], ct[:, 0]
    has_s = valid & batch["has_source_caption"]
    has_t = valid & batch["has_target_caption"]
    out["align_source"], _ = info_nce(s, cs, tau, has_s, has_s)
    out["align_document"], _ = info_nce(d, ct, tau, has_t, has_t)
  if cot:
    out["cot"] = lm_loss(procir.model, query_hidden, batch["query"]["input_ids"],
                         batch["query"]["loss_mask"] & valid[:, None],
                         cfg.lm_chunk_tokens)
  return out


def sft_losses(procir: ProCIR, batch: Mapping[str, Any], cfg: LossConfig
               ) -> dict[str, jax.Array]:
  part = batch["sft"]
  hidden = batch_forward.encode(procir.model, part, procir.pixel_norm)
  return {"sft": lm_loss(procir.model, hidden, part["input_ids"],
                         part["loss_mask"] & batch["valid"][:, None],
                         cfg.lm_chunk_tokens)}


LOSS_TERMS = ("retrieval", "align_source", "align_document", "cot", "sft")


def total_loss(terms: Mapping[str, jax.Array], cfg: LossConfig) -> jax.Array:
  weights = {"retrieval": cfg.retrieval, "align_source": cfg.align_source,
             "align_document": cfg.align_document, "cot": cfg.cot, "sft": 1.0}
  return sum(weights[k] * terms[k] for k in LOSS_TERMS if k in terms)
