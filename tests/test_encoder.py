"""The padded-batch forward equals the model's own forward, example by example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from procir_jax import dialogue, encoder
from procir_jax.data import bucketing, examples
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import load_pretrained

SIZES = [[(64, 96)], [(160, 128), (128, 128), (96, 200)], [(128, 128)] * 2]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
  model = load_pretrained(str(tiny_model_dir), dtype=jnp.float32)
  tokenizer = tok.load_tokenizer(str(tiny_model_dir))
  processor = ImageProcessor.from_pretrained(str(tiny_model_dir))
  rng = np.random.default_rng(0)
  dialogues = dialogue.Dialogues(tokenizer)
  sequences = []
  for sizes in SIZES:
    images = [rng.integers(0, 255, (*s, 3), np.uint8) for s in sizes]
    out = processor(images)
    tokens = dialogues.two_stage_query(
        [processor.num_image_tokens(*s) for s in sizes], "make it red")
    sequences.append(examples.EncodedSequence(tokens, out.pixel_values,
                                              out.image_grid_thw))
  batch = bucketing.Buckets(lengths=(256, 512), patches=(64, 256, 512)).collate(
      sequences + [None], tok.special_token_ids(tokenizer).pad, 2, True)
  return model, sequences, batch


def test_padded_batch_matches_per_example_forward(setup):
  model, sequences, batch = setup
  hidden = np.asarray(jax.jit(encoder.encode)(model, encoder.numpy_batch(batch)))
  assert np.isfinite(hidden).all()
  for i, s in enumerate(sequences):
    ids = s.tokens.input_ids[None]
    expected = np.asarray(model(input_ids=ids, attention_mask=np.ones_like(ids),
                                pixel_values=s.pixel_values,
                                image_grid_thw=s.image_grid_thw))[0]
    n = len(s.tokens)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(hidden[i, :n], expected, atol=2e-5 * scale)


def test_embeddings_are_unit_vectors_at_emb_all(setup):
  model, sequences, batch = setup
  hidden = encoder.encode(model, encoder.numpy_batch(batch))
  emb = np.asarray(encoder.gather_embeddings(hidden, jnp.asarray(batch["emb_positions"])))
  assert emb.shape == (4, 2, model.config.text.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      emb[0, 1], np.asarray(hidden)[0, sequences[0].tokens.emb_positions[1]] /
      np.linalg.norm(np.asarray(hidden)[0, sequences[0].tokens.emb_positions[1]]),
      rtol=1e-5, atol=1e-6)


def test_gradient_through_the_padded_forward_is_finite(setup):
  model, _, batch = setup
  from flax import nnx
  graphdef, params = nnx.split(model)

  def loss(p):
    m = nnx.merge(graphdef, p)
    h = encoder.encode(m, encoder.numpy_batch(batch))
    return jnp.sum(encoder.gather_embeddings(h, jnp.asarray(batch["emb_positions"]))[:3])

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert any(bool(jnp.abs(g).sum() > 0) for g in leaves)
