"""The Pallas TPU gated delta rule against pure-JAX versions, and its cost estimates.

The kernels run in the Pallas interpreter on CPU (`interpret=True`); one test compiles
them for a TPU topology with libtpu's compile-only devices, without a TPU.
"""

import os

# Compiling for a topology guards no chip, so it needs no exclusive hold on libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.extend  # noqa: E402,F401
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

from procir_jax.models.qwen3_5 import gated_delta  # noqa: E402
from procir_jax.models.qwen3_5.kernels import tpu_gated_delta as tgd  # noqa: E402

D = 128  # the only head size the kernel takes (a multiple of 128)
NAMES = ("q", "k", "v", "g", "beta")


def _inputs(b, length, hk, hv, seed=0, decay=0.3, lengths=None):
  """Unit-scale inputs: unit-norm q and k (q not scaled by Dk^-1/2, so the output and
  every gradient are of order one), v ~ N(0, 1), g = -decay * lognormal, beta in (0, 1).
  With `lengths`, rows are right-padded as the decoder pads them: q, k, v zero and
  g = beta = 0 after a row's length."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, length, hk, D))
  k = rng.normal(size=(b, length, hk, D))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(b, length, hv, D))
  g = -decay * np.exp(rng.normal(size=(b, length, hv)))
  beta = 1 / (1 + np.exp(-rng.normal(size=(b, length, hv))))
  if lengths is not None:
    keep = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    q, k, v = (x * keep[:, :, None, None] for x in (q, k, v))
    g, beta = g * keep[:, :, None], beta * keep[:, :, None]
  return [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]


def _out_and_grads(fn, args, seed=1):
  """fn's output and the gradients of sum(out * w) for a random w (fp32 numbers)."""
  w = jax.random.normal(jax.random.key(seed), args[2].shape)

  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * w)

  out = jax.jit(fn)(*args)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)
  return out, grads


def _kernel(chunk):
  return lambda *a: tgd.chunk_gated_delta_rule(*a, chunk_size=chunk, interpret=True)


def _recurrent(*a):
  return gated_delta.recurrent_gated_delta_rule(*a)[0]


def _assert_close_fp32(got, want, atol=1e-5):
  out, grads = got
  ref_out, ref_grads = want
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0, err_msg="out")
  for name, a, b in zip(NAMES, grads, ref_grads):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("b,length,hk,hv,chunk,lengths", [
    (1, 70, 1, 2, 32, None),  # a partial last chunk; two value heads per key head
    (2, 130, 2, 2, 64, None),  # the default chunk: 3 chunks, 2 tokens in the last
    (2, 70, 1, 2, 16, [70, 41]),  # right-padded second row, groups
])
def test_matches_recurrent_fp32(b, length, hk, hv, chunk, lengths):
  args = _inputs(b, length, hk, hv, seed=length, lengths=lengths)
  _assert_close_fp32(_out_and_grads(_kernel(chunk), args),
                     _out_and_grads(_recurrent, args))


def test_several_blocks_and_the_saved_states_fallback(monkeypatch):
  """Rows of several blocks (the backward's block order, the state carried across grid
  steps), in both backward modes: the VMEM sweep and the fallback that saves states."""
  args = _inputs(1, 130, 1, 2, seed=5)
  want = _out_and_grads(_recurrent, args)
  monkeypatch.setattr(tgd, "_MAX_BLOCK_TOKENS", 64)  # 5 chunks of 32 -> 3 blocks of 2
  plan = tgd.make_plan(args[0].shape, args[2].shape, jnp.float32, chunk_size=32)
  assert (plan.nb, plan.ncb, plan.save_states) == (3, 2, False)
  _assert_close_fp32(_out_and_grads(_kernel(32), args), want)

  monkeypatch.setattr(tgd, "_STATE_VMEM_BUDGET", 0)
  plan = tgd.make_plan(args[0].shape, args[2].shape, jnp.float32, chunk_size=32)
  assert plan.save_states
  _assert_close_fp32(_out_and_grads(_kernel(32), args), want)


def test_bf16_matches_pure_jax_chunked():
  """bf16 q, k, v on both sides: the kernel against gated_delta.chunk_gated_delta_rule
  at DEFAULT precision (bf16 operands, fp32 accumulation), and both against fp32 on the
  same bf16-rounded inputs. (On CPU the pure-JAX DEFAULT keeps fp32 operands in fp32,
  where the kernel, like XLA on TPU, rounds them to bf16: the two differ by bf16
  rounding, not by their math.)"""
  args = _inputs(2, 70, 1, 2, seed=3, lengths=[70, 50])
  low = [x.astype(jnp.bfloat16) for x in args[:3]] + args[3:]
  high = [x.astype(jnp.float32) for x in low]
  got = _out_and_grads(_kernel(32), low)
  pure = _out_and_grads(lambda *a: gated_delta.chunk_gated_delta_rule(
      *a, chunk_size=32, precision=lax.Precision.DEFAULT)[0], low)
  exact = _out_and_grads(_recurrent, high)
  assert got[0].dtype == jnp.bfloat16

  def rel(a, b):
    a, b = np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  for name, a, b, c in zip(("out",) + NAMES, [got[0], *got[1]], [pure[0], *pure[1]],
                           [exact[0], *exact[1]]):
    assert a.dtype == b.dtype, name
    # Measured: kernel vs pure JAX <= 3.2e-3, either vs fp32 <= 3.8e-3 (the bf16
    # rounding of the output and of every derived operand).
    assert rel(a, b) < 8e-3, (name, rel(a, b))
    assert rel(a, c) < 1e-2, (name, rel(a, c))
    assert rel(b, c) < 1e-2, (name, rel(b, c))


def test_nearly_parallel_keys():
  """Keys almost aligned, beta near 1, no decay: the hardest case for the within-chunk
  inverse (a power series in M would cancel catastrophically). Forward only."""
  q, k, v, g, beta = _inputs(1, 128, 1, 1, seed=9, decay=1e-4)
  k = k * 0.05 + jnp.ones_like(k)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jnp.full_like(beta, 0.99)
  out = jax.jit(_kernel(64))(q, k, v, g, beta)
  np.testing.assert_allclose(out, _recurrent(q, k, v, g, beta), atol=1e-5, rtol=0)


def test_supported_shapes_and_errors():
  assert tgd.supported((2, 64, 16, 128), (2, 64, 16, 128))
  assert tgd.supported((2, 64, 8, 256), (2, 64, 16, 128))
  assert not tgd.supported((2, 64, 4, 64), (2, 64, 4, 64))
  assert not tgd.supported((2, 64, 4, 128), (2, 64, 6, 128))  # Hv not a multiple of Hk
  q = jnp.zeros((1, 16, 2, 64), jnp.float32)
  g = jnp.zeros((1, 16, 2), jnp.float32)
  with pytest.raises(ValueError, match="multiples of 128"):
    tgd.chunk_gated_delta_rule(q, q, q, g, g)
  q = jnp.zeros((1, 16, 2, 128), jnp.float32)
  with pytest.raises(ValueError, match="chunk_size"):
    tgd.chunk_gated_delta_rule(q, q, q, g, g, chunk_size=48)
  with pytest.raises(ValueError, match="g .* and beta"):
    tgd.chunk_gated_delta_rule(q, q, q, g[:, :8], g)


def _largest_outside_kernels(jaxpr):
  """Shapes of every value the traced program holds outside Pallas kernels."""
  shapes = []
  stack = [jaxpr.jaxpr]
  while stack:
    jx = stack.pop()
    for eqn in jx.eqns:
      shapes += [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
      if eqn.primitive.name != "pallas_call":
        stack += list(jax.extend.core.jaxprs_in_params(eqn.params))
  return shapes


def test_nothing_per_chunk_in_hbm():
  """Outside the kernels the fwd + bwd program holds no per-chunk state [.., Dk, Dv]
  and no [.., C, C] term: the custom VJP keeps only its inputs."""
  b, length, h, c = 2, 320, 2, 64
  args = _inputs(b, length, h, h)

  def loss(*a):
    return jnp.sum(tgd.chunk_gated_delta_rule(*a, chunk_size=c) ** 2)

  shapes = _largest_outside_kernels(jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(
      *args))
  assert not [s for s in shapes if s[-2:] in ((D, D), (c, c))]
  assert max(int(np.prod(s)) for s in shapes) <= b * length * h * D


def _macs_per_chunk(c, d, fp32):
  """Independent count of one chunk's matmuls (one value head), D = Dk = Dv, C = 64."""
  cc_d, c_dd = c * c * d, c * d * d  # a [C, C] x [C, D] and a [C, D] x [D, D] product
  # The inverse's doubling: levels 2, 4, 8 on [16, C] x [C, C] (two products each),
  # levels 16, 32 on the [32, C] odd-block rows (two [32, C] x [C, C] each); three
  # bf16 passes a product with bf16 inputs.
  inverse = (3 * 2 * 16 * c * c + 2 * 2 * 32 * c * c) * (1 if fp32 else 3)
  decay = 3 * c ** 3 if fp32 else 0  # fp32: g's segment sums, three bf16 passes
  fwd = 4 * cc_d + 3 * c_dd + inverse + decay
  sweep = 2 * cc_d + 2 * c_dd + inverse + decay  # K K^T, T R; K S0, K^T U
  grads = 9 * cc_d + 7 * c_dd + decay
  return fwd, sweep + grads


def test_cost_estimates():
  """B=2, L=130 (3 chunks of 64, one block), Hk=1, Hv=2, D=128, bf16."""
  b, length, hk, hv, c = 2, 130, 1, 2, 64
  p = tgd.make_plan((b, length, hk, D), (b, length, hv, D), jnp.bfloat16, chunk_size=c)
  est = tgd.cost_estimates(p)
  n, lp = 3, 192
  fwd_macs, bwd_macs = _macs_per_chunk(c, D, fp32=False)
  assert est["fwd"].flops == 2 * fwd_macs * b * hv * n
  assert est["bwd"].flops == 2 * bwd_macs * b * hv * n
  assert est["fwd"].transcendentals == (c * c + c) * b * hv * n  # exps of D and a
  assert est["bwd"].transcendentals == 2 * (c * c + c) * b * hv * n
  qk = b * lp * hk * D * 2  # q or k, bf16, read once per row: both value heads share it
  vo = b * lp * hv * D * 2  # v, out, dO, dv
  rows = b * hv * lp * 4  # g, beta, dg, dbeta
  # dq, dk per value head, fp32 (summed over the group outside).
  dqk = b * lp * hv * D * 4
  assert est["fwd"].bytes_accessed == 2 * qk + vo + 2 * rows + vo
  assert est["bwd"].bytes_accessed == (2 * qk + 2 * vo + 2 * rows + 2 * dqk + vo
                                       + 2 * rows)

  # fp32, one key head per value head, rows of 3 blocks (5 chunks of 64 -> 3 x 2):
  # the backward reads k, v, g, beta in 2 * 3 - 1 runs (the turn shares a block).
  tgd_max = tgd._MAX_BLOCK_TOKENS
  try:
    tgd._MAX_BLOCK_TOKENS = 128
    p = tgd.make_plan((1, 320, 2, D), (1, 320, 2, D), jnp.float32, chunk_size=c)
  finally:
    tgd._MAX_BLOCK_TOKENS = tgd_max
  assert (p.nb, p.ncb) == (3, 2)
  est = tgd.cost_estimates(p)
  fwd_macs, bwd_macs = _macs_per_chunk(c, D, fp32=True)
  assert est["fwd"].flops == 2 * fwd_macs * 2 * 6
  blk = 128 * D * 4  # one [128, D] fp32 block
  rblk = 128 * 4
  per_head_fwd = 3 * (3 * blk + 2 * rblk) + 3 * blk
  per_head_bwd = 5 * (2 * blk + 2 * rblk) + 3 * (2 * blk) + 3 * (3 * blk + 2 * rblk)
  assert est["fwd"].bytes_accessed == 2 * per_head_fwd
  assert est["bwd"].bytes_accessed == 2 * per_head_bwd


def test_compiles_for_tpu_with_cost_analysis():
  """Compile (not run) fwd + bwd for a v5e chip; the kernels' estimates reach XLA."""
  from jax.experimental import topologies

  dev = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(dev)
  b, length, h, c = 2, 320, 4, 64

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  def grads(*a):
    def loss(*a):
      return jnp.sum(tgd.chunk_gated_delta_rule(*a, chunk_size=c).astype(jnp.float32)
                     ** 2)
    return jax.grad(loss, argnums=tuple(range(5)))(*a)

  args = ([spec((b, length, h, D), jnp.bfloat16)] * 3
          + [spec((b, length, h), jnp.float32)] * 2)
  compiled = jax.jit(grads).trace(*args).lower().compile()
  cost = compiled.cost_analysis()
  p = tgd.make_plan((b, length, h, D), (b, length, h, D), jnp.bfloat16, chunk_size=c)
  est = tgd.cost_estimates(p)
  est_flops = sum(e.flops for e in est.values())
  est_bytes = sum(e.bytes_accessed for e in est.values())
  # The chunked algorithm's own products (no recomputation, no inverse), 2 flops per
  # multiply-add: forward 4 C^2 D + 3 C D^2, backward 7 C^2 D + 6 C D^2 per chunk.
  chunks = b * h * length // c
  analytic = 2 * chunks * (11 * c * c * D + 9 * c * D * D)
  assert cost["flops"] >= analytic
  # XLA adds up the kernels' estimates (and a few elementwise ops around them).
  assert est_flops <= cost["flops"] <= 1.05 * est_flops
  assert cost["bytes accessed"] >= est_bytes
  # No per-chunk states or [C, C] terms in HBM: the temporaries are far below one fp32
  # state per chunk, row and head.
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < chunks * D * D * 4 // 4, temp


@pytest.mark.parametrize("c", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unit_lower_inverse(c, dtype):
  """The kernel's inverse (plain jnp outside a kernel): HIGHEST products with fp32
  inputs, three bf16 passes (HIGH) with bf16 inputs."""
  rng = np.random.default_rng(c)
  m = np.tril(rng.normal(size=(c, c)) * 0.3, -1).astype(np.float32)
  p = tgd.make_plan((1, c, 1, D), (1, c, 1, D), dtype, chunk_size=c)
  inv = jax.jit(lambda x: tgd._unit_lower_inverse(x, p))(jnp.asarray(m))
  ref = np.linalg.inv(np.eye(c) + m.astype(np.float64))
  tol = 1e-5 if dtype == jnp.float32 else 1e-4
  np.testing.assert_allclose(inv, ref, atol=tol * np.abs(ref).max())


def test_per_shard_on_a_mesh():
  """As the decoder calls it: `sharding.per_shard` runs the kernel on each device's rows
  and heads of a (data, tensor) mesh; forward and gradients match the recurrent form."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from procir_jax import sharding

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ("data", "tensor", "fsdp"))
  args = _inputs(4, 40, 2, 2, seed=2)
  args = [jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor")))
          for x in args]

  def kernel(*a):
    return sharding.per_shard(_kernel(16), *a, head_dims=(2,) * 5)

  with sharding.mesh_context(mesh):
    got = _out_and_grads(kernel, args)
  _assert_close_fp32(got, _out_and_grads(_recurrent, args))
