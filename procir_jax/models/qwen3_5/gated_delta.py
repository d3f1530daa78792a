"""The gated delta rule, chunked (fast) and per-token recurrent (reference).

Per token t, with state S (key_dim x value_dim), decay g_t <= 0 in log space
and write strength beta_t:

  S   <- exp(g_t) * S
  u_t  = beta_t * (v_t - S^T k_t)        # the delta: what S does not predict
  S   <- S + k_t u_t^T
  o_t  = S^T q_t

q and k arrive already L2-normalised and q already scaled. The recurrent
reference runs in fp32 whatever the input dtype. The chunked form takes q, k,
v in the compute dtype (fp32 or bf16) and g, beta in fp32; it accumulates in
fp32 (the state, the within-chunk solve, the decays) and returns the output in
v's dtype and the state in fp32.

Forward, one chunk of C tokens (rows are tokens; per value head). With
gamma = cumsum(g) inside the chunk, a = exp(gamma), lam = exp(gamma_last),
rho = exp(gamma_last - gamma), D[t, s] = exp(gamma_t - gamma_s) for s <= t
(0 above the diagonal) and S0 the state at the chunk start, unrolling the
recurrence gives

  M  = strict_lower(beta_t (K K^T)[t, s] D[t, s]),   T = (I + M)^-1
  X  = V - a * (K S0),   R = beta * X,   U = T R       (U: the deltas u_t)
  P  = (Q K^T) * D
  O  = a * (Q S0) + P U
  S1 = lam S0 + (rho * K)^T U.

T is built from matmuls only: the 16 x 16 diagonal blocks by doubling
(T <- T - T N T, N the next off-diagonal blocks), then the rest by block
forward substitution, T[i, :i] = -T[i, i] M[i, :i] T[:i, :i]. Every product
is of blocks of the true inverse, which keeps it stable where a power series
in M would cancel catastrophically.

Chunks run in a loop carrying S, with all the within-chunk terms computed
inside the loop, one chunk at a time: no [.., C, C] array exists for more
than one chunk. The arrays stay in their [B, L, H, D] layout (chunks are a
reshape [B, n, C, H, D], sliced in place).

Backward (hand-written custom VJP). The residuals are the inputs and the
state at each chunk start (fp32 [B, n, H, Dk, Dv]). A reverse loop over
chunks recomputes the forward terms of one chunk from its inputs and S0 and,
with the incoming dO and dS1 (the gradient of the state at the chunk end,
carried from the next chunk), forms every gradient of the chunk by the chain
rule through the lines above, in reverse:

  dU   = P^T dO + rho * (K dS1)
  dR   = T^T dU                    (U = T R)
  dM   = -strict_lower(dR U^T)     (d(A^-1) = -A^-1 dA A^-1)
  dP   = lower(dO U^T)
  dV   = beta * dR
  dQ   = (a * dO) S0^T + (dP * D) K
  dK   = (rho * U) dS1^T - (beta * a * dR) S0^T + (dG + dG^T) K + (dP * D)^T Q,
         with dG = beta_t dM * D   (M's dependence on K K^T)
  dbeta_t = <dR_t, X_t> + sum_s dM[t, s] (K K^T)[t, s] D[t, s]
  da_t    = <dO_t, (Q S0)_t> - beta_t <dR_t, (K S0)_t>, formed as
  a_t da_t = <((a dO) S0^T)_t, q_t> - <((beta a dR) S0^T)_t, k_t>
            from the dQ, dK terms above (no Q S0 product in the backward)
  drho_t  = <U_t, (K dS1)_t>,   dlam = <S0, dS1>
  dS0  = lam dS1 + Q^T (a * dO) - K^T (beta * a * dR)     (carried backwards)

The decays all come from gamma: with E = dM * M + dP * P (the gradient of
the masked exponent D times D),

  dgamma_t = sum_s E[t, s] - sum_s E[s, t] + a_t da_t - rho_t drho_t
             + [t = last] (lam dlam + sum_s rho_s drho_s)
  dg_s     = sum_{t >= s} dgamma_t   (reverse cumulative sum).

With more value heads than key heads (Hv = R Hk), q and k serve R value heads
each; their gradients sum over the R heads, and K K^T, Q K^T are formed once
per key head. Nothing divides by beta, a or a key, so zero (padded) tokens
are safe.

Cost, grad of sum(out) w.r.t. all inputs compiled for one TPU v5p chip
(jax.experimental.topologies, compile only; bf16 q, k, v [4, 320, 16, 128],
fp32 g, beta; DEFAULT precision; loops unrolled (unroll=True) so
that XLA's cost analysis counts every chunk): 9.9 GFLOP, 3.2 GB accessed,
88 MB temporaries, against 10.1 GFLOP, 6.0 GB, 371 MB for the earlier
autodiff of an all-chunks-at-once form (jnp.diagonal-based inverse).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
_DEFAULT = lax.Precision.DEFAULT


# Size of the diagonal blocks that unit_lower_inverse inverts by doubling.
_INV_BLOCK = 16


def _expand_heads(q, k, num_v_heads):
  """Repeats key heads so each serves its group of consecutive value heads."""
  rep = num_v_heads // q.shape[2]
  if rep > 1:
    q = jnp.repeat(q, rep, axis=2)
    k = jnp.repeat(k, rep, axis=2)
  return q, k


def _small_unit_lower_inverse(m, precision):
  """Inverse of I + m, m strictly lower [..., b, b], by doubling blocks.

  T_2s = T_s - T_s N_s T_s, where T_s is block diagonal with the inverses of
  the s x s diagonal blocks and N_s holds the blocks just below them inside
  each 2s x 2s diagonal block: for [[A, 0], [B, D]] this is
  [[inv A, 0], [-inv D B inv A, inv D]]. Masks instead of block extraction:
  the blocks are small, and masks need no gathers.
  """
  b = m.shape[-1]
  i = np.arange(b)
  t = None
  s = 1
  while s < b:
    below = (((i[:, None] // (2 * s)) == (i[None, :] // (2 * s)))
             & ((i[:, None] // s) % 2 == 1) & ((i[None, :] // s) % 2 == 0))
    n = jnp.where(below, m, 0.0)
    if t is None:  # T_1 = I.
      t = jnp.eye(b, dtype=m.dtype) - n
    else:
      tn = jnp.einsum("...ij,...jk->...ik", t, n, precision=precision,
                      preferred_element_type=_F32)
      t = t - jnp.einsum("...ij,...jk->...ik", tn, t, precision=precision,
                         preferred_element_type=_F32)
    s *= 2
  return jnp.broadcast_to(jnp.eye(b, dtype=m.dtype), m.shape) if t is None else t


def unit_lower_inverse(m: jax.Array, precision=None) -> jax.Array:
  """Inverse of I + m for strictly lower triangular m [..., C, C].

  Matmuls, static slices and concatenations only (no gathers, scatters or
  loops): the diagonal blocks by doubling, then block forward substitution.
  """
  c = m.shape[-1]
  blk = min(c, _INV_BLOCK)
  nb = -(-c // blk)
  if nb * blk != c:  # Zero padding: the leading block's inverse is unchanged.
    pad = nb * blk - c
    m = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, pad), (0, pad)])
  ein = functools.partial(jnp.einsum, precision=precision,
                          preferred_element_type=_F32)
  diag = [m[..., j * blk:(j + 1) * blk, j * blk:(j + 1) * blk]
          for j in range(nb)]
  tdiag = _small_unit_lower_inverse(jnp.stack(diag, axis=-3), precision)
  inv = tdiag[..., 0, :, :]
  for j in range(1, nb):
    w = j * blk
    x = ein("...ij,...jk->...ik", m[..., w:w + blk, :w], inv)
    row = -ein("...ij,...jk->...ik", tdiag[..., j, :, :], x)
    zeros = jnp.zeros(inv.shape[:-1] + (blk,), inv.dtype)
    inv = jnp.concatenate([jnp.concatenate([inv, zeros], -1),
                           jnp.concatenate([row, tdiag[..., j, :, :]], -1)],
                          -2)
  return inv[..., :c, :c]


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


# ---------------------------------------------------------------------------
# Chunked form. Layouts inside (one chunk; b row, h key head, r value head within
# its key head's group, c/t/s token in the chunk, k/v feature):
#   q, k: [B, C, Hk, Dk] and v: [B, C, Hk, R, Dv], in the input dtype, sliced
#     from the [B, n, ...] arrays as stored;
#   g, beta and the decays: [B, Hk, R, C] fp32;
#   [C, C] terms: [B, Hk, R, C, C] (or [B, Hk, C, C] when shared by r);
#   per-token terms (U, R, K S0, ...): [B, Hk, R, C, Dv];
#   state: [B, Hk, R, Dk, Dv] fp32.
# Every einsum is a dot_general with batch dimensions (b, h) or (b, h, r) and
# no hand-written transposes of the big tensors. Each product names its kind
# of precision (raw, mixed, inverse: see _Precisions).


class _Precisions:
  """Matmul precision per kind of product, and the operand dtype.

  On TPU, DEFAULT precision rounds fp32 operands to bf16 (one MXU pass); HIGH
  is three passes (about 16 bits of mantissa), HIGHEST six (true fp32).
  """

  def __init__(self, in_dtype, precision):
    low = jnp.dtype(in_dtype).itemsize < 4
    fast = precision in (None, _DEFAULT)
    # Products of two raw inputs (K K^T, Q K^T): bf16 x bf16 is exact in an
    # fp32 accumulator, so DEFAULT loses nothing; fp32 inputs follow the
    # caller (HIGHEST in the fp32 model).
    self.raw = _DEFAULT if low else precision
    # Every other product has a derived fp32 operand (the state, T, U, the
    # cotangents, the [C, C] gradients): the caller's choice. HIGHEST for the
    # fp32 model keeps the parity with the recurrent reference; DEFAULT with
    # bf16 inputs rounds the derived operand to bf16 and accumulates in fp32,
    # as flash-linear-attention's kernels do. The state is still carried in
    # fp32, and the elementwise terms (decays, dbeta, dg) stay fp32.
    self.mixed = precision
    # Where DEFAULT would round an operand to bf16 anyway, write it as bf16:
    # the same numbers on TPU, at half the memory traffic.
    self.operand_dtype = jnp.dtype(in_dtype) if low and fast else _F32
    # The inverse is a chain of up to log2(16) + C/16 products whose errors
    # compound: three bf16 passes at least keep T accurate to ~1e-5, at
    # O(16 C^2) flops per chunk, small beside the O(C^2 D) products.
    self.inverse = _HIGHEST if precision == _HIGHEST else lax.Precision.HIGH

  def op(self, x):
    """A derived operand of a `mixed` product, in the operand dtype."""
    return x.astype(self.operand_dtype)


def _ein(spec, x, y, precision):
  return jnp.einsum(spec, x, y, precision=precision,
                    preferred_element_type=_F32)


def _masks(c):
  return np.tril(np.ones((c, c), bool)), np.tril(np.ones((c, c), bool), -1)


def _chunk_terms(q, k, v, g, beta, s0, prec: _Precisions):
  """The within-chunk terms that forward and backward share."""
  c = k.shape[1]
  lower, strict = _masks(c)
  gamma = jnp.cumsum(g, axis=-1)  # [B, H, R, C]
  a = jnp.exp(gamma)
  lam = a[..., -1]
  rho = jnp.exp(gamma[..., -1:] - gamma)
  # exp of a masked difference: the upper entries would overflow.
  diff = gamma[..., :, None] - gamma[..., None, :]
  d = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)
  kk = _ein("bthk,bshk->bhts", k, k, prec.raw)  # [B, H, C, C]
  gd = jnp.where(strict, kk[:, :, None] * d, 0.0)  # [B, H, R, C, C]
  m = beta[..., :, None] * gd
  t = prec.op(unit_lower_inverse(m, prec.inverse))
  ks = _ein("bchk,bhrkv->bhrcv", k, s0, prec.mixed)
  x = jnp.einsum("bchrv->bhrcv", v).astype(_F32) - a[..., None] * ks
  u = prec.op(_ein("bhrts,bhrsv->bhrtv", t, prec.op(beta[..., None] * x),
                   prec.mixed))
  p = _ein("bthk,bshk->bhts", q, k, prec.raw)[:, :, None] * d
  return dict(a=a, lam=lam, rho=rho, d=d, gd=gd, m=m, t=t, x=x, u=u, p=p)


def _chunk_forward(q, k, v, g, beta, s0, prec: _Precisions):
  """Output and end state of one chunk (see the module docstring)."""
  f = _chunk_terms(q, k, v, g, beta, s0, prec)
  qs = _ein("bchk,bhrkv->bhrcv", q, s0, prec.mixed)
  out = f["a"][..., None] * qs + _ein("bhrts,bhrsv->bhrtv", prec.op(f["p"]),
                                      f["u"], prec.mixed)
  s1 = (f["lam"][..., None, None] * s0 +
        _ein("bchk,bhrcv->bhrkv", k, prec.op(f["rho"][..., None] * f["u"]),
             prec.mixed))
  return out, s1


def _chunk_backward(q, k, v, g, beta, s0, dout, ds1, prec: _Precisions):
  """Gradients of one chunk given dO and dS1 (see the module docstring)."""
  f = _chunk_terms(q, k, v, g, beta, s0, prec)
  a, lam, rho, d, u = f["a"], f["lam"], f["rho"], f["d"], f["u"]
  c = k.shape[1]
  lower, strict = _masks(c)
  do = jnp.einsum("bchrv->bhrcv", dout)
  # K dS1 and dR feed matmuls (where DEFAULT rounds them to bf16 anyway) and
  # the sums for drho, dbeta, which bf16 rounding perturbs by ~2^-9 relative:
  # in the bf16 path they are written as bf16.
  kds = prec.op(_ein("bchk,bhrkv->bhrcv", k, ds1, prec.mixed))
  du = (_ein("bhrts,bhrtv->bhrsv", prec.op(f["p"]), prec.op(do), prec.mixed) +
        rho[..., None] * kds)
  dr = prec.op(_ein("bhrts,bhrtv->bhrsv", f["t"], prec.op(du), prec.mixed))
  dm = -jnp.where(strict, _ein("bhrtv,bhrsv->bhrts", prec.op(dr), u,
                               prec.mixed), 0.0)
  dp = jnp.where(lower, _ein("bhrtv,bhrsv->bhrts", prec.op(do), u,
                             prec.mixed), 0.0)

  # Through the state: [dQ; dK] += [a dO; -beta a dR] S0^T and
  # dS0 = lam dS1 + Q^T (a dO) - K^T (beta a dR), per value head (dQ and dK
  # are summed over r further below).
  ado = prec.op(a[..., None] * do.astype(_F32))
  badr = prec.op((beta * a)[..., None] * dr)
  dq_state = _ein("bhrcv,bhrkv->bchrk", ado, s0, prec.mixed)
  dk_state = -_ein("bhrcv,bhrkv->bchrk", badr, s0, prec.mixed)
  ds0 = (lam[..., None, None] * ds1 +
         _ein("bchk,bhrcv->bhrkv", q, ado, prec.mixed) -
         _ein("bchk,bhrcv->bhrkv", k, badr, prec.mixed))

  dbeta = jnp.sum(dr * f["x"], -1) + jnp.sum(dm * f["gd"], -1)
  # a da = a <dO, Q S0> - a beta <dR, K S0> = <dQ_state, Q> + <dK_state, K>,
  # which spares recomputing Q S0.
  ada = (jnp.einsum("bchrk,bchk->bhrc", dq_state, q.astype(_F32)) +
         jnp.einsum("bchrk,bchk->bhrc", dk_state, k.astype(_F32)))
  drho = jnp.sum(u * kds, -1)
  dlam = jnp.sum(s0 * ds1, (-2, -1))
  e = dm * f["m"] + dp * f["p"]
  dgamma = jnp.sum(e, -1) - jnp.sum(e, -2) + ada - rho * drho
  last = np.arange(c) == c - 1  # a mask, not a scatter into the last token
  dgamma = dgamma + np.where(last, 1.0, 0.0).astype(np.float32) * (
      lam * dlam + jnp.sum(rho * drho, -1))[..., None]
  dg = lax.cumsum(dgamma, axis=dgamma.ndim - 1, reverse=True)

  # q and k serve the R value heads of their key head: sum over r. The [C, C]
  # terms: dQ += (dP * D) K; dK += (dG + dG^T) K + (dP * D)^T Q.
  dpd = prec.op(jnp.sum(dp * d, 2))  # [B, H, C, C]
  dgk = jnp.sum(beta[..., :, None] * dm * d, 2)  # dG, lower part
  dgk = prec.op(dgk + jnp.einsum("bhts->bhst", dgk))
  dq = (jnp.sum(dq_state, 3) +
        _ein("bhts,bshk->bthk", dpd, k, prec.mixed))
  dk = (jnp.sum(dk_state, 3) +
        _ein("bhrcv,bhrkv->bchk", prec.op(rho[..., None] * u), ds1,
             prec.mixed) +
        _ein("bhts,bshk->bthk", dgk, k, prec.mixed) +
        _ein("bhst,bshk->bthk", dpd, q, prec.mixed))
  dv = beta[..., None] * dr  # [B, H, R, C, Dv]
  return dq, dk, jnp.einsum("bhrcv->bchrv", dv), dg, dbeta, ds0


def _scan_chunks(body, carry, xs, unroll: bool, reverse=False):
  """A scan over the chunks (axis 1) of the [B, n, ...] arrays xs.

  body(carry, x_slices) -> (carry, y_slices) handles one chunk; the ys come
  back stacked on axis 1. Dynamic slices and in-place updates along the chunk
  axis keep the [B, n, ...] layout (lax.scan would want the chunk axis first,
  i.e. transposed copies), and leave the batch axis, which meshes shard,
  alone. With `unroll` the loop is unrolled in Python with static slices:
  XLA's cost analysis counts a loop body once whatever its trip count, and
  sees every chunk only this way.
  """
  n = xs[0].shape[1]
  order = range(n - 1, -1, -1) if reverse else range(n)
  if unroll:
    ys = [None] * n
    for i in order:
      carry, ys[i] = body(carry, [x[:, i] for x in xs])
    return carry, [jnp.stack(y, axis=1) for y in zip(*ys)]

  _, y_shapes = jax.eval_shape(body, carry, [x[:, 0] for x in xs])
  bufs = [jnp.zeros((y.shape[0], n) + y.shape[1:], y.dtype) for y in y_shapes]

  def step(j, state):
    carry, bufs = state
    i = n - 1 - j if reverse else j
    carry, ys = body(carry, [lax.dynamic_index_in_dim(x, i, 1, False)
                             for x in xs])
    bufs = [lax.dynamic_update_index_in_dim(b, y.astype(b.dtype), i, 1)
            for b, y in zip(bufs, ys)]
    return carry, bufs

  return lax.fori_loop(0, n, step, (carry, bufs))


def _run_forward(q, k, v, g, beta, s0, precision, unroll, keep_states):
  """Loops over chunks; returns (out, final state, chunk start states)."""
  prec = _Precisions(q.dtype, precision)

  def body(s, xs):
    out, s1 = _chunk_forward(*xs, s, prec)
    out = jnp.einsum("bhrcv->bchrv", out).astype(v.dtype)
    return s1, ((out, s) if keep_states else (out,))

  s, ys = _scan_chunks(body, s0, (q, k, v, g, beta), unroll)
  return ys[0], s, (ys[1] if keep_states else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked(q, k, v, g, beta, s0, precision, unroll):
  out, s, _ = _run_forward(q, k, v, g, beta, s0, precision, unroll, False)
  return out, s


def _chunked_fwd(q, k, v, g, beta, s0, precision, unroll):
  out, s, states = _run_forward(q, k, v, g, beta, s0, precision, unroll, True)
  return (out, s), (q, k, v, g, beta, states)


def _chunked_bwd(precision, unroll, res, cts):
  # The barrier keeps XLA from merging the recomputation below with the
  # forward pass (possible when both loops are unrolled), which would keep
  # the forward's [C, C] terms alive instead of recomputing them.
  q, k, v, g, beta, states = lax.optimization_barrier(res)
  dout, ds = cts
  prec = _Precisions(q.dtype, precision)

  def body(ds, xs):
    qi, ki, vi, gi, bi, si, doi = xs
    dqi, dki, dvi, dgi, dbi, ds = _chunk_backward(qi, ki, vi, gi, bi, si, doi,
                                                  ds, prec)
    return ds, (dqi.astype(q.dtype), dki.astype(k.dtype), dvi.astype(v.dtype),
                dgi, dbi)

  ds0, (dq, dk, dv, dg, dbeta) = _scan_chunks(
      body, ds.astype(_F32), (q, k, v, g, beta, states, dout), unroll,
      reverse=True)
  return dq, dk, dv, dg, dbeta, ds0


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, *,
                           chunk_size: int = 64,
                           precision=lax.Precision.HIGHEST,
                           unroll: bool = False):
  """Chunked gated delta rule with a memory-light custom VJP.

  Same results as `recurrent_gated_delta_rule`. Any sequence length works:
  the tail is padded with beta = 0 and g = 0, which leaves the state
  untouched. For the gradient only the inputs and the state at each chunk
  start are kept; the backward recomputes the rest chunk by chunk.

  Args:
    q: [B, L, Hk, Dk] normalised and scaled queries (fp32 or bf16).
    k: [B, L, Hk, Dk] normalised keys, q's dtype.
    v: [B, L, Hv, Dv] values; Hv is a multiple of Hk.
    g: [B, L, Hv] log decay (<= 0), fp32.
    beta: [B, L, Hv] write strength, fp32.
    initial_state: optional [B, Hv, Dk, Dv].
    chunk_size: tokens per chunk.
    precision: matmul precision for products with a derived fp32 operand
      (the state, the deltas, the cotangents). HIGHEST keeps them true fp32
      on TPU, whose DEFAULT rounds fp32 operands to bf16: use it with fp32
      inputs. With bf16 inputs DEFAULT (bf16 operands, fp32 accumulation,
      as in flash-linear-attention) matches the inputs' precision; those
      operands are then written as bf16. Products of two bf16 inputs are
      exact at DEFAULT and always use it; the within-chunk inverse always
      gets at least HIGH.
    unroll: unroll the loops over chunks (forward and backward) instead of
      running them as loops: a larger program, in which XLA's cost analysis
      counts every chunk (it counts a loop body once).

  Returns:
    (output [B, L, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] fp32).
  """
  b, length, hk, dk = q.shape
  hv, dv = v.shape[2:]
  if k.shape != q.shape or v.shape[:2] != (b, length) or hv % hk:
    raise ValueError(
        f"chunk_gated_delta_rule: q {q.shape} and k {k.shape} must be "
        f"[B, L, Hk, Dk] and v {v.shape} [B, L, Hv, Dv] with Hv a multiple "
        f"of Hk.")
  if g.shape != (b, length, hv) or beta.shape != (b, length, hv):
    raise ValueError(
        f"chunk_gated_delta_rule: g {g.shape} and beta {beta.shape} must be "
        f"[B, L, Hv] = {(b, length, hv)}.")
  r = hv // hk
  c = chunk_size
  pad = (-length) % c
  n = (length + pad) // c

  def to_chunks(x):  # [B, L, ...] -> [B, n, C, ...]: a reshape.
    if pad:
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b, n, c) + x.shape[2:])

  q, k = to_chunks(q), to_chunks(k.astype(q.dtype))
  v = to_chunks(v).reshape(b, n, c, hk, r, dv)
  # g and beta are small: [B, n, Hk, R, C] puts the chunk axis last, where
  # the within-chunk cumulative sums and [C, C] outer differences want it.
  g, beta = (jnp.einsum("bnchr->bnhrc", to_chunks(x.astype(_F32)).reshape(
      b, n, c, hk, r)) for x in (g, beta))
  s0 = (jnp.zeros((b, hk, r, dk, dv), _F32) if initial_state is None else
        initial_state.astype(_F32).reshape(b, hk, r, dk, dv))
  if isinstance(precision, str):
    precision = lax.Precision(precision)
  out, state = _chunked(q, k, v, g, beta, s0, precision, bool(unroll))
  out = out.reshape(b, n * c, hv, dv)[:, :length]
  return out, state.reshape(b, hv, dk, dv)
