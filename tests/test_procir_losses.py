"""ProCIR's language-model loss scores whole targets, however long."""

import jax
import jax.numpy as jnp
import numpy as np

from procir_jax import procir


class _Head:
  """Stands in for the model: lm_loss only projects states onto the vocabulary."""

  def __init__(self, weight):
    self.weight = weight

  def lm_logits(self, states):
    return states @ self.weight


def _reference(weight, hidden, input_ids, loss_mask):
  """Full logits over the whole sequence, averaged over the marked next tokens."""
  logits = hidden[:, :-1] @ weight
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                             input_ids[:, 1:, None], axis=-1)[..., 0]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  return (nll * mask).sum() / mask.sum()


def test_long_targets_are_scored_whole_in_chunks():
  rng = np.random.default_rng(0)
  batch, length, dim, vocab = 3, 40, 8, 11
  hidden = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
  input_ids = jnp.asarray(rng.integers(0, vocab, (batch, length)))
  mask = np.zeros((batch, length), bool)
  mask[0, 5:35] = True  # 30 targets: longer than several chunks
  mask[1, [3, 9, 20]] = True  # scattered
  loss_mask = jnp.asarray(mask)  # row 2 has none

  def ours(weight, hidden):
    return procir.lm_loss(_Head(weight), hidden, input_ids, loss_mask, 8)

  expected = _reference(weight, hidden, input_ids, loss_mask)
  np.testing.assert_allclose(jax.jit(ours)(weight, hidden), expected, rtol=1e-6)
  grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(weight, hidden)
  ref_grads = jax.grad(_reference, argnums=(0, 1))(weight, hidden, input_ids,
                                                   loss_mask)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  # Nothing marked: zero loss, not NaN.
  none = procir.lm_loss(_Head(weight), hidden, input_ids, jnp.zeros_like(loss_mask), 8)
  assert float(none) == 0.0
