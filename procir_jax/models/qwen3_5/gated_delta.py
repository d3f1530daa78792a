"""The gated delta rule, chunked (fast) and per-token recurrent (reference).

Per token t, with state S (key_dim x value_dim), decay g_t <= 0 in log space
and write strength beta_t:

  S   <- exp(g_t) * S
  u_t  = beta_t * (v_t - S^T k_t)        # the delta: what S does not predict
  S   <- S + k_t u_t^T
  o_t  = S^T q_t

q and k arrive already L2-normalised and q already scaled. Both forms run in
fp32 whatever the input dtype, and return fp32.

Chunked form. Inside a chunk, with gamma_t the inclusive cumulative sum of g
and S0 the state at the chunk start, unrolling the recurrence gives

  (I + M) U = beta * V - (beta * exp(gamma) * K) S0,
      M[t, s] = beta_t exp(gamma_t - gamma_s) k_t.k_s   for s < t,

so U = Wv - Wk S0 where Wv, Wk = (I + M)^-1 [beta * V, beta * exp(gamma) * K]
do not depend on S0 and are computed for all chunks at once. The inverse of
the unit lower triangular I + M is built by doubling the size of its diagonal
blocks, inv([[A, 0], [B, D]]) = [[inv(A), 0], [-inv(D) B inv(A), inv(D)]]:
batched matmuls only, rather than many small triangular solves, and stable
because every product is of blocks of the true inverse. Then

  O  = (exp(gamma) * Q) S0 + tril(Q K^T * exp(gamma_t - gamma_s)) U
  S1 = exp(gamma_C) S0 + (exp(gamma_C - gamma) * K)^T U.

Only U, O and S1 depend on S0; they run in a `lax.scan` over chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _expand_heads(q, k, num_v_heads):
  """Repeats key heads so each serves its group of consecutive value heads."""
  rep = num_v_heads // q.shape[2]
  if rep > 1:
    q = jnp.repeat(q, rep, axis=2)
    k = jnp.repeat(k, rep, axis=2)
  return q, k


def unit_lower_inverse(m: jax.Array, precision=None) -> jax.Array:
  """Inverse of I + m for strictly lower triangular m [..., C, C]."""
  c = m.shape[-1]
  p = 1 << (c - 1).bit_length()
  if p != c:  # Identity padding leaves the leading block's inverse unchanged.
    m = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, p - c), (0, p - c)])
  batch = m.shape[:-2]
  t = jnp.ones(batch + (p, 1, 1), m.dtype)  # inverses of the 1x1 blocks
  s = 1
  while s < p:
    grid = m.reshape(batch + (p // s, s, p // s, s))
    # Block (2i + 1, 2i) of the s-block grid: the B of the i-th pair.
    below = jnp.diagonal(grid, offset=-1, axis1=-4, axis2=-2)
    below = jnp.moveaxis(below, -1, -3)[..., ::2, :, :]
    t11, t22 = t[..., 0::2, :, :], t[..., 1::2, :, :]
    t21 = -jnp.einsum("...ij,...jk,...kl->...il", t22, below, t11,
                      precision=precision)
    t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], -1),
                         jnp.concatenate([t21, t22], -1)], -2)
    s *= 2
  return t[..., 0, :c, :c]


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None):
  """Reference: one recurrence step per token.

  Args:
    q: [B, L, Hk, Dk] normalised and scaled queries.
    k: [B, L, Hk, Dk] normalised keys.
    v: [B, L, Hv, Dv] values; Hv is a multiple of Hk.
    g: [B, L, Hv] log decay (<= 0).
    beta: [B, L, Hv] write strength in (0, 1).
    initial_state: optional [B, Hv, Dk, Dv].

  Returns:
    (output [B, L, Hv, Dv] fp32, final state [B, Hv, Dk, Dv] fp32).
  """
  q, k = _expand_heads(q, k, v.shape[2])
  q, k, v, g, beta = (x.astype(_F32) for x in (q, k, v, g, beta))
  b, _, h, dk = k.shape
  dv = v.shape[-1]
  state = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None
           else initial_state.astype(_F32))
  hp = lax.Precision.HIGHEST

  def step(s, xs):
    q_t, k_t, v_t, g_t, b_t = xs
    s = s * jnp.exp(g_t)[..., None, None]
    pred = jnp.einsum("bhkv,bhk->bhv", s, k_t, precision=hp)
    u = b_t[..., None] * (v_t - pred)
    s = s + k_t[..., :, None] * u[..., None, :]
    o = jnp.einsum("bhkv,bhk->bhv", s, q_t, precision=hp)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
  state, out = lax.scan(step, state, xs)
  return jnp.moveaxis(out, 0, 1), state


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, *,
                           chunk_size: int = 64,
                           precision=lax.Precision.HIGHEST):
  """Chunked gated delta rule; same arguments and results as the recurrent one.

  Any sequence length works: the tail is padded with beta = 0 and g = 0, which
  leaves the state untouched.

  Args:
    q: [B, L, Hk, Dk] normalised and scaled queries.
    k: [B, L, Hk, Dk] normalised keys.
    v: [B, L, Hv, Dv] values.
    g: [B, L, Hv] log decay (<= 0).
    beta: [B, L, Hv] write strength.
    initial_state: optional [B, Hv, Dk, Dv].
    chunk_size: tokens per chunk.
    precision: matmul precision for the fp32 products; HIGHEST keeps them
      true fp32 on accelerators that would otherwise round to TF32/bf16.

  Returns:
    (output [B, L, Hv, Dv] fp32, final state [B, Hv, Dk, Dv] fp32).
  """
  q, k = _expand_heads(q, k, v.shape[2])
  q, k, v, g, beta = (x.astype(_F32) for x in (q, k, v, g, beta))
  b, length, h, dk = k.shape
  dv = v.shape[-1]
  c = chunk_size
  pad = (-length) % c
  n = (length + pad) // c

  def to_chunks(x):  # [B, L, H, ...] -> [B, H, n, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, c) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
  gamma = jnp.cumsum(g, axis=-1)  # [B, H, n, C]
  lower = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  # exp of a masked difference: upper entries would overflow, so zero them
  # before the exp rather than after.
  diff = gamma[..., :, None] - gamma[..., None, :]
  decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)

  ein = lambda s, *xs: jnp.einsum(s, *xs, precision=precision)
  kk = ein("...td,...sd->...ts", k, k)
  m = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
  rhs = jnp.concatenate(
      [beta[..., None] * v, (beta * jnp.exp(gamma))[..., None] * k], axis=-1)
  sol = ein("...ts,...sd->...td", unit_lower_inverse(m, precision), rhs)
  w_v, w_k = sol[..., :dv], sol[..., dv:]
  attn = ein("...td,...sd->...ts", q, k) * decay
  q_dec = q * jnp.exp(gamma)[..., None]
  k_dec = k * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  chunk_decay = jnp.exp(gamma[..., -1])[..., None, None]  # [B, H, n, 1, 1]

  state = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None
           else initial_state.astype(_F32))

  def step(s, xs):
    w_v_i, w_k_i, attn_i, q_i, k_i, d_i = xs
    u = w_v_i - ein("...ck,...kv->...cv", w_k_i, s)
    o = ein("...ck,...kv->...cv", q_i, s) + ein("...ts,...sv->...tv", attn_i, u)
    s = s * d_i + ein("...ck,...cv->...kv", k_i, u)
    return s, o

  xs = tuple(jnp.moveaxis(x, 2, 0)
             for x in (w_v, w_k, attn, q_dec, k_dec, chunk_decay))
  state, out = lax.scan(step, state, xs)  # out: [n, B, H, C, Dv]
  out = out.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, dv)
  return out[:, :length], state
