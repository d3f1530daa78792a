"""The Pallas TPU flash attention against a pure-JAX reference, and its cost estimates.

The kernels run in the Pallas interpreter on CPU (`interpret=True`); one test compiles
them for a TPU topology with libtpu's compile-only devices, without a TPU.
"""

import os

# Compiling for a topology guards no chip, so it needs no exclusive hold on libtpu (as
# bench/tpu_compile.py): other processes that load libtpu may run at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.extend  # noqa: E402,F401
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from procir_jax.models.qwen3_5.kernels import tpu_flash_attention as fa  # noqa: E402
from procir_jax.models.qwen3_5.layers import reference_attention  # noqa: E402


def _inputs(b, lq, lk, hq, hkv, d, dtype, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, lq, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, lk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, lk, hkv, d), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (b, lq, hq, d), jnp.float32)  # output cotangent
  return q, k, v, w


def _real_rows(b, lq, lk, lengths):
  """[B, Lq, 1, 1] mask of the rows the kernel must match the reference on."""
  if lengths is None:
    return np.ones((b, lq, 1, 1), bool)
  lengths = np.asarray(lengths)
  if lq == lk:  # self-attention: rows at or beyond the length are padding
    rows = np.arange(lq)[None, :] < lengths[:, None]
  else:  # a row with no visible key is only required to be finite
    rows = np.broadcast_to((lengths > 0)[:, None], (b, lq))
  return rows[:, :, None, None]


def _out_and_grads(attn, q, k, v, w, rows, **kw):
  """attn's output and d(sum(out * w * rows))/d(q, k, v)."""
  def f(q, k, v):
    return attn(q, k, v, **kw)

  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp((w * rows).astype(out.dtype))


CASES = {
    # name: (b, lq, lk, hq, hkv, d, causal, kv_lengths)
    "bidir_packed_d64": (1, 200, 200, 2, 2, 64, False, None),
    "causal_aligned_gqa_d128": (1, 200, 200, 4, 2, 128, True, None),
    "bidir_packed_gqa_lengths": (2, 200, 200, 4, 2, 64, False, [150, 37]),
    "causal_gqa_lengths_empty_row": (2, 200, 200, 4, 2, 128, True, [150, 0]),
    "causal_packed_d32_gqa_lengths": (2, 130, 130, 2, 1, 32, True, [130, 70]),
    "cross_lq_ne_lk_lengths": (2, 100, 200, 2, 2, 64, False, [170, 0]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
  b, lq, lk, hq, hkv, d, causal, lengths = CASES[name]
  q, k, v, w = _inputs(b, lq, lk, hq, hkv, d, jnp.float32)
  kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  rows = _real_rows(b, lq, lk, lengths)
  common = dict(scale=d ** -0.5, causal=causal, kv_lengths=kv_lengths)

  # Blocks of 128, so the cases have several blocks and a padded last block.
  flash = jax.jit(lambda *a: _out_and_grads(
      fa.flash_attention, *a, **common, block_q=128, block_k=128, interpret=True))
  out, grads = flash(q, k, v, w, rows)
  ref_out, ref_grads = jax.jit(lambda *a: _out_and_grads(
      reference_attention, *a, **common))(q, k, v, w, rows)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert np.isfinite(np.asarray(out)).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, ref_out, 0),
                             rtol=1e-5, atol=1e-5)
  for name_, g, rg in zip("qkv", grads, ref_grads):
    scale_ = float(np.max(np.abs(rg))) or 1.0
    np.testing.assert_allclose(g / scale_, rg / scale_, rtol=1e-5, atol=1e-5,
                               err_msg=f"d{name_}")
  if lengths is not None and lq == lk:
    # Query padding rows give 0 (finite), and a batch row of length 0 is all padding.
    assert not np.asarray(out)[~np.broadcast_to(rows, out.shape)].any()


def test_matches_reference_bf16():
  """bf16 inputs: both kernel and reference are held to an fp32 reference of the same
  (bf16-rounded) inputs, within 1e-2 of the largest magnitude (measured: ~4e-3)."""
  b, length, hq, hkv, d = 2, 200, 4, 2, 128
  q, k, v, w = _inputs(b, length, length, hq, hkv, d, jnp.bfloat16, seed=1)
  rows = _real_rows(b, length, length, [200, 90])
  common = dict(scale=d ** -0.5, causal=True,
                kv_lengths=jnp.asarray([200, 90], jnp.int32))
  out, grads = jax.jit(lambda *a: _out_and_grads(
      fa.flash_attention, *a, **common, block_q=128, block_k=128, interpret=True))(
          q, k, v, w, rows)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref_out, ref_grads = jax.jit(lambda *a: _out_and_grads(
      reference_attention, *a, **common))(f32(q), f32(k), f32(v), w, rows)
  assert out.dtype == jnp.bfloat16
  for got, want in [(out, ref_out), *zip(grads, ref_grads)]:
    got = (np.where(rows, f32(got), 0) if got.shape == out.shape
           else np.asarray(f32(got)))
    want = np.where(rows, want, 0) if want.shape == out.shape else np.asarray(want)
    assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))


def test_block_sizes():
  # (length, requested block) -> (block, padded length)
  assert fa._block_and_padded_len(64, 512) == (128, 128)
  assert fa._block_and_padded_len(320, 512) == (384, 384)
  assert fa._block_and_padded_len(576, 512) == (384, 768)
  assert fa._block_and_padded_len(1536, 512) == (512, 1536)
  assert fa._block_and_padded_len(200, 100) == (128, 256)  # at least one 128-lane tile
  assert fa._kv_heads_per_block(12, 64) == 2  # vision: two D=64 heads fill 128 lanes
  assert fa._kv_heads_per_block(2, 256) == 1  # decoder
  assert fa._kv_heads_per_block(3, 32) == 3  # no divisor fills a tile: all heads


def _plan(b, length, hq, hkv, d, causal, block):
  return fa.make_plan((b, length, hq, d), (b, length, hkv, d), jnp.bfloat16,
                      jnp.bfloat16, scale=1.0, causal=causal, block_q=block,
                      block_k=block)


def test_cost_estimates_bidirectional():
  """B=2, L=256 in blocks of 128 (2 x 2 blocks, all computed), Hq=4, Hkv=2,
  D=128, bf16."""
  b, length, hq, hkv, d = 2, 256, 4, 2, 128
  est = fa.cost_estimates(_plan(b, length, hq, hkv, d, False, 128))
  qbytes = b * length * hq * d * 2  # q, o, dO, dQ (bf16)
  kvbytes = b * length * hkv * d * 2  # each of k, v, dK, dV
  rowbytes = b * hq * length * 4  # fp32 log-sum-exp or dO.O
  lens = 2 * b * 4
  # Multiply-adds of one [L, L] x D matmul over all heads.
  attn = b * hq * length * length * d
  assert est["fwd"].flops == 2 * 2 * attn
  assert est["dq"].flops == 2 * 3 * attn
  assert est["dkv"].flops == 2 * 4 * attn
  # exps of the scores, plus per (pair, row) rescale exps and one log per row (forward).
  assert est["fwd"].transcendentals == b * hq * (length * length + 4 * 128 + length)
  assert est["dq"].transcendentals == est["dkv"].transcendentals == (
      b * hq * length * length)
  # Forward: q read once, k and v once per q block (2), o and lse written once.
  assert est["fwd"].bytes_accessed == (qbytes + 2 * 2 * kvbytes + qbytes + rowbytes
                                       + lens)
  # dQ: q, dO, O and lse once; k, v once per q block; dQ and dO.O written.
  assert est["dq"].bytes_accessed == (3 * qbytes + rowbytes + 2 * 2 * kvbytes + qbytes
                                      + rowbytes + lens)
  # dK/dV: k, v once; q, dO, lse, dO.O once per kv block (2); dK, dV written.
  assert est["dkv"].bytes_accessed == (2 * kvbytes + 2 * (2 * qbytes + 2 * rowbytes)
                                       + 2 * kvbytes + lens)


def test_cost_estimates_causal():
  """B=1, L=384 in 3 x 3 blocks of 128, causal: the 6 blocks on or below the diagonal
  are computed. Hq=2 sharing one kv head (one grid step holds both), D=128, bf16."""
  b, length, hq, hkv, d, blk = 1, 384, 2, 1, 128, 128
  est = fa.cost_estimates(_plan(b, length, hq, hkv, d, True, blk))
  pairs = 6
  qblk = blk * hq * d * 2
  kvblk = blk * hkv * d * 2
  rowblk = hq * blk * 4
  lens = 2 * b * 4
  mac = pairs * blk * blk * d * hq
  assert est["fwd"].flops == 4 * mac and est["dq"].flops == 6 * mac
  assert est["dkv"].flops == 8 * mac
  assert est["fwd"].transcendentals == hq * (pairs * blk * blk + pairs * blk + length)
  # kv blocks fetched in the forward / dQ order (q block, kv block), skipped steps
  # repeating or prefetching: q0: 0 (0 0 repeat); q1: 0 1 (then prefetch 0);
  # q2: (0 already there) 1 2  -> 0, 1, 0, 1, 2 = 5 fetches; q blocks 3.
  assert est["fwd"].bytes_accessed == (3 * qblk + 5 * 2 * kvblk + 3 * (qblk + rowblk)
                                       + lens)
  assert est["dq"].bytes_accessed == (3 * (3 * qblk + rowblk) + 5 * 2 * kvblk
                                      + 3 * (qblk + rowblk) + lens)
  # dK/dV order (kv block, q block), q blocks above the diagonal skipped: k0: q 0 1 2;
  # k1: q (1) 1 2; k2: q (2 2) 2 -> sequence 0 1 2 1 1 2 2 2 2 = 5 fetches; kv blocks 3.
  assert est["dkv"].bytes_accessed == (3 * 2 * kvblk + 5 * (2 * qblk + 2 * rowblk)
                                       + 3 * 2 * kvblk + lens)


def test_no_quadratic_arrays_in_jaxpr():
  """Nothing of [B, H, L, L] size in the traced fwd + bwd program (kernels included)."""
  b, length, hq, hkv, d = 1, 4096, 2, 1, 128
  q, k, v, _ = _inputs(b, length, length, hq, hkv, d, jnp.bfloat16)

  def loss(q, k, v):
    out = fa.flash_attention(q, k, v, scale=0.1, causal=True)
    return jnp.sum(out.astype(jnp.float32))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  biggest = 0
  stack = [jaxpr.jaxpr]
  while stack:
    jx = stack.pop()
    for eqn in jx.eqns:
      for var in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        stack.append(sub)
  # The largest arrays are q / o / dq ([B, L, Hq*D]); a score block is 512 x 512.
  assert biggest < b * hq * length * length // 16, biggest


def test_compiles_for_tpu_with_cost_analysis():
  """Compile (not run) fwd + bwd for a v5e chip; the kernels' estimates reach XLA."""
  from jax.experimental import topologies

  dev = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(dev)
  b, length, hq, hkv, d = 1, 2048, 2, 1, 128

  def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def grads(q, k, v):
    def loss(q, k, v):
      out = fa.flash_attention(q, k, v, scale=d ** -0.5, causal=True)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  compiled = jax.jit(grads).trace(spec((b, length, hq, d)), spec((b, length, hkv, d)),
                                  spec((b, length, hkv, d))).lower().compile()
  cost = compiled.cost_analysis()
  est = fa.cost_estimates(_plan(b, length, hq, hkv, d, True, 512))
  est_flops = sum(e.flops for e in est.values())
  est_bytes = sum(e.bytes_accessed for e in est.values())
  # Causal fwd (2 matmuls) + bwd (4), 2 flops/MAC.
  analytic = 12 * b * hq * length * length * d // 2
  assert cost["flops"] >= analytic
  # The kernels' estimates are what XLA adds up (the rest is a few elementwise ops).
  assert est_flops <= cost["flops"] <= 1.05 * est_flops
  assert cost["bytes accessed"] >= est_bytes
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < b * hq * length * length * 4 // 16, temp
