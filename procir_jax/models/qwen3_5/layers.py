"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from procir_jax import sharding

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"Unsupported activation {name!r}; known: "
                     f"{sorted(ACTIVATIONS)}.") from None


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


def linear(in_features: int, out_features: int, *, use_bias: bool, dtype,
           param_dtype, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with a [in, out] kernel, as the loader expects."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, kernel_init=normal_init(std),
                    rngs=rngs)


class RMSNorm(nnx.Module):
  """Zero-centred RMSNorm, x / rms(x) * (1 + w), computed in fp32."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
  """RMSNorm with the weight applied directly (no 1 +), times SiLU(gate)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    y = self.scale[...].astype(jnp.float32) * y
    return (y * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, computed in fp32."""

  def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
        jnp.float32)
    return y.astype(x.dtype)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                        causal: bool = False, kv_lengths: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
  """Softmax attention written out: [B, H, Lq, Lk] scores and mask, softmax in fp32.

  The readable standard the fused implementations are held to; it materialises the
  scores, so the fast paths never use it. Arguments as `attention`.
  """
  b, lq, hq, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  qg = q.reshape(b, lq, hkv, hq // hkv, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k,
                      preferred_element_type=jnp.float32) * scale
  mask = jnp.ones((1, lq, lk), bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((lq, lk), bool))[None]
  if kv_lengths is not None:
    mask = mask & (jnp.arange(lk)[None, None, :] <
                   jnp.asarray(kv_lengths)[:, None, None])
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  # A finite floor keeps rows with no allowed key finite (no NaN).
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, lq, hq, v.shape[-1])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              causal: bool = False, kv_lengths: jax.Array | None = None,
              segment_ids: jax.Array | None = None,
              impl: str = "reference", interpret: bool = False) -> jax.Array:
  """Softmax attention with grouped key/value heads and fp32 softmax.

  Args:
    q: [B, Lq, Hq, D].
    k: [B, Lk, Hkv, D]; Hq is a multiple of Hkv (query head h reads kv head
      h // (Hq // Hkv)).
    v: [B, Lk, Hkv, Dv].
    scale: multiplies the logits.
    causal: query i sees keys j <= i.
    kv_lengths: optional [B]; keys at positions >= kv_lengths[b] are padding.
    segment_ids: optional [B, L]; tokens attend only within their segment. Only
      the reference implementation takes it (the model needs it only for a traced
      image grid without a size bound), so it always runs there.
    impl: "reference", "xla" (jax.nn.dot_product_attention, cuDNN on GPU where
      it applies) or "flash" (the Pallas TPU kernel); see options.ATTENTION.
    interpret: run the Pallas kernel in interpret mode (CPU tests of "flash").

  Returns:
    [B, Lq, Hq, Dv] in q's dtype. Rows whose keys are all padding come out
    finite (and are meaningless).
  """
  if segment_ids is not None or impl == "reference":
    return reference_attention(q, k, v, scale=scale, causal=causal,
                               kv_lengths=kv_lengths, segment_ids=segment_ids)
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  if impl == "xla":
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, key_value_seq_lengths=kv_lengths)
  if impl == "flash":
    from procir_jax.models.qwen3_5.kernels import tpu_flash_attention  # pylint: disable=g-import-not-at-top
    if kv_lengths is None:
      kv_lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)

    def kernel(q, k, v, kv_lengths):
      return tpu_flash_attention.flash_attention(
          q, k, v, scale=scale, causal=causal, kv_lengths=kv_lengths,
          interpret=interpret)

    # XLA cannot partition a Pallas call: run it on each device's rows and heads.
    return sharding.per_shard(kernel, q, k, v, kv_lengths, head_dims=(2, 2, 2, None))
  raise ValueError(f"Unknown attention implementation {impl!r}; resolve 'auto' "
                   "with ModelOptions.for_platform first.")
