"""The chunked gated delta rule against the per-token recurrent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from procir_jax.models.qwen3_5 import gated_delta

# Jitted: one compile per shape is cheaper than eager dispatch of the scan.
chunked = jax.jit(gated_delta.chunk_gated_delta_rule,
                  static_argnames="chunk_size")
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


@pytest.mark.parametrize("length,chunk,heads", [
    (1, 64, (2, 2)), (63, 64, (2, 4)), (64, 64, (2, 2)), (100, 32, (2, 4)),
    (77, 16, (1, 3))])
def test_chunked_matches_recurrent(length, chunk, heads):
  args = _inputs(2, length, heads[0], heads[1], 16, 8)
  out_r, state_r = recurrent(*args)
  out_c, state_c = chunked(*args, chunk_size=chunk)
  assert out_c.shape == (2, length, heads[1], 8)
  np.testing.assert_allclose(out_c, out_r, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(state_c, state_r, atol=2e-5, rtol=1e-4)


def test_initial_state_and_slow_decay():
  # Near-zero decay keeps the state long-lived; start from a non-zero state.
  args = _inputs(1, 90, 2, 2, 8, 8, seed=3, decay=1e-3)
  init = jax.random.normal(jax.random.key(0), (1, 2, 8, 8))
  out_r, state_r = recurrent(*args, init)
  out_c, state_c = chunked(*args, init,
                                                      chunk_size=32)
  np.testing.assert_allclose(out_c, out_r, atol=5e-5, rtol=1e-4)
  np.testing.assert_allclose(state_c, state_r, atol=5e-5, rtol=1e-4)


def test_splitting_the_sequence_carries_the_state():
  args = _inputs(1, 80, 2, 2, 8, 8, seed=4)
  whole, _ = chunked(*args, chunk_size=16)
  first, state = chunked(
      *[a[:, :30] for a in args], chunk_size=16)
  second, _ = chunked(
      *[a[:, 30:] for a in args], state, chunk_size=16)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole,
                             atol=2e-5, rtol=1e-4)


def test_bf16_inputs_run_in_fp32():
  args = [a.astype(jnp.bfloat16) for a in _inputs(1, 40, 2, 2, 8, 8)]
  out, state = chunked(*args, chunk_size=16)
  assert out.dtype == jnp.float32 and state.dtype == jnp.float32


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


def test_gradients_agree():
  args = _inputs(1, 40, 2, 2, 8, 8, seed=6)

  def loss(fn, *a):
    out, _ = fn(*a)
    return jnp.sum(jnp.sin(out))

  def by_chunk(*a):
    return gated_delta.chunk_gated_delta_rule(*a, chunk_size=16)

  grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a),
                                     argnums=(0, 1, 2, 3, 4)))(*args)
  for a, b in zip(grad(by_chunk),
                  grad(gated_delta.recurrent_gated_delta_rule)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


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
