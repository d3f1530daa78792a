"""Flash attention for TPU in Pallas (forward and backward), with truthful cost
estimates.

  out = flash_attention(q, k, v, scale=d ** -0.5, causal=True)            # decoder
  out = flash_attention(q, k, v, scale=d ** -0.5, causal=False,
                        kv_lengths=patches_per_image)                     # vision tower

Why our own kernel: JAX ships Pallas TPU attention (`jax.experimental.pallas.ops.tpu`
flash_attention and splash_attention), but their backward `pallas_call`s (and all of
splash's) carry no `cost_estimate`, so XLA's `cost_analysis()` sees neither their FLOPs
nor their HBM bytes, and our per-chip planning numbers come from `cost_analysis()`.
Every `pallas_call` here passes a `pl.CostEstimate` computed from the blocks the kernel
actually visits (see "Cost estimates" below). The design follows JAX's kernels (online
softmax with fp32 running max / sum / accumulator, saved log-sum-exp, a dQ kernel and a
dK/dV kernel, skipped blocks whose index maps repeat the previous block so no DMA is
issued). The dQ kernel also computes D_i = rowsum(dO * O) in VMEM and hands it to the
dK/dV kernel, so no XLA op outside the kernels touches O or dO.

Layout. q, k, v are not transposed: the wrapper reshapes [B, L, H, D] to [B, L, H*D] and
BlockSpecs pick a lane window of whole heads. (On TPU that reshape is a bitcast only
when the array was laid out as [B, L, H*D], e.g. a projection output reshaped by the
caller: the two reshapes cancel. XLA's TPU layout for a 4-D [B, L, H, D] operand tiles
(H, D), so converting one costs a copy, as any head-major kernel would.)
  * D % 128 == 0 ("aligned", the decoder: D=256): one grid step takes one kv head's
    lanes [bk, D] and the G = Hq/Hkv query heads sharing it, [bq, G*D]; heads are sliced
    out at 128-aligned lane offsets. K/V blocks are read once per group, not once per
    query head.
  * D % 128 != 0 ("packed", the vision tower: D=64): a grid step takes enough heads to
    fill a 128-lane window (two heads for D=64; all heads if no divisor of H fills one),
    and each head's matmuls run over the whole window with the other heads' lanes zeroed
    (q/dO side) or discarded (lane select on the outputs). On a 128-wide MXU this costs
    the same passes as a D=64 matmul padded to 128, and it avoids a [B, L, H, D] ->
    [B, H, L, D] transpose in HBM. Grouped-query attention in this mode repeats K/V to
    Hq heads in the wrapper (autodiff sums dK/dV over the group); no model shape needs
    it (the vision tower has Hq == Hkv), it exists so every shape works.

Padding and masks. Lengths are padded in the wrapper to a multiple of the block (see
`_block_and_padded_len`) and the output is sliced back. Per batch row, keys at or beyond
kv_len (kv_lengths[b], or the true Lk) are masked; for self-attention (Lq == Lk) query
rows at or beyond that length are padding too: their output is 0 and they get no
gradient (the model discards them; the reference would average values there instead, and
the tests only compare real rows). Blocks entirely above the causal diagonal, entirely
beyond kv_len, or entirely in query padding are skipped (no MXU work, no DMA); interior
blocks skip the mask arithmetic. A row with no visible key gives a finite output (0
here), never NaN.
Nothing of size [B, H, L, L] exists anywhere, forward or backward: the residuals are
q, k, v, o and a [B, Hq, Lq] fp32 log-sum-exp; each kernel holds one [bq, bk] score
block per head in VMEM at a time.

Block sizes. `block_q`/`block_k` are rounded down to a multiple of 128 (at least 128); a
length L uses n = ceil(L / block) blocks of size round_up(ceil(L / n), 128), so the
padded length is n * that (e.g. 320 -> one 384 block, 576 -> two 384 blocks, 1536 ->
three 512). Multiples of 128 keep the [bq, bk] score tiles, the [bq] log-sum-exp rows
and the [bk] key windows lane-dense on TPU.

Cost estimates (static, so they assume every row is full length: kv_lengths only lowers
the true cost). A "pair" is a (q block, kv block) the kernel computes: for causal
attention the blocks on or below the diagonal (about half), never blocks wholly in
wrapper padding. With Dm the matmul width per head (D when aligned, the lane window when
packed) and Hq heads:
  flops           = 2 per multiply-add of the MXU matmuls issued, per pair and head:
                    forward 2*bq*bk*Dm * 2 (QK^T, PV); dQ kernel 3 matmuls (QK^T,
                    dO V^T, dS K); dK/dV kernel 4 (K Q^T, V dO^T, P^T dO, dS^T Q). So
                    fwd + bwd is 18 * bq*bk*Dm per pair and head, against the textbook
                    12 (the two backward kernels each recompute P and dP). Packed heads
                    (D=64) count their 128-lane window, i.e. twice the D=64 work,
                    because that is what the MXU executes. Elementwise (VPU) work is not
                    counted.
  transcendentals = the exps: bq*bk per pair and head in each kernel, plus the forward's
                    bq rescale exps per pair and head and bq logs per q block and head.
  bytes_accessed  = HBM bytes of the DMAs the pipeline issues: an input block is read
                    each time its block index changes between consecutive grid steps
                    (the counts come from running the same index maps in Python),
                    outputs are written once per block, plus the scalar-prefetched
                    lengths. Logical bytes: the fp32 log-sum-exp / dO.O rows are counted
                    at 4 bytes each, not at their tiled (8-sublane) HBM footprint.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from procir_jax.models.qwen3_5.kernels.cost_model import count_runs

_LANES = 128
# Masked logits: finite (so a fully masked block never gives inf - inf = NaN) and so
# negative that exp(_MASK - m) == 0 for any real running max m.
_MASK = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


# --------------------------------------------------------------------------- planning


def _cdiv(a, b):
  return _div(a + b - 1, b)


def _div(a, b: int):
  """a // b for a >= 0: `lax.div` on traced values (jnp's floor division lowers
  through `sign`, which the Mosaic lowering cannot resolve when compiling for TPU
  from a CPU host)."""
  if isinstance(a, (int, np.integer)):
    return a // b
  return lax.div(a, jnp.asarray(b, a.dtype))


def _block_and_padded_len(length: int, block: int) -> tuple[int, int]:
  """(block size, padded length) for a sequence of `length` and a requested block."""
  block = max(_LANES, block // _LANES * _LANES)
  n = _cdiv(length, block)
  size = _cdiv(_cdiv(length, n), _LANES) * _LANES
  return size, n * size


def _kv_heads_per_block(hkv: int, d: int) -> int:
  """Fewest kv heads whose lanes fill whole 128-lane tiles; all of them if none do."""
  for n in range(1, hkv + 1):
    if hkv % n == 0 and (n * d) % _LANES == 0:
      return n
  return hkv


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shape of one kernel call (after padding and any kv repeat)."""
  batch: int
  lq: int  # true lengths
  lk: int
  bq: int
  bk: int
  lq_pad: int
  lk_pad: int
  hq: int
  hkv: int  # kv heads the kernel sees
  d: int
  nkv: int  # kv heads per grid step
  causal: bool
  scale: float
  q_dtype: str
  kv_dtype: str
  interpret: bool

  @property
  def g(self):
    return self.hq // self.hkv

  @property
  def nh(self):  # query heads per grid step
    return self.nkv * self.g

  @property
  def nhb(self):  # head blocks
    return self.hkv // self.nkv

  @property
  def wq(self):  # lanes of a q / o / dO block
    return self.nh * self.d

  @property
  def wk(self):  # lanes of a k / v block
    return self.nkv * self.d

  @property
  def nq(self):
    return self.lq_pad // self.bq

  @property
  def nk(self):
    return self.lk_pad // self.bk

  @property
  def packed(self):
    return self.d % _LANES != 0

  @property
  def dm(self):  # contraction / output width of one head's matmuls
    return self.wk if self.packed else self.d


# Block predicates and index maps. `xp` is jnp inside kernels / index maps and np when
# the cost estimate replays them in Python, so the byte counts follow the real schedule.


def _last_q(p: _Plan, q_len, xp):
  return xp.maximum(_cdiv(q_len, p.bq) - 1, 0)


def _last_k(p: _Plan, kv_len, xp):
  return xp.maximum(_cdiv(kv_len, p.bk) - 1, 0)


def _last_k_for_q(p: _Plan, qi, kv_len, xp):
  last = _cdiv(kv_len, p.bk) - 1
  if p.causal:
    last = xp.minimum(last, _div((qi + 1) * p.bq - 1, p.bk))
  return xp.maximum(last, 0)


def _first_q_for_k(p: _Plan, kj, q_len, xp):
  first = _div(kj * p.bk, p.bq) if p.causal else 0
  return xp.minimum(first, _last_q(p, q_len, xp))


def _runs(p: _Plan, qi, kj, q_len, kv_len):
  """Whether block (qi, kj) has any visible (query, key) pair."""
  run = (kj * p.bk < kv_len) & (qi * p.bq < q_len)
  if p.causal:
    run = run & (kj * p.bk <= (qi + 1) * p.bq - 1)
  return run


def _needs_mask(p: _Plan, qi, kj, q_len, kv_len):
  """Whether block (qi, kj) has any hidden pair (else the mask arithmetic is
  skipped)."""
  need = ((kj + 1) * p.bk > kv_len) | ((qi + 1) * p.bq > q_len)
  if p.causal:
    need = need | ((kj + 1) * p.bk - 1 > qi * p.bq)
  return need


def _qmajor_indices(p: _Plan, qi, kj, q_len, kv_len, xp):
  """(q block, kv block) DMA'd at step (qi, kj) of the fwd and dQ kernels (kj inner).

  Skipped steps repeat a block that is needed anyway: after a q block's last visible kv
  block they prefetch kv block 0 of the next q block; past the last real q block they
  keep the final blocks, so padding rows fetch nothing.
  """
  last_q = _last_q(p, q_len, xp)
  qe = xp.minimum(qi, last_q)
  lk = _last_k_for_q(p, qe, kv_len, xp)
  after = xp.where(qe < last_q, 0, lk)
  ke = xp.where((qi > last_q) | (kj > lk), after, kj)
  return qe, ke


def _kmajor_indices(p: _Plan, kj, qi, q_len, kv_len, xp):
  """(kv block, q block) DMA'd at step (kj, qi) of the dK/dV kernel (qi inner)."""
  last_k = _last_k(p, kv_len, xp)
  ke = xp.minimum(kj, last_k)
  last_q = _last_q(p, q_len, xp)
  first = _first_q_for_k(p, ke, q_len, xp)
  first_next = _first_q_for_k(p, xp.minimum(ke + 1, last_k), q_len, xp)
  after = xp.where(ke < last_k, first_next, last_q)
  qe = xp.where((kj > last_k) | (qi > last_q), after, xp.maximum(qi, first))
  return ke, qe


# ----------------------------------------------------------------------- kernel helpers


def _lanes(x, n):
  """A [r, 128] lane-replicated array as [r, n]."""
  if n == _LANES:
    return x
  if n % _LANES == 0:
    return jnp.tile(x, (1, n // _LANES))
  if n < _LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _head_lanes(p: _Plan, h: int, width: int):
  """[1, width] bool: the lanes of head h within a packed window."""
  lane = lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (lane >= h * p.d) & (lane < (h + 1) * p.d)


def _q_side(p: _Plan, ref, h: int):
  """Query-side head h (q, dO): its lanes when aligned, else the window with others
  zeroed."""
  if not p.packed:
    return ref[:, h * p.d:(h + 1) * p.d]
  x = ref[...]
  return jnp.where(_head_lanes(p, h, x.shape[1]), x, jnp.zeros_like(x))


def _kv_side(p: _Plan, ref, j: int):
  """Key-side head j (k, v): its lanes when aligned, else the whole window."""
  if not p.packed:
    return ref[:, j * p.d:(j + 1) * p.d]
  return ref[...]


def _head_operands(p: _Plan, h: int, q_refs, kv_refs):
  """Query head h's key/value head j (GQA), and its query- and key-side operands."""
  j = h // p.g
  return (j, tuple(_q_side(p, r, h) for r in q_refs),
          tuple(_kv_side(p, r, j) for r in kv_refs))


def _block_mask(p: _Plan, qi, kj, q_len, kv_len, transposed: bool):
  """Visible pairs of block (qi, kj) as [bq, bk] (or [bk, bq] when transposed)."""
  shape = (p.bk, p.bq) if transposed else (p.bq, p.bk)
  q_axis, k_axis = (1, 0) if transposed else (0, 1)
  rows = qi * p.bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  cols = kj * p.bk + lax.broadcasted_iota(jnp.int32, shape, k_axis)
  mask = (cols < kv_len) & (rows < q_len)
  if p.causal:
    mask = mask & (cols <= rows)
  return mask


def _branch(run, need_mask, body):
  """body(masked) under pl.when, specialised for boundary and interior blocks."""
  pl.when(run & need_mask)(lambda: body(True))
  pl.when(run & jnp.logical_not(need_mask))(lambda: body(False))


# ------------------------------------------------------------------------------ kernels


def _scaled_scores(p: _Plan, a, b, mask):
  """a @ b.T * scale in fp32, with masked pairs set to the large negative _MASK."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * p.scale
  return s if mask is None else jnp.where(mask, s, _MASK)


def _fwd_kernel(qlen_ref, kvlen_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, p: _Plan):
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = qlen_ref[b], kvlen_ref[b]

  @pl.when(kj == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    mask = _block_mask(p, qi, kj, q_len, kv_len, False) if masked else None
    for h in range(p.nh):
      _, (q,), (k, v) = _head_operands(p, h, (q_ref,), (k_ref, v_ref))
      s = _scaled_scores(p, q, k, mask)
      m_prev, l_prev = m_sc[h], l_sc[h]  # [bq, 128], lane-replicated
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      e = jnp.exp(s - _lanes(m_next, p.bk))
      alpha = jnp.exp(m_prev - m_next)
      l_sc[h] = alpha * l_prev + jnp.sum(e, axis=1, keepdims=True)
      m_sc[h] = m_next
      pv = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
      if p.packed:
        acc = acc_sc[...]
        acc_sc[...] = jnp.where(_head_lanes(p, h, p.wq),
                                acc * _lanes(alpha, p.wq) + pv, acc)
      else:
        sl = slice(h * p.d, (h + 1) * p.d)
        acc_sc[:, sl] = acc_sc[:, sl] * _lanes(alpha, p.d) + pv

  _branch(_runs(p, qi, kj, q_len, kv_len), _needs_mask(p, qi, kj, q_len, kv_len), body)

  @pl.when(kj == p.nk - 1)
  def _finish():
    rows = qi * p.bq + lax.broadcasted_iota(jnp.int32, (p.bq, _LANES), 0)
    factor = None
    for h in range(p.nh):
      row_sum, m = l_sc[h], m_sc[h]
      ok = (rows < q_len) & (row_sum > 0)
      inv = jnp.where(ok, 1.0 / jnp.where(ok, row_sum, 1.0), 0.0)
      lse = jnp.where(ok, m + jnp.log(jnp.where(ok, row_sum, 1.0)), 0.0)
      lse_ref[h:h + 1, :] = lse.T[:1, :]  # [bq, 128] -> [1, bq]
      if p.packed:
        spread = _lanes(inv, p.wq)
        factor = spread if factor is None else jnp.where(
            _head_lanes(p, h, p.wq), spread, factor)
      else:
        sl = slice(h * p.d, (h + 1) * p.d)
        o_ref[:, sl] = (acc_sc[:, sl] * _lanes(inv, p.d)).astype(o_ref.dtype)
    if p.packed:
      o_ref[...] = (acc_sc[...] * factor).astype(o_ref.dtype)


def _dq_kernel(qlen_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref,
               dq_ref, di_ref, lse_sc, di_sc, acc_sc, *, p: _Plan):
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = qlen_ref[b], kvlen_ref[b]

  @pl.when(kj == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    rows = qi * p.bq + lax.broadcasted_iota(jnp.int32, (p.bq, 1), 0)
    for h in range(p.nh):
      # The saved [1, bq] log-sum-exp row as a [bq, 128] lane-replicated column.
      lse_sc[h] = jnp.broadcast_to(lse_ref[h:h + 1, :], (_LANES, p.bq)).T
      # D_i = sum_d dO * O (fp32) for this head's rows; also written out, as rows, for
      # the dK/dV kernel. Query padding rows get 0 (their pairs are all masked anyway).
      prod = (_q_side(p, o_ref, h).astype(jnp.float32)
              * _q_side(p, do_ref, h).astype(jnp.float32))
      di = jnp.where(rows < q_len, jnp.sum(prod, axis=1, keepdims=True), 0.0)
      di_sc[h] = jnp.broadcast_to(di, (p.bq, _LANES))
      di_ref[h:h + 1, :] = di_sc[h].T[:1, :]

  def body(masked):
    mask = _block_mask(p, qi, kj, q_len, kv_len, False) if masked else None
    for h in range(p.nh):
      _, (q, do), (k, v) = _head_operands(p, h, (q_ref, do_ref), (k_ref, v_ref))
      s = _scaled_scores(p, q, k, mask)
      prob = jnp.exp(s - _lanes(lse_sc[h], p.bk))
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = prob * (dp - _lanes(di_sc[h], p.bk))
      dq = jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
      if p.packed:
        acc_sc[...] += jnp.where(_head_lanes(p, h, p.wq), dq, 0.0)
      else:
        sl = slice(h * p.d, (h + 1) * p.d)
        acc_sc[:, sl] += dq

  _branch(_runs(p, qi, kj, q_len, kv_len), _needs_mask(p, qi, kj, q_len, kv_len), body)

  @pl.when(kj == p.nk - 1)
  def _finish():
    dq_ref[...] = (acc_sc[...] * p.scale).astype(dq_ref.dtype)


def _dkv_kernel(qlen_ref, kvlen_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, p: _Plan):
  b, kj, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_len, kv_len = qlen_ref[b], kvlen_ref[b]

  @pl.when(qi == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    # Transposed orientation [bk, bq]: the saved per-query rows broadcast over sublanes.
    mask = _block_mask(p, qi, kj, q_len, kv_len, True) if masked else None
    for h in range(p.nh):
      j, (q, do), (k, v) = _head_operands(p, h, (q_ref, do_ref), (k_ref, v_ref))
      st = _scaled_scores(p, k, q, mask)
      pt = jnp.exp(st - lse_ref[h:h + 1, :])
      dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
      dst = pt * (dpt - di_ref[h:h + 1, :])
      dv = jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dk = jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)
      if p.packed:  # q / dO had the other heads' lanes zeroed: dk, dv are head j's only
        dv_sc[...] += dv
        dk_sc[...] += dk
      else:
        sl = slice(j * p.d, (j + 1) * p.d)
        dv_sc[:, sl] += dv
        dk_sc[:, sl] += dk

  _branch(_runs(p, qi, kj, q_len, kv_len), _needs_mask(p, qi, kj, q_len, kv_len), body)

  @pl.when(qi == p.nq - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * p.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------- cost estimates


@functools.lru_cache(maxsize=None)
def _schedule(p: _Plan) -> dict[str, int]:
  """Replays the grid of one (batch row, head block) at full lengths (static shapes)."""
  ql, kl = p.lq, p.lk
  pairs, qm_q, qm_k, km_k, km_q = 0, [], [], [], []
  for qi in range(p.nq):
    for kj in range(p.nk):
      pairs += bool(_runs(p, qi, kj, ql, kl))
      qe, ke = _qmajor_indices(p, qi, kj, ql, kl, np)
      qm_q.append(int(qe))
      qm_k.append(int(ke))
  for kj in range(p.nk):
    for qi in range(p.nq):
      ke, qe = _kmajor_indices(p, kj, qi, ql, kl, np)
      km_k.append(int(ke))
      km_q.append(int(qe))
  return dict(pairs=pairs, qmajor_q=count_runs(qm_q), qmajor_kv=count_runs(qm_k),
              kmajor_kv=count_runs(km_k), kmajor_q=count_runs(km_q))


def cost_estimates(p: _Plan) -> dict[str, pl.CostEstimate]:
  """The CostEstimate of each kernel ("fwd", "dq", "dkv"); the rules are in the
  module doc."""
  sch = _schedule(p)
  segs = p.batch * p.nhb
  qb = np.dtype(p.q_dtype).itemsize
  kvb = np.dtype(p.kv_dtype).itemsize
  q_blk = p.bq * p.wq * qb  # q, o, dO, dQ blocks (all in q's dtype)
  kv_blk = p.bk * p.wk * kvb  # one of k, v, dK, dV
  row_blk = p.nh * p.bq * 4  # fp32 log-sum-exp or dO.O rows of a q block
  lens = 2 * p.batch * 4
  # Multiply-adds of one matmul kind.
  mac = p.bq * p.bk * p.dm * p.nh * sch["pairs"] * segs
  exps = p.bq * p.bk * p.nh * sch["pairs"] * segs
  fwd = pl.CostEstimate(
      flops=2 * 2 * mac,
      transcendentals=exps + p.bq * p.nh * sch["pairs"] * segs + p.lq_pad * p.nh * segs,
      bytes_accessed=segs * (sch["qmajor_q"] * q_blk + sch["qmajor_kv"] * 2 * kv_blk
                             + p.nq * (q_blk + row_blk)) + lens)
  dq = pl.CostEstimate(
      flops=2 * 3 * mac,
      transcendentals=exps,
      bytes_accessed=segs * (sch["qmajor_q"] * (3 * q_blk + row_blk)
                             + sch["qmajor_kv"] * 2 * kv_blk + p.nq * (q_blk + row_blk))
      + lens)
  dkv = pl.CostEstimate(
      flops=2 * 4 * mac,
      transcendentals=exps,
      bytes_accessed=segs * (sch["kmajor_kv"] * 2 * kv_blk
                             + sch["kmajor_q"] * (2 * q_blk + 2 * row_blk)
                             + p.nk * 2 * kv_blk) + lens)
  return dict(fwd=fwd, dq=dq, dkv=dkv)


# ------------------------------------------------------------------------- pallas calls


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _operand_specs(p: _Plan, blocks) -> dict[str, pl.BlockSpec]:
  """BlockSpecs of query-shaped (q), key-shaped (k) and row-statistic (r) operands.

  `blocks(i, j, q_len, kv_len)` maps the grid's two inner indices to the (query block,
  key block) that step reads, so skipped steps repeat the previous block (no DMA).
  """
  def q_map(b, hb, i, j, ql, kl):
    return b, blocks(i, j, ql[b], kl[b])[0], hb

  def kv_map(b, hb, i, j, ql, kl):
    return b, blocks(i, j, ql[b], kl[b])[1], hb

  def row_map(b, hb, i, j, ql, kl):
    return b, hb, 0, blocks(i, j, ql[b], kl[b])[0]

  return dict(q=pl.BlockSpec((None, p.bq, p.wq), q_map),
              k=pl.BlockSpec((None, p.bk, p.wk), kv_map),
              r=pl.BlockSpec((None, None, p.nh, p.bq), row_map))


def _qmajor_call(p: _Plan, kernel, name: str, operands: str, q_lens, kv_lens, *args):
  """The forward and dq kernels: a q-major grid writing q-shaped rows and row stats.

  `operands` names each array's blocking: q (query rows), k (key rows) or r (per-row
  statistics such as the log-sum-exp).
  """
  specs = _operand_specs(
      p, lambda qi, kj, ql, kl: _qmajor_indices(p, qi, kj, ql, kl, jnp))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(p.batch, p.nhb, p.nq, p.nk),
      in_specs=[specs[c] for c in operands],
      out_specs=[pl.BlockSpec((None, p.bq, p.wq),
                              lambda b, hb, qi, kj, ql, kl: (b, qi, hb)),
                 pl.BlockSpec((None, None, p.nh, p.bq),
                              lambda b, hb, qi, kj, ql, kl: (b, hb, 0, qi))],
      scratch_shapes=[pltpu.VMEM((p.nh, p.bq, _LANES), jnp.float32),
                      pltpu.VMEM((p.nh, p.bq, _LANES), jnp.float32),
                      pltpu.VMEM((p.bq, p.wq), jnp.float32)])
  q3 = args[0]
  return pl.pallas_call(
      functools.partial(kernel, p=p),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q3.shape, q3.dtype),
                 jax.ShapeDtypeStruct((p.batch, p.nhb, p.nh, p.lq_pad), jnp.float32)],
      compiler_params=_compiler_params(),
      cost_estimate=cost_estimates(p)[name],
      interpret=p.interpret,
      name=f"procir_flash_{name}",
  )(q_lens, kv_lens, *args)


def _fwd_call(p: _Plan, q3, k3, v3, q_lens, kv_lens):
  return _qmajor_call(p, _fwd_kernel, "fwd", "qkk", q_lens, kv_lens, q3, k3, v3)


def _dq_call(p: _Plan, q3, k3, v3, do3, o3, lse, q_lens, kv_lens):
  return _qmajor_call(p, _dq_kernel, "dq", "qkkqqr", q_lens, kv_lens,
                      q3, k3, v3, do3, o3, lse)


def _dkv_call(p: _Plan, q3, k3, v3, do3, lse, di, q_lens, kv_lens):
  specs = _operand_specs(
      p, lambda kj, qi, ql, kl: _kmajor_indices(p, kj, qi, ql, kl, jnp)[::-1])
  out_spec = pl.BlockSpec((None, p.bk, p.wk), lambda b, hb, kj, qi, ql, kl: (b, kj, hb))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(p.batch, p.nhb, p.nk, p.nq),
      in_specs=[specs[c] for c in "qkkqrr"],
      out_specs=[out_spec, out_spec],
      scratch_shapes=[pltpu.VMEM((p.bk, p.wk), jnp.float32),
                      pltpu.VMEM((p.bk, p.wk), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_dkv_kernel, p=p),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k3.shape, k3.dtype),
                 jax.ShapeDtypeStruct(v3.shape, v3.dtype)],
      compiler_params=_compiler_params(),
      cost_estimate=cost_estimates(p)["dkv"],
      interpret=p.interpret,
      name="procir_flash_dkv",
  )(q_lens, kv_lens, q3, k3, v3, do3, lse, di)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(p: _Plan, q3, k3, v3, q_lens, kv_lens):
  return _fwd_call(p, q3, k3, v3, q_lens, kv_lens)[0]


def _flash_fwd(p: _Plan, q3, k3, v3, q_lens, kv_lens):
  o3, lse = _fwd_call(p, q3, k3, v3, q_lens, kv_lens)
  return o3, (q3, k3, v3, q_lens, kv_lens, o3, lse)


def _flash_bwd(p: _Plan, res, do3):
  q3, k3, v3, q_lens, kv_lens, o3, lse = res
  do3 = do3.astype(q3.dtype)
  # The dQ kernel also returns D_i = sum_d dO * O, which the dK/dV kernel needs.
  dq, di = _dq_call(p, q3, k3, v3, do3, o3, lse, q_lens, kv_lens)
  dk, dv = _dkv_call(p, q3, k3, v3, do3, lse, di, q_lens, kv_lens)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------ the API


def make_plan(q_shape, k_shape, q_dtype, kv_dtype, *, scale: float, causal: bool,
              block_q: int = 512, block_k: int = 512, interpret: bool = False) -> _Plan:
  """The static plan `flash_attention` uses for these shapes (after any GQA repeat)."""
  b, lq, hq, d = q_shape
  _, lk, hkv, _ = k_shape
  if d % _LANES and hq != hkv:
    hkv = hq  # packed mode repeats K/V per query head
  bq, lq_pad = _block_and_padded_len(lq, block_q)
  bk, lk_pad = _block_and_padded_len(lk, block_k)
  return _Plan(batch=b, lq=lq, lk=lk, bq=bq, bk=bk, lq_pad=lq_pad, lk_pad=lk_pad, hq=hq,
               hkv=hkv, d=d, nkv=_kv_heads_per_block(hkv, d), causal=bool(causal),
               scale=float(scale), q_dtype=np.dtype(q_dtype).name,
               kv_dtype=np.dtype(kv_dtype).name, interpret=interpret)


def flash_attention(q, k, v, *, scale: float, causal: bool,
                    kv_lengths: jax.Array | None = None,
                    block_q: int = 512, block_k: int = 512,
                    interpret: bool = False) -> jax.Array:
  """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] with Hq a multiple of Hkv (grouped-query
  attention: query head h uses kv head h // (Hq // Hkv)). kv_lengths: optional [B]
  int32; keys at positions >= kv_lengths[b] are masked out (right padding). causal:
  query i sees keys j <= i (Lq == Lk). Returns [B, Lq, Hq, D] in q's dtype; the
  softmax and accumulation run in fp32.

  With kv_lengths and Lq == Lk, query rows >= kv_lengths[b] are padding: their output is
  0 and they pass no gradient (the reference would give them an average over real keys;
  callers discard them). `interpret=True` runs the Pallas interpreter (CPU tests).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention wants q [B, Lq, Hq, D] and k, v "
                     f"[B, Lk, Hkv, D]; got q {q.shape}, k {k.shape}, v {v.shape}.")
  b, lq, hq, d = q.shape
  _, lk, hkv, _ = k.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must both be "
                     f"[{b}, Lk, Hkv, {d}] to match q {q.shape}.")
  if hq % hkv:
    raise ValueError(f"flash_attention: {hq} query heads are not a multiple of "
                     f"{hkv} kv heads.")
  if causal and lq != lk:
    raise ValueError(f"flash_attention: causal attention needs Lq == Lk; "
                     f"got {lq} and {lk}.")
  if kv_lengths is not None and kv_lengths.shape != (b,):
    raise ValueError(f"flash_attention: kv_lengths must be [{b}]; "
                     f"got {kv_lengths.shape}.")

  p = make_plan(q.shape, k.shape, q.dtype, k.dtype, scale=scale, causal=causal,
                block_q=block_q, block_k=block_k, interpret=interpret)
  # Packed mode with grouped-query attention: one kv head per query head.
  if p.hkv != hkv:
    k = jnp.repeat(k, hq // hkv, axis=2)
    v = jnp.repeat(v, hq // hkv, axis=2)
  if kv_lengths is None:
    kv_lens = jnp.full((b,), lk, jnp.int32)
  else:
    kv_lens = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)
  q_lens = (kv_lens if (kv_lengths is not None and lq == lk)
            else jnp.full((b,), lq, jnp.int32))

  def flat(x, padded):
    # [B, L, H, D] -> [B, L, H*D] first: a caller whose q came from a [B, L, H*D]
    # projection then pays nothing for it (reshape of a reshape), and the pad is 3-D.
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * d)
    if padded != x.shape[1]:
      x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0)))
    return x

  o3 = _flash(p, flat(q, p.lq_pad), flat(k, p.lk_pad), flat(v, p.lk_pad), q_lens,
              kv_lens)
  return o3[:, :lq].reshape(b, lq, hq, d)
