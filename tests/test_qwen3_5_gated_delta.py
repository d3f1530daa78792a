"""The chunked gated delta rule against the per-token recurrent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from procir_jax.models.qwen3_5 import gated_delta

# Jitted: one compile per shape is cheaper than eager dispatch of the scan.
chunked = jax.jit(gated_delta.chunk_gated_delta_rule,
                  static_argnames=("chunk_size", "precision"))
recurrent = jax.jit(gated_delta.recurrent_gated_delta_rule)


def _inputs(b, length, hk, hv, dk, dv, seed=0, decay=0.3):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, length, hk, dk))
  k = rng.normal(size=(b, length, hk, dk))
  q /= np.linalg.norm(q, axis=-1, keepdims=True) * np.sqrt(dk)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(b, length, hv, dv))
  g = -decay * np.exp(rng.normal(size=(b, length, hv)))
  beta = 1 / (1 + np.exp(-rng.normal(size=(b, length, hv))))
  return [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]


def _loss_and_grads(fn, args, seed=1):
  """Gradients of a random linear function of (output, final state)."""
  out, state = fn(*args)
  k1, k2 = jax.random.split(jax.random.key(seed))
  ct_out = jax.random.normal(k1, out.shape)
  ct_state = jax.random.normal(k2, state.shape)

  def loss(*a):
    o, s = fn(*a)
    return jnp.sum(o.astype(jnp.float32) * ct_out) + jnp.sum(s * ct_state)

  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def _chunked_fn(chunk_size, precision=lax.Precision.HIGHEST):
  return lambda *a: gated_delta.chunk_gated_delta_rule(
      *a, chunk_size=chunk_size, precision=precision)


@pytest.mark.parametrize("length,chunk,heads", [
    (1, 64, (2, 2)), (63, 64, (2, 4)), (64, 64, (2, 2)), (100, 32, (2, 4)),
    (77, 16, (1, 3))])
def test_chunked_matches_recurrent(length, chunk, heads):
  args = _inputs(2, length, heads[0], heads[1], 16, 8)
  out_r, state_r = recurrent(*args)
  out_c, state_c = chunked(*args, chunk_size=chunk)
  assert out_c.shape == (2, length, heads[1], 8)
  assert out_c.dtype == jnp.float32 and state_c.dtype == jnp.float32
  np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=0)
  np.testing.assert_allclose(state_c, state_r, atol=1e-5, rtol=0)


def test_initial_state_and_slow_decay():
  # Near-zero decay keeps the state long-lived; start from a non-zero state.
  args = _inputs(1, 90, 2, 2, 8, 8, seed=3, decay=1e-3)
  init = jax.random.normal(jax.random.key(0), (1, 2, 8, 8))
  out_r, state_r = recurrent(*args, init)
  out_c, state_c = chunked(*args, init, chunk_size=32)
  np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=0)
  np.testing.assert_allclose(state_c, state_r, atol=1e-5, rtol=0)


def test_splitting_the_sequence_carries_the_state():
  args = _inputs(1, 80, 2, 2, 8, 8, seed=4)
  whole, _ = chunked(*args, chunk_size=16)
  first, state = chunked(*[a[:, :30] for a in args], chunk_size=16)
  second, _ = chunked(*[a[:, 30:] for a in args], state, chunk_size=16)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole,
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("length,chunk,heads,with_init", [
    (40, 16, (2, 2), False),   # several chunks, a partial last chunk
    (50, 16, (2, 4), True),    # head expansion and an initial state
    (5, 16, (1, 1), True),     # one partial chunk
    (64, 32, (1, 2), False),   # a multiple of the chunk size
])
def test_gradients_match_recurrent(length, chunk, heads, with_init):
  args = _inputs(2, length, heads[0], heads[1], 8, 6, seed=length)
  if with_init:
    args.append(jax.random.normal(jax.random.key(7), (2, heads[1], 8, 6)))
  want = _loss_and_grads(gated_delta.recurrent_gated_delta_rule, args)
  got = _loss_and_grads(_chunked_fn(chunk), args)
  for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], got,
                        want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def test_gradients_of_right_padded_rows():
  # The decoder zeroes q, k, v after a row's length (g and beta stay as the
  # projections give them).
  q, k, v, g, beta = _inputs(3, 45, 2, 4, 8, 6, seed=11)
  keep = (jnp.arange(45)[None, :] < jnp.array([45, 20, 33])[:, None])
  q, k, v = (jnp.where(keep[..., None, None], x, 0.0) for x in (q, k, v))
  args = [q, k, v, g, beta]
  out_r, state_r = recurrent(*args)
  out_c, state_c = gated_delta.chunk_gated_delta_rule(*args, chunk_size=16)
  np.testing.assert_allclose(out_c, out_r, atol=1e-5, rtol=0)
  np.testing.assert_allclose(state_c, state_r, atol=1e-5, rtol=0)
  want = _loss_and_grads(gated_delta.recurrent_gated_delta_rule, args)
  got = _loss_and_grads(_chunked_fn(16), args)
  for name, a, b in zip(["q", "k", "v", "g", "beta"], got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def test_bf16_inputs_are_close_to_fp32():
  # bf16 q, k, v (fp32 g, beta) on the bf16 path: DEFAULT precision. The
  # reference is the fp32 path on the same (bf16-rounded) inputs.
  q, k, v, g, beta = _inputs(2, 70, 2, 4, 32, 16, seed=3)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)] + [g, beta]
  high = [x.astype(jnp.float32) for x in low]
  out_l, state_l = chunked(*low, chunk_size=32,
                           precision=lax.Precision.DEFAULT)
  out_h, state_h = chunked(*high, chunk_size=32)
  assert out_l.dtype == jnp.bfloat16 and state_l.dtype == jnp.float32
  np.testing.assert_allclose(out_l.astype(jnp.float32), out_h, atol=5e-3)
  np.testing.assert_allclose(state_l, state_h, atol=1e-2)

  got = _loss_and_grads(_chunked_fn(32, lax.Precision.DEFAULT), low)
  want = _loss_and_grads(_chunked_fn(32), high)
  for name, a, b in zip(["q", "k", "v", "g", "beta"], got, want):
    assert a.dtype == (jnp.bfloat16 if name in "qkv" else jnp.float32), name
    a = np.asarray(a.astype(jnp.float32))
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 2e-2, (name, rel)


def test_residuals_are_the_inputs_and_chunk_states():
  # The custom VJP keeps the inputs and one state per chunk; autodiff of the
  # chunked form would keep [.., C, C] matrices per chunk (and more).
  c, length, dk, dv = 16, 40, 8, 4
  args = _inputs(2, length, 2, 4, dk, dv)
  fn = jax.jit(lambda *a: jax.vjp(_chunked_fn(c), *a))
  _, vjp_fn = fn(*args)
  leaves = jax.tree.leaves(vjp_fn)
  assert not [x.shape for x in leaves if x.shape[-2:] == (c, c)]
  n = -(-length // c)
  bound = (sum(x.size for x in args) * c * n / length  # padded inputs
           + 2 * 4 * n * dk * dv  # one fp32 state per chunk, row and head
           + 16)  # and a few scalars (the padding's)
  assert sum(x.size for x in leaves) <= bound


def test_no_gathers_or_scatters():
  args = _inputs(1, 40, 2, 4, 8, 4)
  grad = jax.grad(lambda *a: jnp.sum(gated_delta.chunk_gated_delta_rule(
      *a, chunk_size=16)[0]), argnums=tuple(range(5)))
  text = jax.jit(grad).lower(*args).as_text()
  assert "gather" not in text and "scatter" not in text
  text = jax.jit(gated_delta.unit_lower_inverse).lower(
      jnp.zeros((3, 64, 64))).as_text()
  assert "gather" not in text and "scatter" not in text
  assert "while" not in text


def test_partitions_over_batch_and_heads_without_communication():
  # Rows and heads are independent: on a (data, tensor) mesh the forward and
  # backward must need no collectives (a loop that sliced the batch or head
  # axis would make XLA gather them).
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  args = _inputs(8, 40, 2, 4, 8, 4)
  args = [jax.device_put(x, NamedSharding(
      mesh, P("data", None, "tensor", *([None] * (x.ndim - 3)))))
          for x in args]
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(gated_delta.chunk_gated_delta_rule(
      *a, chunk_size=16)[0]), argnums=tuple(range(5))))
  text = grad.lower(*args).compile().as_text()
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert op not in text, op


def test_recurrent_matches_transformers_reference():
  torch = pytest.importorskip("torch")
  from transformers.models.qwen3_5 import modeling_qwen3_5 as ref

  args = _inputs(2, 37, 2, 4, 16, 8, seed=5)
  ours, _ = recurrent(*args)
  # The reference normalises and scales q/k itself; undo our scaling of q.
  q, k, v, g, beta = (torch.tensor(np.asarray(a)) for a in args)
  theirs, _ = ref.torch_recurrent_gated_delta_rule(
      q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [64, 48, 5])
def test_unit_lower_inverse(size):
  rng = np.random.default_rng(size)
  m = np.tril(rng.normal(size=(3, size, size)) * 0.3, -1).astype(np.float32)
  inv = jax.jit(gated_delta.unit_lower_inverse)(jnp.asarray(m))
  ref = np.linalg.inv(np.eye(size) + m.astype(np.float64))
  np.testing.assert_allclose(inv, ref, atol=1e-5 * np.abs(ref).max())


def test_chunked_with_nearly_parallel_keys():
  # Keys almost aligned, beta near 1, no decay: the hardest case for the
  # intra-chunk inverse (large cancellations if done by power series).
  q, k, v, g, beta = _inputs(1, 128, 2, 2, 16, 8, seed=9, decay=1e-4)
  k = k * 0.05 + jnp.ones_like(k)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jnp.full_like(beta, 0.99)
  out_r, _ = recurrent(q, k, v, g, beta)
  out_c, _ = chunked(q, k, v, g, beta, chunk_size=64)
  np.testing.assert_allclose(out_c, out_r, atol=1e-4, rtol=1e-3)
