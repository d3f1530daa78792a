"""The hybrid text decoder: Gated DeltaNet and gated attention layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from procir_jax import sharding
from procir_jax.models.qwen3_5 import gated_delta
from procir_jax.models.qwen3_5 import rope
from procir_jax.models.qwen3_5.config import Qwen3_5TextConfig
from procir_jax.models.qwen3_5.layer_stack import pattern_period, run_layers
from procir_jax.models.qwen3_5.layers import (GatedRMSNorm, RMSNorm, activation,
                                              attention, linear)
from procir_jax.models.qwen3_5.options import ModelOptions


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + eps)


class CausalDepthwiseConv(nnx.Module):
  """Depthwise causal conv1d over the sequence, no bias. Kernel [K, C]."""

  def __init__(self, channels: int, kernel_size: int, *, dtype, param_dtype,
               std: float, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = nnx.Param(
        jax.random.normal(rngs.params(), (kernel_size, channels), param_dtype) *
        std)

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    ksize, length = w.shape[0], x.shape[1]
    xp = jnp.pad(x, [(0, 0), (ksize - 1, 0), (0, 0)])
    # K shifted multiply-adds: fuses into one elementwise kernel.
    out = xp[:, 0:length] * w[0]
    for i in range(1, ksize):
      out = out + xp[:, i:i + length] * w[i]
    return out


class GatedDeltaNet(nnx.Module):
  """Linear-attention token mixer built on the gated delta rule."""

  def __init__(self, cfg: Qwen3_5TextConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, chunk_size: int = 64,
               options: ModelOptions = ModelOptions()):
    self.options = options
    self.num_k_heads = cfg.linear_num_key_heads
    self.num_v_heads = cfg.linear_num_value_heads
    self.k_dim = cfg.linear_key_head_dim
    self.v_dim = cfg.linear_value_head_dim
    self.chunk_size = chunk_size
    self.dtype = dtype
    key_size = self.num_k_heads * self.k_dim
    value_size = self.num_v_heads * self.v_dim
    self.key_size, self.value_size = key_size, value_size
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
              std=cfg.initializer_range, rngs=rngs)
    h = cfg.hidden_size
    self.in_proj_qkv = linear(h, 2 * key_size + value_size, **kw)
    self.in_proj_z = linear(h, value_size, **kw)
    self.in_proj_b = linear(h, self.num_v_heads, **kw)
    self.in_proj_a = linear(h, self.num_v_heads, **kw)
    self.conv1d = CausalDepthwiseConv(
        2 * key_size + value_size, cfg.linear_conv_kernel_dim, dtype=dtype,
        param_dtype=param_dtype, std=cfg.initializer_range, rngs=rngs)
    self.dt_bias = nnx.Param(jnp.ones((self.num_v_heads,), param_dtype))
    a = jax.random.uniform(rngs.params(), (self.num_v_heads,), jnp.float32,
                           1.0, 16.0)
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))
    self.norm = GatedRMSNorm(self.v_dim, cfg.rms_norm_eps,
                             param_dtype=param_dtype)
    self.out_proj = linear(value_size, h, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x: [B, L, hidden]; mask: [B, L] (1 = token) or None."""
    b, length, _ = x.shape
    if mask is not None:
      # Padded states are zeroed so they never enter the conv or the state.
      x = jnp.where(mask[..., None].astype(bool), x, 0).astype(x.dtype)
    qkv = jax.nn.silu(self.conv1d(self.in_proj_qkv(x)))
    q, k, v = jnp.split(qkv, [self.key_size, 2 * self.key_size], axis=-1)
    q = q.reshape(b, length, self.num_k_heads, self.k_dim)
    k = k.reshape(b, length, self.num_k_heads, self.k_dim)
    v = v.reshape(b, length, self.num_v_heads, self.v_dim)
    z = self.in_proj_z(x).reshape(b, length, self.num_v_heads, self.v_dim)

    f32 = jnp.float32
    beta = jax.nn.sigmoid(self.in_proj_b(x).astype(f32))
    a = self.in_proj_a(x).astype(f32)
    g = -jnp.exp(self.A_log[...].astype(f32)) * jax.nn.softplus(
        a + self.dt_bias[...].astype(f32))
    # Normalised in fp32, then handed over in the compute dtype: the delta
    # rule accumulates in fp32 itself.
    q = (l2_normalize(q.astype(f32)) * (self.k_dim ** -0.5)).astype(self.dtype)
    k = l2_normalize(k.astype(f32)).astype(self.dtype)
    out = self._delta_rule(q, k, v, g, beta)
    out = self.norm(out.astype(self.dtype), z)
    return self.out_proj(out.reshape(b, length, self.value_size))

  def _delta_rule(self, q, k, v, g, beta):
    """The delta rule's output [B, L, Hv, Dv] by the implementation the options
    name (see options.DELTA_RULE)."""
    rule = self.options.delta_rule
    if rule == "recurrent":
      return gated_delta.recurrent_gated_delta_rule(q, k, v, g, beta)[0]
    if rule == "pallas":
      from procir_jax.models.qwen3_5.kernels import tpu_gated_delta  # pylint: disable=g-import-not-at-top
      if tpu_gated_delta.supported(q.shape, v.shape):
        def kernel(q, k, v, g, beta):
          return tpu_gated_delta.chunk_gated_delta_rule(
              q, k, v, g, beta, chunk_size=self.chunk_size,
              interpret=self.options.interpret_kernels)
        # XLA cannot partition a Pallas call: run it on each device's rows and heads.
        return sharding.per_shard(kernel, q, k, v, g, beta, head_dims=(2,) * 5)
    # fp32 compute keeps the products true fp32 (HIGHEST); under bf16
    # compute DEFAULT gives bf16 operands with fp32 accumulation.
    precision = (lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32
                 else lax.Precision.DEFAULT)
    return gated_delta.chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=self.chunk_size, precision=precision,
        unroll=self.options.unroll_loops)[0]


class Attention(nnx.Module):
  """Gated attention: sigmoid output gate, q/k RMSNorm, partial mRoPE, GQA."""

  def __init__(self, cfg: Qwen3_5TextConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.options = options
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    kw = dict(use_bias=cfg.attention_bias, dtype=dtype,
              param_dtype=param_dtype, std=cfg.initializer_range, rngs=rngs)
    h = cfg.hidden_size
    # Per head, the q projection emits [query (head_dim), gate (head_dim)].
    self.q_proj = linear(h, 2 * self.num_heads * self.head_dim, **kw)
    self.k_proj = linear(h, self.num_kv_heads * self.head_dim, **kw)
    self.v_proj = linear(h, self.num_kv_heads * self.head_dim, **kw)
    self.o_proj = linear(self.num_heads * self.head_dim, h, **kw)
    self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps,
                          param_dtype=param_dtype)
    self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps,
                          param_dtype=param_dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               kv_lengths: jax.Array | None) -> jax.Array:
    """x: [B, L, hidden]; cos/sin: [B, L, rot]; kv_lengths: [B] tokens per row
    (right padded) or None. Attention is causal."""
    b, length, _ = x.shape
    qg = self.q_proj(x).reshape(b, length, self.num_heads, 2 * self.head_dim)
    q, gate = jnp.split(qg, 2, axis=-1)
    gate = gate.reshape(b, length, self.num_heads * self.head_dim)
    k = self.k_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
    q = rope.apply_rotary(self.q_norm(q), cos, sin)
    k = rope.apply_rotary(self.k_norm(k), cos, sin)
    out = attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim), causal=True,
                    kv_lengths=kv_lengths, impl=self.options.attention,
                    interpret=self.options.interpret_kernels)
    out = out.reshape(b, length, -1) * jax.nn.sigmoid(
        gate.astype(jnp.float32)).astype(out.dtype)
    return self.o_proj(out)


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: Qwen3_5TextConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
              std=cfg.initializer_range, rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, **kw)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: token mixer, then MLP."""

  def __init__(self, cfg: Qwen3_5TextConfig, layer_type: str, *, dtype,
               param_dtype, rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.layer_type = layer_type
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if layer_type == "linear_attention":
      self.linear_attn = GatedDeltaNet(cfg, options=options, **kw)
    else:
      self.self_attn = Attention(cfg, options=options, **kw)
    self.mlp = MLP(cfg, **kw)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                   param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                            param_dtype=param_dtype)

  def __call__(self, x, *, cos, sin, kv_lengths, token_mask):
    h = self.input_layernorm(x)
    if self.layer_type == "linear_attention":
      h = self.linear_attn(h, token_mask)
    else:
      h = self.self_attn(h, cos, sin, kv_lengths)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
  """Token embedding, the decoder stack and the final norm."""

  def __init__(self, cfg: Qwen3_5TextConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
    self.config = cfg
    self.dtype = dtype
    self.options = options
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=jax.nn.initializers.normal(cfg.initializer_range),
        rngs=rngs)
    self.layers = nnx.List([
        DecoderLayer(cfg, t, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     options=options)
        for t in cfg.layer_types
    ])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                        param_dtype=param_dtype)

  def __call__(self, inputs_embeds: jax.Array,
               attention_mask: jax.Array | None,
               position_ids: jax.Array) -> jax.Array:
    """Runs the stack.

    Args:
      inputs_embeds: [B, L, hidden].
      attention_mask: [B, L] with 1 for tokens and 0 for padding (right
        padding: each row's tokens come first), or None.
      position_ids: [3, B, L] (t, h, w) positions.

    Returns:
      [B, L, hidden] last hidden states after the final norm.
    """
    cfg = self.config
    cos, sin = rope.text_rope_tables(position_ids, cfg.rotary_dim,
                                     cfg.rope_theta, cfg.mrope_section)
    # Right padding: a row's keys are its first kv_lengths tokens. Keeping at least
    # one key keeps all-padding rows finite.
    kv_lengths = None if attention_mask is None else jnp.maximum(
        jnp.sum(attention_mask, axis=-1, dtype=jnp.int32), 1)

    def call(layer, x):
      return layer(x, cos=cos, sin=sin, kv_lengths=kv_lengths,
                   token_mask=attention_mask)

    x = run_layers(list(self.layers), inputs_embeds.astype(self.dtype), call,
                   self.options, period=pattern_period(cfg.layer_types))
    return self.norm(x)
