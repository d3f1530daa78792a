"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

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


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  mask: jax.Array | None, scale: float) -> jax.Array:
  """Softmax attention with grouped key/value heads, softmax in fp32.

  Args:
    q: [B, Lq, Hq, D].
    k: [B, Lk, Hkv, D]; Hq is a multiple of Hkv.
    v: [B, Lk, Hkv, Dv].
    mask: boolean, broadcastable to [B, 1, Lq, Lk]; True where allowed.
    scale: multiplies the logits.

  Returns:
    [B, Lq, Hq, Dv] in q's dtype.
  """
  b, lq, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, lq, hkv, hq // hkv, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    # A finite floor keeps rows with no allowed key finite (no NaN).
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, lq, hq, v.shape[-1])
