"""Qwen3.5 vision-language model: image tokens fed to the hybrid decoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from procir_jax.models.qwen3_5 import rope
from procir_jax.models.qwen3_5.config import Qwen3_5Config
from procir_jax.models.qwen3_5.decoder import TextModel
from procir_jax.models.qwen3_5.layers import linear
from procir_jax.models.qwen3_5.options import ModelOptions
from procir_jax.models.qwen3_5.vision import VisionModel, make_layout


class Qwen3_5Model(nnx.Module):
  """The multimodal model, returning last hidden states (no LM head applied).

  Attributes follow the Hugging Face module names (`visual`,
  `language_model`, `lm_head`), so parameter paths read like the checkpoint's.
  """

  def __init__(self, config: Qwen3_5Config, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               options: ModelOptions | None = None):
    """Builds the model with freshly initialised parameters.

    Args:
      config: the model config.
      dtype: compute dtype of the matmuls (norms, softmax, RoPE and the
        delta-rule recurrence always run in fp32).
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness; defaults to nnx.Rngs(0).
      options: attention kernel, rematerialisation and layer scan; "auto"
        attention is resolved for the default backend's devices (resolve it
        yourself with `ModelOptions.for_platform` when compiling for others).
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    options = (options or ModelOptions()).for_platform(jax.devices()[0].platform)
    self.config = config
    self.dtype = dtype
    self.options = options
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, options=options)
    self.visual = VisionModel(config.vision, **kw)
    self.language_model = TextModel(config.text, **kw)
    if not config.tie_word_embeddings:
      self.lm_head = linear(config.text.hidden_size, config.text.vocab_size,
                            use_bias=False, std=config.text.initializer_range,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None,
               image_grid_thw=None, *,
               max_patches_per_image: int | None = None) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: [B, L] int token ids, right padded.
      attention_mask: [B, L], 1 for tokens and 0 for padding; None = no pad.
      pixel_values: [num_patches, patch_dim] for all images of the batch, in
        the order their `<|image_pad|>` runs appear (row by row).
      image_grid_thw: [num_images, 3] patch grid of each image. Best passed as
        a concrete (numpy) array, also under jit; see vision.make_layout.
      max_patches_per_image: optional static bound on patches per image, used
        only when `image_grid_thw` is traced.

    Returns:
      [B, L, hidden_size] last hidden states.
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask, jnp.int32)
    embeds = self.language_model.embed_tokens(input_ids)
    b, length = input_ids.shape
    if pixel_values is None:
      position_ids = rope.text_position_ids(b, length)
    else:
      if image_grid_thw is None:
        raise ValueError("pixel_values needs image_grid_thw (both come from "
                         "the image processor).")
      features = self.encode_images(pixel_values, image_grid_thw,
                                    max_patches_per_image=max_patches_per_image)
      embeds = self._merge_image_features(input_ids, embeds, features)
      position_ids = rope.multimodal_position_ids(
          input_ids, attention_mask, image_grid_thw,
          image_token_id=cfg.image_token_id,
          spatial_merge_size=cfg.vision.spatial_merge_size)
    return self.language_model(embeds, attention_mask, position_ids)

  def encode_images(self, pixel_values, image_grid_thw, *,
                    max_patches_per_image: int | None = None) -> jax.Array:
    """Vision tower: [num_patches, patch_dim] -> [num_image_tokens, hidden]."""
    pixel_values = jnp.asarray(pixel_values)
    patch_dim = self.config.vision.patch_dim
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
      raise ValueError(
          f"pixel_values must be [num_patches, {patch_dim}] as the image "
          f"processor returns it; got {tuple(pixel_values.shape)}.")
    layout = make_layout(image_grid_thw, pixel_values.shape[0],
                         self.config.vision, max_patches_per_image)
    return self.visual(pixel_values, layout)

  def _merge_image_features(self, input_ids, embeds, features):
    """Puts image features, in order, in place of the image pad tokens."""
    is_img = input_ids == self.config.image_token_id
    if not isinstance(input_ids, jax.core.Tracer):
      n_tokens = int(np.asarray(is_img).sum())
      if n_tokens != features.shape[0]:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id "
            f"{self.config.image_token_id}) but the images give "
            f"{features.shape[0]} features; each image of grid (t, h, w) needs "
            f"t*h*w/{self.config.vision.spatial_merge_size ** 2} tokens.")
    rank = jnp.cumsum(is_img.reshape(-1)) - 1
    rank = jnp.clip(rank, 0, features.shape[0] - 1).reshape(is_img.shape)
    picked = jnp.take(features, rank, axis=0).astype(embeds.dtype)
    return jnp.where(is_img[..., None], picked, embeds)

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits from hidden states, with the tied or untied head."""
    if self.config.tie_word_embeddings:
      table = self.language_model.embed_tokens.embedding[...]
      return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype),
                        table.astype(self.dtype))
    return self.lm_head(hidden)


def grow_vocab(model: Qwen3_5Model, num_new_tokens: int, *,
               init: str = "mean", rng: jax.Array | None = None) -> range:
  """Appends rows to the embedding (and an untied head) for new tokens.

  Used for special tokens such as `<emb_all>`. The model is changed in place
  and its config's vocab_size grows accordingly.

  Args:
    model: the model to grow.
    num_new_tokens: rows to append.
    init: "mean" starts new rows at the mean of the existing ones (a common
      choice that keeps new logits ordinary); "normal" draws them from
      N(0, initializer_range).
    rng: key for "normal".

  Returns:
    The range of the new token ids.
  """
  if num_new_tokens <= 0:
    raise ValueError("num_new_tokens must be positive.")
  cfg = model.config
  old = cfg.text.vocab_size

  def extend(table, axis):
    if init == "mean":
      rows = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True)
      shape = list(table.shape)
      shape[axis] = num_new_tokens
      rows = jnp.broadcast_to(rows, shape)
    elif init == "normal":
      if rng is None:
        raise ValueError("init='normal' needs rng.")
      shape = list(table.shape)
      shape[axis] = num_new_tokens
      rows = jax.random.normal(rng, shape) * cfg.text.initializer_range
    else:
      raise ValueError(f"init must be 'mean' or 'normal', got {init!r}.")
    new = jnp.concatenate([table, rows.astype(table.dtype)], axis=axis)
    sharding = getattr(table, "sharding", None)
    return jax.device_put(new, sharding) if sharding is not None else new

  emb = model.language_model.embed_tokens
  emb.embedding.set_value(extend(emb.embedding[...], 0))
  emb.num_embeddings = old + num_new_tokens
  if not cfg.tie_word_embeddings:
    model.lm_head.kernel.set_value(extend(model.lm_head.kernel[...], 1))
    model.lm_head.out_features = old + num_new_tokens
  text = dataclasses.replace(cfg.text, vocab_size=old + num_new_tokens)
  model.config = cfg.replace(text=text)
  model.language_model.config = text
  return range(old, old + num_new_tokens)
