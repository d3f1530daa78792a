"""The chunked gated delta rule for TPU in Pallas (forward and backward), with truthful
cost estimates.

  out = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64)   # [B, L, Hv, Dv]

The math is that of `gated_delta.py` (read its module docstring: the chunked forward and
the hand-written backward, formula by formula); `_chunk_forward` / `_chunk_backward`
there are what the per-chunk code here implements, one (batch row, value head) at a
time, with every [C, C] and [C, D] term and the state in VMEM. Only the inputs go in and
only the outputs come out of HBM: the pure-JAX version writes and reads every chunk's
intermediates through HBM instead.

Layout. q, k, v (and dO) are not transposed: the wrapper reshapes [B, L, H, D] to
[B, L, H*D] and a BlockSpec picks one head's D-lane window (D a multiple of 128; other
head sizes are not `supported` and the model keeps the pure-JAX version). (As in
tpu_flash_attention: that reshape is free when the caller's array came from a
[B, L, H*D] projection, as the decoder's do; a 4-D [B, L, H, D] array laid out by XLA
with (H, D) tiles costs a copy.) g and beta are
small ([B, L, Hv] fp32): the wrapper lays them out as [B, Hv, nb, ncb, C] (token axis
last, lane-dense per chunk), and dg, dbeta come back that way.

Grid and blocks. The sequence is cut into nb blocks of ncb chunks of C tokens (at most
_MAX_BLOCK_TOKENS tokens per block: one block for L <= 1024 at C = 64, two of 12 chunks
at 1536), and the wrapper pads L to n = nb * ncb chunks (fewer than nb + 1 chunks of
padding) with q = k = v = 0 and g = beta = 0, which leaves the state untouched.
  * Forward: grid (B, Hv, nb), the first two "parallel", the block axis "arbitrary";
    a `lax.fori_loop` over the block's chunks carries the fp32 state [Dk, Dv] in a VMEM
    scratch that persists across the block axis (zeroed at block 0).
  * Backward ("sweep", the default): grid (B, Hv, 2 nb). Steps 0 .. nb-1 sweep forward
    over the blocks recomputing each chunk's start state S0, its inverse T and its
    deltas U into VMEM scratches ([n, Dk, Dv] fp32, [n, C, C] and [n, C, Dv] in the
    operand dtype); steps nb .. 2nb-1 sweep backward over the blocks in reverse,
    chunk by chunk in reverse, carrying dS (fp32 [Dk, Dv], VMEM) and forming every
    gradient of the chunk from those. The k, v, g, beta block index of step nb-1 and
    step nb is the same (the last block), so with one block per row (L <= 1024) every
    input is read from HBM once; q and dO are only fetched for the backward half (their
    index map points at the first block the backward half needs, so nothing is fetched
    twice), and each output block is written once.
    The residuals of the custom VJP are the kernel inputs only: nothing of size
    [.., n, Dk, Dv] or [.., C, C] is stored in HBM.
  * Backward ("states", the fallback when the sweep scratches would exceed
    _STATE_VMEM_BUDGET = 8 MiB per grid step: L above ~6000 at C = 64, D = 128, bf16):
    the forward kernel also writes each chunk's start state (fp32 [B, Hv, n, Dk, Dv],
    kept as a residual), and the backward kernel, grid (B, Hv, nb) over the blocks in
    reverse, reads them and recomputes T and U per chunk.
  Value heads sharing a key head (Hv = R Hk, value head h uses key head h // R): the
  q / k index maps pick the key head's lanes (consecutive value heads of a group fetch
  them once); the backward kernel writes dq and dk per value head, [B, L, Hv*Dk] (fp32
  when R > 1), and the wrapper sums each group of R.

Precision (as gated_delta._Precisions, with Mosaic's two dot precisions). bf16 inputs:
products of two raw inputs (K K^T, Q K^T) are bf16 x bf16 with fp32 accumulation
(exact products); every other product has a derived fp32 operand (the state, T, U, the
cotangents, the [C, C] gradients), which is rounded to bf16 (fp32 accumulation), as
XLA's DEFAULT precision does on TPU; T's products run in three bf16 passes (hi*hi +
hi*lo + lo*hi, the "HIGH" of XLA: Mosaic itself offers only one pass or fp32). fp32
inputs: every product at HIGHEST (fp32 contraction). The state, the decays and every
elementwise term stay fp32. The decay matrix D[t, s] = exp(gamma_t - gamma_s): with fp32
inputs its exponent is the segment sum sum_{s < u <= t} g_u, formed as a product of the
masked g with a 0/1 mask in three bf16 passes (g split into three bf16 terms, the mask
exact: fp32-accurate), because the difference of two cumulative sums loses |gamma| 2^-24
to cancellation, which showed as 1.3e-5 errors in fp32 gradients (gated_delta.py takes
the difference; so does this kernel with bf16 inputs, where it is far below the noise).
rho_s = D[last, s] and lam = a_last are read off D and a, not exponentiated again.

The inverse T = (I + M)^-1 (M strictly lower) is built by doubling: T_1 = I,
T_2s = T_s - T_s N_s T_s, where T_s holds the inverses of the s x s diagonal blocks and
N_s the blocks of M just below them inside each 2s x 2s diagonal block, s = 1, 2, ..,
C/2. Each level forms true inverses of larger diagonal blocks (its products are of
blocks of the true inverse, as in gated_delta.unit_lower_inverse), so nothing cancels
the way a power series in M would. Up to blocks of H = 16 the diagonal blocks sit side
by side in an [H, C] array and multiply as [H, C] x [C, C] (the right factor expanded
to its block-diagonal [C, C] form); above, the rows of the odd s-blocks (the only ones
a level changes) are gathered into [C/2, C] and updated with two [C/2, C] x [C, C]
products. Every slice is a row strip of 16 or more rows: no lane offsets.

Cost estimates (static; per (row, value head) chunk, then times B * Hv * n, n the padded
number of chunks, all of which the kernels compute). Flops are 2 per multiply-add of the
matmuls the kernel issues: a product split into three bf16 passes counts three times,
a HIGHEST (fp32) product once, as XLA counts its own (Mosaic runs it in several bf16
passes). With P = 3 for bf16 inputs, 1 for fp32, and H = min(16, C):
  inverse  I = (2 (log2 H - 1) H C^2 + log2(C / H) C^3) P      (3.5 C^3 P at C = 64)
  decay    E = 3 C^3 with fp32 inputs (the segment sums), 0 with bf16
  forward  2 C^2 Dk + 2 C^2 Dv + 3 C Dk Dv + I + E
           (K K^T, Q K^T; T R, P U; K S0, Q S0, K^T U)
  backward, sweep: the forward sweep C^2 Dk + C^2 Dv + 2 C Dk Dv + I + E (K K^T; T R;
           K S0, K^T U), then per chunk 5 C^2 Dk + 4 C^2 Dv + 7 C Dk Dv + E: K K^T,
           Q K^T, dQ += dPD K, dK += dGs K, dK += dPD^T Q (C^2 Dk); P^T dO, T^T dU,
           dR U^T, dO U^T (C^2 Dv); K S0, K dS, (a dO) S0^T, (b a dR) S0^T, Q^T (a dO),
           K^T (b a dR), (rho U) dS^T (C Dk Dv).
           states: the latter plus I and T R (one K S0 serves both).
  transcendentals = the exps: C^2 (D, computed on all C x C entries) + C (a) per chunk;
           the sweep backward computes them twice.
  bytes_accessed = HBM bytes of the DMAs the pipeline issues: an input block is read
           each time its block index changes between consecutive grid steps and an
           output block is written once per run of equal indices (the counts replay the
           kernels' index maps over the whole grid in Python); g, beta, dg, dbeta rows
           count 4 bytes a token. (On a multi-core chip each core starts its own run, so
           the true count can be higher by a block or so per core.)
The inverse is the largest single term (fwd at C = 64, D = 128, bf16: 2.75 M of 8.0 M
multiply-adds per chunk; the sweep backward builds it again), which makes the kernel
issue more flops than the pure-JAX version (whose inverse works on [.., 16, 16] blocks
that the MXU would pad anyway) while it moves a small fraction of the bytes.

Not measured on hardware here: only compiled (libtpu compile-only devices) and run in
the Pallas interpreter on CPU. Speed belongs to `bench/`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from procir_jax.models.qwen3_5.kernels.cost_model import count_runs

_LANES = 128
_F32 = jnp.float32
_BF16 = jnp.bfloat16
# The most tokens one grid step holds (per operand block): one block per row at the
# training length (320), two at the evaluation encode's 1536.
_MAX_BLOCK_TOKENS = 1024
# Height of the H-form in which the inverse's small diagonal blocks are built.
_INV_H = 16
# VMEM for the backward's forward-sweep scratches (start states, T, U of every chunk of
# a row) per grid step; above it the forward kernel saves the states in HBM instead.
_STATE_VMEM_BUDGET = 8 << 20

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one call (after padding)."""
  batch: int
  length: int  # true length
  hk: int
  hv: int
  dk: int
  dv: int
  chunk: int
  nb: int  # blocks per row
  ncb: int  # chunks per block
  dtype: str  # q, k, v (and dO) dtype
  save_states: bool  # backward fallback: states from the forward kernel
  interpret: bool

  @property
  def r(self):  # value heads per key head
    return self.hv // self.hk

  @property
  def n(self):  # padded number of chunks
    return self.nb * self.ncb

  @property
  def lb(self):  # tokens per block
    return self.ncb * self.chunk

  @property
  def lp(self):  # padded length
    return self.n * self.chunk

  @property
  def fp32(self):
    return np.dtype(self.dtype) == np.float32

  @property
  def itemsize(self):
    return np.dtype(self.dtype).itemsize

  @property
  def dqk_dtype(self):  # dq, dk as the kernel writes them (per value head)
    return self.dtype if self.r == 1 else "float32"

  @property
  def inv_passes(self):
    return 1 if self.fp32 else 3


def _sweep_scratch_bytes(n, chunk, dk, dv, itemsize):
  """VMEM of the sweep backward's per-row scratches: S0 (fp32), T and U per chunk."""
  return n * (dk * dv * 4 + chunk * chunk * itemsize + chunk * dv * itemsize)


def make_plan(q_shape, v_shape, dtype, *, chunk_size: int = 64,
              interpret: bool = False) -> _Plan:
  """The static plan `chunk_gated_delta_rule` uses for these shapes."""
  b, length, hk, dk = q_shape
  hv, dv = v_shape[2], v_shape[3]
  c = int(chunk_size)
  n = max(1, -(-length // c))
  nb = -(-n // max(1, _MAX_BLOCK_TOKENS // c))
  ncb = -(-n // nb)
  itemsize = np.dtype(dtype).itemsize
  save = _sweep_scratch_bytes(nb * ncb, c, dk, dv, itemsize) > _STATE_VMEM_BUDGET
  return _Plan(batch=b, length=length, hk=hk, hv=hv, dk=dk, dv=dv, chunk=c, nb=nb,
               ncb=ncb, dtype=np.dtype(dtype).name, save_states=bool(save),
               interpret=interpret)


def _div(a, b: int):
  """a // b for a >= 0: `lax.div` on traced values (jnp's floor division lowers
  through `sign`, which Mosaic cannot lower when compiling from a CPU host)."""
  if isinstance(a, (int, np.integer)):
    return a // b
  return lax.div(a, jnp.asarray(b, a.dtype))


# Index maps. `xp` is jnp inside the index maps and np when the cost estimate replays
# them, so the byte counts follow the real schedule.


def _bwd_blocks(p: _Plan, t, xp):
  """(block of k, v, g, beta; block of q, dO and the outputs) at backward step t."""
  nb = p.nb
  if p.save_states:  # grid (B, Hv, nb), blocks in reverse
    i = nb - 1 - t
    return i, i
  back = 2 * nb - 1 - t
  return xp.where(t < nb, t, back), xp.where(t < nb, nb - 1, back)


# ------------------------------------------------------------------------ kernel math


def _iota(c, axis):
  return lax.broadcasted_iota(jnp.int32, (c, c), axis)


def _mm(x, y, dims, p: _Plan):
  """One MXU product: both operands in the compute dtype, fp32 accumulation (HIGHEST
  for fp32 operands)."""
  assert x.dtype == y.dtype, (x.dtype, y.dtype)
  prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return lax.dot_general(x, y, dims, precision=prec, preferred_element_type=_F32)


def _op(x, p: _Plan):
  """A derived (fp32) operand of a product, in the compute dtype (bf16 rounding)."""
  return x.astype(p.dtype)


def _split(x):
  hi = x.astype(_BF16)
  return hi, (x - hi.astype(_F32)).astype(_BF16)


def _mm_inv(x, y, p: _Plan):
  """A product of the inverse's fp32 terms: HIGHEST with fp32 inputs, else three bf16
  passes (XLA's HIGH)."""
  if p.fp32:
    return _mm(x, y, _NN, p)
  xh, xl = _split(x)
  yh, yl = _split(y)
  return (_mm(xl, yh, _NN, p) + _mm(xh, yl, _NN, p)) + _mm(xh, yh, _NN, p)


def _log2(x: int) -> int:
  return x.bit_length() - 1


def _below(row, col, s: int):
  """Mask of doubling level s: row in an odd s-block, col in the even s-block just
  before it, both in the same 2s-block (row, col: block-local indices)."""
  lg = _log2(s)
  return (((row >> (lg + 1)) == (col >> (lg + 1))) & (((row >> lg) & 1) == 1)
          & (((col >> lg) & 1) == 0))


def _unit_lower_inverse(m, p: _Plan):
  """(I + m)^-1 for m strictly lower [C, C] fp32, by doubling (see the module doc).

  T_1 = I and T_2s = T_s - T_s N_s T_s, where T_s holds the inverses of the s x s
  diagonal blocks and N_s the blocks of m just below them inside each 2s x 2s diagonal
  block. Two stages, so that no product is much larger than the blocks it inverts and
  no slice is narrower than a sublane tile or offset along lanes:
    * blocks up to H = min(16, C): the H x H diagonal blocks side by side as an
      [H, C] array ("H-form": entry (r, c) is row r of the block that holds column
      c); a product of two block-diagonal matrices is then Xh @ BD(Yh), BD(Yh) the
      [C, C] block-diagonal matrix (Yh tiled down and masked): H C^2 multiply-adds.
    * larger blocks on the whole matrix: only the rows of the odd s-blocks change,
      so they are gathered ([C/2, C]) and updated with two [C/2, C] x [C, C]
      products: C^3 multiply-adds a level.
  """
  c = m.shape[0]
  h = min(_INV_H, c)
  lh = _log2(h)
  # Stage 1, in H-form.
  hr = lax.broadcasted_iota(jnp.int32, (h, c), 0)
  hcol = lax.broadcasted_iota(jnp.int32, (h, c), 1)
  hc = hcol & (h - 1)
  mh = jnp.where((hcol >> lh) == 0, m[0:h, :], 0.0)
  for j in range(1, c // h):  # row strip j, masked to its diagonal block
    mh = mh + jnp.where((hcol >> lh) == j, m[j * h:(j + 1) * h, :], 0.0)
  row, col = _iota(c, 0), _iota(c, 1)
  same_block = (row >> lh) == (col >> lh)

  def bd(xh):  # H-form -> the [C, C] block-diagonal matrix
    return jnp.where(same_block, jnp.tile(xh, (c // h, 1)) if c > h else xh, 0.0)

  th = jnp.where(hr == hc, 1.0, 0.0) - jnp.where(_below(hr, hc, 1), mh, 0.0)  # T_2
  s = 2
  while s < h:
    nh = jnp.where(_below(hr, hc, s), mh, 0.0)
    th = th - _mm_inv(_mm_inv(th, bd(nh), p), bd(th), p)
    s *= 2
  t = bd(th)
  # Stage 2, on the whole matrix.
  while s < c:
    n = jnp.where(_below(row, col, s), m, 0.0)
    odd = jnp.concatenate([t[(2 * i + 1) * s:(2 * i + 2) * s, :]
                           for i in range(c // (2 * s))], axis=0)
    odd = odd - _mm_inv(_mm_inv(odd, n, p), t, p)
    t = jnp.concatenate([x for i in range(c // (2 * s))
                         for x in (t[2 * i * s:(2 * i + 1) * s, :],
                                   odd[i * s:(i + 1) * s, :])], axis=0)
    s *= 2
  return t


def _col_of_row(x, eye):
  """[1, C] -> [C, 1] (exact: one nonzero per lane reduction)."""
  c = eye.shape[0]
  return jnp.sum(jnp.where(eye, jnp.broadcast_to(x, (c, c)), 0.0), axis=1,
                 keepdims=True)


def _row_of_col(x, eye):
  """[C, 1] -> [1, C] (exact)."""
  c = eye.shape[0]
  return jnp.sum(jnp.where(eye, jnp.broadcast_to(x, (c, c)), 0.0), axis=0,
                 keepdims=True)


def _mm_mask(x, mask):
  """x @ mask for x fp32 and a 0/1 mask, to fp32 accuracy in three bf16 passes: x is
  split into three bf16 terms (24 bits of mantissa) and the mask is exact in bf16."""
  x1 = x.astype(_BF16)
  r1 = x - x1.astype(_F32)
  x2 = r1.astype(_BF16)
  x3 = (r1 - x2.astype(_F32)).astype(_BF16)
  dot = functools.partial(lax.dot_general, dimension_numbers=_NN,
                          preferred_element_type=_F32)
  return (dot(x3, mask) + dot(x2, mask)) + dot(x1, mask)


def _decays(p: _Plan, k, g_row, beta_row):
  """The within-chunk terms shared by the forward and the backward (one value head).

  k: [C, Dk] (compute dtype); g_row, beta_row: [1, C] fp32."""
  c = p.chunk
  row, col = _iota(c, 0), _iota(c, 1)
  lower, strict, eye = col <= row, col < row, col == row
  last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  gl = jnp.where(lower, jnp.broadcast_to(g_row, (c, c)), 0.0)  # [t, u] = g_u [u <= t]
  gamma = jnp.sum(gl, axis=1, keepdims=True)  # [C, 1]: sum_{u <= t} g_u
  a = jnp.exp(gamma)
  lam = jnp.sum(jnp.where(last, a, 0.0), axis=0, keepdims=True)  # [1, 1] = a_last
  if p.fp32:
    # The exponent of D, gamma_t - gamma_s = sum_{s < u <= t} g_u, as a segment sum (a
    # product with the mask [u > s]): the difference of the two cumulative sums loses
    # |gamma| 2^-24 to cancellation, which fp32 gradients feel at 1e-5.
    diff = _mm_mask(gl, jnp.where(row > col, 1.0, 0.0).astype(_BF16))
  else:
    # With bf16 operands everywhere else that cancellation is far below the noise
    # (gated_delta.py does the same): the difference of the cumulative sums.
    diff = gamma - _row_of_col(gamma, eye)
  d = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)
  rho = _col_of_row(jnp.sum(jnp.where(row == c - 1, d, 0.0), axis=0, keepdims=True),
                    eye)  # [C, 1]: rho_s = D[last, s] = exp(gamma_last - gamma_s)
  beta = _col_of_row(beta_row, eye)  # [C, 1]
  kk = _mm(k, k, _NT, p)
  gd = jnp.where(strict, kk * d, 0.0)
  m = beta * gd
  return dict(a=a, lam=lam, rho=rho, d=d, beta=beta, gd=gd, m=m, lower=lower,
              strict=strict, eye=eye, last=last, row=row, col=col)


def _deltas(p: _Plan, f, k, v, s0, t):
  """K S0, X = V - a K S0 and U = T (beta X) (U and T in the compute dtype)."""
  ks = _mm(k, _op(s0, p), _NN, p)
  x = v.astype(_F32) - f["a"] * ks
  u = _op(_mm(t, _op(f["beta"] * x, p), _NN, p), p)
  return x, u


def _next_state(p: _Plan, f, k, s0, u):
  """S1 = lam S0 + (rho K)^T U, formed as K^T (rho U)."""
  return f["lam"] * s0 + _mm(k, _op(f["rho"] * u.astype(_F32), p), _TN, p)


def _chunk_out(p: _Plan, q, k, v, g_row, beta_row, s0):
  """Output and end state of one chunk (gated_delta._chunk_forward)."""
  f = _decays(p, k, g_row, beta_row)
  t = _op(_unit_lower_inverse(f["m"], p), p)
  _, u = _deltas(p, f, k, v, s0, t)
  pm = _mm(q, k, _NT, p) * f["d"]
  qs = _mm(q, _op(s0, p), _NN, p)
  out = f["a"] * qs + _mm(_op(pm, p), u, _NN, p)
  return out, _next_state(p, f, k, s0, u)


def _chunk_grads(p: _Plan, f, q, k, x, u, t, s0, ds1, do):
  """Gradients of one chunk given its terms, dO and dS1 (gated_delta._chunk_backward).

  Returns dq, dk [C, Dk], dv [C, Dv] (fp32), dg, dbeta [1, C] and dS0 [Dk, Dv]."""
  a, lam, rho, d, beta = f["a"], f["lam"], f["rho"], f["d"], f["beta"]
  lower, strict, eye = f["lower"], f["strict"], f["eye"]
  c = p.chunk
  pm = _mm(q, k, _NT, p) * d
  do_op = _op(do, p)
  kds = _op(_mm(k, _op(ds1, p), _NN, p), p)  # K dS1 [C, Dv]
  du = _mm(_op(pm, p), do_op, _TN, p) + rho * kds.astype(_F32)  # P^T dO + rho K dS1
  dr = _op(_mm(t, _op(du, p), _TN, p), p)  # T^T dU
  dm = -jnp.where(strict, _mm(dr, u, _NT, p), 0.0)
  dp = jnp.where(lower, _mm(do_op, u, _NT, p), 0.0)

  dr32 = dr.astype(_F32)
  ado = _op(a * do.astype(_F32), p)
  badr = _op((beta * a) * dr32, p)
  s0_op = _op(s0, p)
  dq_state = _mm(ado, s0_op, _NT, p)  # (a dO) S0^T  [C, Dk]
  dk_state = -_mm(badr, s0_op, _NT, p)
  ds0 = lam * ds1 + _mm(q, ado, _TN, p) - _mm(k, badr, _TN, p)

  u32 = u.astype(_F32)
  dbeta = (jnp.sum(dr32 * x, axis=1, keepdims=True)
           + jnp.sum(dm * f["gd"], axis=1, keepdims=True))  # [C, 1]
  ada = (jnp.sum(dq_state * q.astype(_F32), axis=1, keepdims=True)
         + jnp.sum(dk_state * k.astype(_F32), axis=1, keepdims=True))
  drho = jnp.sum(u32 * kds.astype(_F32), axis=1, keepdims=True)
  dlam = jnp.sum(jnp.sum(s0 * ds1, axis=1, keepdims=True), axis=0, keepdims=True)
  e = dm * f["m"] + dp * pm
  dgamma = (jnp.sum(e, axis=1, keepdims=True)
            - _col_of_row(jnp.sum(e, axis=0, keepdims=True), eye)
            + ada - rho * drho)
  dgamma = dgamma + jnp.where(
      f["last"], lam * dlam + jnp.sum(rho * drho, axis=0, keepdims=True), 0.0)
  # dg_s = sum_{t >= s} dgamma_t, straight into row form.
  dg = jnp.sum(jnp.where(f["row"] >= f["col"], jnp.broadcast_to(dgamma, (c, c)), 0.0),
               axis=0, keepdims=True)

  dpd = _op(dp * d, p)
  dgk = beta * dm * d  # dG, lower part
  dgk = _op(dgk + dgk.T, p)
  dq = dq_state + _mm(dpd, k, _NN, p)
  dk = (dk_state + _mm(_op(rho * u32, p), _op(ds1, p), _NT, p)
        + _mm(dgk, k, _NN, p) + _mm(dpd, q, _TN, p))
  dv = beta * dr32
  return dq, dk, dv, dg, _row_of_col(dbeta, eye), ds0


# ------------------------------------------------------------------------------ kernels


def _rows(p: _Plan, j):
  return pl.ds(pl.multiple_of(j * p.chunk, p.chunk), p.chunk)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, o_ref, *rest, p: _Plan):
  if p.save_states:
    st_ref, s_sc = rest
  else:
    (s_sc,) = rest

  @pl.when(pl.program_id(2) == 0)
  def _init():
    s_sc[...] = jnp.zeros(s_sc.shape, _F32)

  def body(j, carry):
    rows = _rows(p, j)
    s0 = s_sc[...]
    if p.save_states:
      st_ref[j] = s0
    out, s1 = _chunk_out(p, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                         g_ref[pl.ds(j, 1), :], b_ref[pl.ds(j, 1), :], s0)
    o_ref[rows, :] = out.astype(o_ref.dtype)
    s_sc[...] = s1
    return carry

  lax.fori_loop(0, p.ncb, body, 0)


def _write_grads(p: _Plan, j, grads, dq_ref, dk_ref, dv_ref, dg_ref, db_ref):
  dq, dk, dv, dg, db = grads
  rows = _rows(p, j)
  dq_ref[rows, :] = dq.astype(dq_ref.dtype)
  dk_ref[rows, :] = dk.astype(dk_ref.dtype)
  dv_ref[rows, :] = dv.astype(dv_ref.dtype)
  dg_ref[pl.ds(j, 1), :] = dg
  db_ref[pl.ds(j, 1), :] = db


def _bwd_sweep_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, do_ref,
                      dq_ref, dk_ref, dv_ref, dg_ref, db_ref,
                      s_sc, ds_sc, st_sc, t_sc, u_sc, *, p: _Plan):
  step = pl.program_id(2)
  nb = p.nb

  @pl.when(step == 0)
  def _init_forward():
    s_sc[...] = jnp.zeros(s_sc.shape, _F32)

  @pl.when(step < nb)
  def _forward_sweep():
    def body(j, carry):
      rows = _rows(p, j)
      c = step * p.ncb + j
      k = k_ref[rows, :]
      s0 = s_sc[...]
      f = _decays(p, k, g_ref[pl.ds(j, 1), :], b_ref[pl.ds(j, 1), :])
      t = _op(_unit_lower_inverse(f["m"], p), p)
      _, u = _deltas(p, f, k, v_ref[rows, :], s0, t)
      st_sc[c] = s0
      t_sc[c] = t
      u_sc[c] = u
      s_sc[...] = _next_state(p, f, k, s0, u)
      return carry

    lax.fori_loop(0, p.ncb, body, 0)

  @pl.when(step == nb)
  def _init_backward():
    ds_sc[...] = jnp.zeros(ds_sc.shape, _F32)

  @pl.when(step >= nb)
  def _backward_sweep():
    blk = 2 * nb - 1 - step

    def body(jj, carry):
      j = p.ncb - 1 - jj
      rows = _rows(p, j)
      c = blk * p.ncb + j
      q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
      s0 = st_sc[c]
      f = _decays(p, k, g_ref[pl.ds(j, 1), :], b_ref[pl.ds(j, 1), :])
      ks = _mm(k, _op(s0, p), _NN, p)
      x = v.astype(_F32) - f["a"] * ks
      *grads, ds0 = _chunk_grads(p, f, q, k, x, u_sc[c], t_sc[c], s0, ds_sc[...],
                                 do_ref[rows, :])
      _write_grads(p, j, grads, dq_ref, dk_ref, dv_ref, dg_ref, db_ref)
      ds_sc[...] = ds0
      return carry

    lax.fori_loop(0, p.ncb, body, 0)


def _bwd_states_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, do_ref, st_ref,
                       dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds_sc, *, p: _Plan):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    ds_sc[...] = jnp.zeros(ds_sc.shape, _F32)

  def body(jj, carry):
    j = p.ncb - 1 - jj
    rows = _rows(p, j)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    s0 = st_ref[j]
    f = _decays(p, k, g_ref[pl.ds(j, 1), :], b_ref[pl.ds(j, 1), :])
    t = _op(_unit_lower_inverse(f["m"], p), p)
    x, u = _deltas(p, f, k, v, s0, t)
    *grads, ds0 = _chunk_grads(p, f, q, k, x, u, t, s0, ds_sc[...], do_ref[rows, :])
    _write_grads(p, j, grads, dq_ref, dk_ref, dv_ref, dg_ref, db_ref)
    ds_sc[...] = ds0
    return carry

  lax.fori_loop(0, p.ncb, body, 0)


# ----------------------------------------------------------------------- cost estimates


def _grid_runs(grid, index_map) -> int:
  return count_runs(tuple(int(i) for i in index_map(*ids))
                     for ids in itertools.product(*(range(g) for g in grid)))


@functools.lru_cache(maxsize=None)
def _schedule(p: _Plan) -> dict[str, int]:
  """Block fetch / write counts of each kernel's operands over its whole grid."""
  r = p.r
  fwd_grid = (p.batch, p.hv, p.nb)
  out = dict(
      fwd_qk=_grid_runs(fwd_grid, lambda b, h, i: (b, i, h // r)),
      fwd_v=_grid_runs(fwd_grid, lambda b, h, i: (b, i, h)))
  steps = p.nb if p.save_states else 2 * p.nb
  bwd_grid = (p.batch, p.hv, steps)
  blocks = functools.partial(_bwd_blocks, p, xp=np)
  out.update(
      bwd_k=_grid_runs(bwd_grid, lambda b, h, t: (b, blocks(t)[0], h // r)),
      bwd_v=_grid_runs(bwd_grid, lambda b, h, t: (b, blocks(t)[0], h)),
      bwd_q=_grid_runs(bwd_grid, lambda b, h, t: (b, blocks(t)[1], h // r)),
      bwd_o=_grid_runs(bwd_grid, lambda b, h, t: (b, blocks(t)[1], h)))
  return out


def _chunk_macs(p: _Plan) -> dict[str, int]:
  """Multiply-adds of the matmuls issued per chunk (one value head)."""
  c, dk, dv = p.chunk, p.dk, p.dv
  h = min(_INV_H, c)
  # Doubling levels with products: s = 2 .. H/2 in H-form (two [H, C] x [C, C]), then
  # s = H .. C/2 on the odd-block rows (two [C/2, C] x [C, C]).
  inverse = (2 * (_log2(h) - 1) * h * c * c + _log2(c // h) * c ** 3) * p.inv_passes
  # fp32: D's exponent as three bf16 passes against the [C, C] mask.
  decay = 3 * c ** 3 if p.fp32 else 0
  fwd = 2 * c * c * dk + 2 * c * c * dv + 3 * c * dk * dv + inverse + decay
  sweep = c * c * dk + c * c * dv + 2 * c * dk * dv + inverse + decay
  grads = 5 * c * c * dk + 4 * c * c * dv + 7 * c * dk * dv + decay
  states = grads + inverse + c * c * dv
  return dict(inverse=inverse, fwd=fwd, bwd=states if p.save_states else sweep + grads)


def cost_estimates(p: _Plan) -> dict[str, pl.CostEstimate]:
  """The CostEstimate of each kernel ("fwd", "bwd"); the rules are in the module doc."""
  sch = _schedule(p)
  macs = _chunk_macs(p)
  chunks = p.batch * p.hv * p.n
  exps = p.chunk * p.chunk + p.chunk  # D and a
  isz = p.itemsize
  qk_blk = p.lb * p.dk * isz
  v_blk = p.lb * p.dv * isz
  row_blk = p.lb * 4  # g, beta, dg, dbeta of one (row, head) block
  st_blk = p.ncb * p.dk * p.dv * 4
  dqk_blk = p.lb * p.dk * np.dtype(p.dqk_dtype).itemsize
  rows_io = p.batch * p.hv * p.nb  # (row, head, block) triples
  fwd_bytes = (2 * sch["fwd_qk"] * qk_blk + sch["fwd_v"] * v_blk + rows_io * 2 * row_blk
               + rows_io * v_blk + (rows_io * st_blk if p.save_states else 0))
  bwd_bytes = (sch["bwd_k"] * qk_blk + sch["bwd_q"] * qk_blk  # k; q
               + sch["bwd_v"] * (v_blk + 2 * row_blk)  # v, g, beta
               + sch["bwd_o"] * v_blk  # dO
               + sch["bwd_o"] * (2 * dqk_blk + v_blk + 2 * row_blk)  # dq dk dv dg db
               + (rows_io * st_blk if p.save_states else 0))
  bwd_exps = exps if p.save_states else 2 * exps
  return dict(
      fwd=pl.CostEstimate(flops=2 * macs["fwd"] * chunks, transcendentals=exps * chunks,
                          bytes_accessed=fwd_bytes),
      bwd=pl.CostEstimate(flops=2 * macs["bwd"] * chunks,
                          transcendentals=bwd_exps * chunks, bytes_accessed=bwd_bytes))


# ------------------------------------------------------------------------- pallas calls


def _vmem_limit(p: _Plan) -> int:
  """A scoped-VMEM limit with room for the double-buffered blocks, the scratches and
  the loop body's temporaries."""
  isz = p.itemsize
  blocks = (2 * p.lb * p.dk * isz * 2 + p.lb * p.dv * isz * 2 + 4 * p.lb * 4
            + 2 * p.lb * p.dk * 4 + p.lb * p.dv * 4 + p.ncb * p.dk * p.dv * 4)
  scratch = 2 * p.dk * p.dv * 4 + (0 if p.save_states else _sweep_scratch_bytes(
      p.n, p.chunk, p.dk, p.dv, isz))
  return int(min(64 << 20, max(32 << 20, 2 * blocks + scratch + (16 << 20))))


def _compiler_params(p: _Plan):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=_vmem_limit(p))


def _fwd_call(p: _Plan, q3, k3, v3, g5, b5):
  r = p.r
  qk_spec = pl.BlockSpec((None, p.lb, p.dk), lambda b, h, i: (b, i, _div(h, r)))
  v_spec = pl.BlockSpec((None, p.lb, p.dv), lambda b, h, i: (b, i, h))
  row_spec = pl.BlockSpec((None, None, None, p.ncb, p.chunk),
                          lambda b, h, i: (b, h, i, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((p.batch, p.lp, p.hv * p.dv), v3.dtype)]
  out_specs = [v_spec]
  if p.save_states:
    out_shape.append(jax.ShapeDtypeStruct((p.batch, p.hv, p.n, p.dk, p.dv), _F32))
    out_specs.append(pl.BlockSpec((None, None, p.ncb, p.dk, p.dv),
                                  lambda b, h, i: (b, h, i, 0, 0)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, p=p),
      grid=(p.batch, p.hv, p.nb),
      in_specs=[qk_spec, qk_spec, v_spec, row_spec, row_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((p.dk, p.dv), _F32)],
      compiler_params=_compiler_params(p),
      cost_estimate=cost_estimates(p)["fwd"],
      interpret=p.interpret,
      name="procir_gated_delta_fwd",
  )(q3, k3, v3, g5, b5)


def _bwd_call(p: _Plan, q3, k3, v3, g5, b5, do3, states):
  r = p.r

  def kv_block(t):
    return _bwd_blocks(p, t, jnp)[0]

  def q_block(t):
    return _bwd_blocks(p, t, jnp)[1]

  k_spec = pl.BlockSpec((None, p.lb, p.dk),
                        lambda b, h, t: (b, kv_block(t), _div(h, r)))
  q_spec = pl.BlockSpec((None, p.lb, p.dk), lambda b, h, t: (b, q_block(t), _div(h, r)))
  v_spec = pl.BlockSpec((None, p.lb, p.dv), lambda b, h, t: (b, kv_block(t), h))
  do_spec = pl.BlockSpec((None, p.lb, p.dv), lambda b, h, t: (b, q_block(t), h))
  row_spec = pl.BlockSpec((None, None, None, p.ncb, p.chunk),
                          lambda b, h, t: (b, h, kv_block(t), 0, 0))
  drow_spec = pl.BlockSpec((None, None, None, p.ncb, p.chunk),
                           lambda b, h, t: (b, h, q_block(t), 0, 0))
  dqk_spec = pl.BlockSpec((None, p.lb, p.dk), lambda b, h, t: (b, q_block(t), h))
  in_specs = [q_spec, k_spec, v_spec, row_spec, row_spec, do_spec]
  args = [q3, k3, v3, g5, b5, do3]
  scratch = [pltpu.VMEM((p.dk, p.dv), _F32)]
  if p.save_states:
    in_specs.append(pl.BlockSpec((None, None, p.ncb, p.dk, p.dv),
                                 lambda b, h, t: (b, h, q_block(t), 0, 0)))
    args.append(states)
    kernel, steps = _bwd_states_kernel, p.nb
  else:
    scratch = [pltpu.VMEM((p.dk, p.dv), _F32), pltpu.VMEM((p.dk, p.dv), _F32),
               pltpu.VMEM((p.n, p.dk, p.dv), _F32),
               pltpu.VMEM((p.n, p.chunk, p.chunk), jnp.dtype(p.dtype)),
               pltpu.VMEM((p.n, p.chunk, p.dv), jnp.dtype(p.dtype))]
    kernel, steps = _bwd_sweep_kernel, 2 * p.nb
  dqk = jax.ShapeDtypeStruct((p.batch, p.lp, p.hv * p.dk), p.dqk_dtype)
  rows = jax.ShapeDtypeStruct((p.batch, p.hv, p.nb, p.ncb, p.chunk), _F32)
  return pl.pallas_call(
      functools.partial(kernel, p=p),
      grid=(p.batch, p.hv, steps),
      in_specs=in_specs,
      out_specs=[dqk_spec, dqk_spec, do_spec, drow_spec, drow_spec],
      out_shape=[dqk, dqk, jax.ShapeDtypeStruct(v3.shape, v3.dtype), rows, rows],
      scratch_shapes=scratch,
      compiler_params=_compiler_params(p),
      cost_estimate=cost_estimates(p)["bwd"],
      interpret=p.interpret,
      name="procir_gated_delta_bwd",
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(p: _Plan, q3, k3, v3, g5, b5):
  return _fwd_call(p, q3, k3, v3, g5, b5)[0]


def _delta_fwd(p: _Plan, q3, k3, v3, g5, b5):
  outs = _fwd_call(p, q3, k3, v3, g5, b5)
  states = outs[1] if p.save_states else None
  # Residuals: the inputs (and, in the fallback only, the chunk start states).
  return outs[0], (q3, k3, v3, g5, b5, states)


def _delta_bwd(p: _Plan, res, do3):
  q3, k3, v3, g5, b5, states = res
  dq, dk, dv, dg, db = _bwd_call(p, q3, k3, v3, g5, b5, do3.astype(v3.dtype), states)
  if p.r > 1:
    # The kernel writes dq and dk per value head ([B, Lp, Hv*Dk], fp32): each key head
    # serves its group of R consecutive value heads, whose gradients sum here.
    def group_sum(x):
      return x.reshape(p.batch, p.lp, p.hk, p.r, p.dk).sum(3).reshape(
          p.batch, p.lp, p.hk * p.dk).astype(q3.dtype)
    dq, dk = group_sum(dq), group_sum(dk)
  return dq, dk, dv, dg, db


_delta.defvjp(_delta_fwd, _delta_bwd)


# ------------------------------------------------------------------------------ the API


def supported(q_shape, v_shape) -> bool:
  """Whether the kernel takes these shapes: Dk and Dv multiples of 128 (a head's lanes
  are a whole number of 128-lane tiles) and Hv a multiple of Hk. Otherwise use
  gated_delta.chunk_gated_delta_rule."""
  if len(q_shape) != 4 or len(v_shape) != 4:
    return False
  hk, dk = q_shape[2], q_shape[3]
  hv, dv = v_shape[2], v_shape[3]
  return (dk % _LANES == 0 and dv % _LANES == 0 and hk > 0 and hv % hk == 0
          and tuple(q_shape[:2]) == tuple(v_shape[:2]))


def chunk_gated_delta_rule(q, k, v, g, beta, *, chunk_size: int = 64,
                           interpret: bool = False) -> jax.Array:
  """q, k: [B, L, Hk, Dk] (already L2-normalised; q already scaled) in the compute
  dtype (bf16 or fp32); v: [B, L, Hv, Dv] same dtype, Hv a multiple of Hk (value
  head h uses key head h // (Hv // Hk)); g: [B, L, Hv] log decay <= 0, fp32; beta:
  [B, L, Hv] fp32. Zero initial state. Returns the output [B, L, Hv, Dv] in v's
  dtype. Differentiable (jax.custom_vjp) in q, k, v, g, beta.

  chunk_size: tokens per chunk, a power of two from 8 to 128 (64 on TPU; smaller ones
  keep interpreter tests quick). `interpret=True` runs the Pallas interpreter (CPU).
  """
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4:
    raise ValueError(f"tpu_gated_delta: q {q.shape} and k {k.shape} must both be "
                     f"[B, L, Hk, Dk] and v {v.shape} [B, L, Hv, Dv].")
  b, length, hk, dk = q.shape
  hv, dv = v.shape[2:]
  if v.shape[:2] != (b, length) or hv % hk:
    raise ValueError(f"tpu_gated_delta: v {v.shape} must be [{b}, {length}, Hv, Dv] "
                     f"with Hv a multiple of the {hk} key heads of q {q.shape}.")
  if not supported(q.shape, v.shape):
    raise ValueError(
        f"tpu_gated_delta: head sizes Dk={dk}, Dv={dv} are not multiples of 128, which "
        f"the kernel needs (one head per 128-lane tile); check `supported(q.shape, "
        f"v.shape)` first and use gated_delta.chunk_gated_delta_rule otherwise.")
  if g.shape != (b, length, hv) or beta.shape != (b, length, hv):
    raise ValueError(f"tpu_gated_delta: g {g.shape} and beta {beta.shape} must be "
                     f"[B, L, Hv] = {(b, length, hv)}.")
  if q.dtype not in (jnp.float32, jnp.bfloat16) or k.dtype != q.dtype or (
      v.dtype != q.dtype):
    raise ValueError(f"tpu_gated_delta: q, k, v must share one dtype, bf16 or fp32; "
                     f"got {q.dtype}, {k.dtype}, {v.dtype}.")
  c = int(chunk_size)
  if c < 8 or c > 128 or c & (c - 1):
    raise ValueError(f"tpu_gated_delta: chunk_size={chunk_size} must be a power of two "
                     f"from 8 to 128.")

  p = make_plan(q.shape, v.shape, q.dtype, chunk_size=c, interpret=interpret)
  pad = p.lp - length

  def flat(x):  # [B, L, H, D] -> [B, Lp, H*D]: a reshape, then the padding
    x = x.reshape(b, length, x.shape[2] * x.shape[3])
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x

  def rows(x):  # [B, L, Hv] fp32 -> [B, Hv, nb, ncb, C] (small arrays)
    x = x.astype(_F32)
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    return jnp.transpose(x.reshape(b, p.nb, p.ncb, c, hv), (0, 4, 1, 2, 3))

  out = _delta(p, flat(q), flat(k), flat(v), rows(g), rows(beta))
  return out[:, :length].reshape(b, length, hv, dv)
