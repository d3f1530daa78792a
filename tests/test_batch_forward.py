"""The padded-batch forward equals the model's own forward, example by example."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from procir_jax import batch_forward
from procir_jax.data import dialogue
from procir_jax.data import bucketing, examples
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import load_pretrained

SIZES = [[(64, 96)], [(160, 128), (128, 128), (96, 200)], [(128, 128)] * 2]

# One jitted encode for the whole file: the tests that encode the same batch share its
# compilation (eager dispatch of the whole model is much slower than one compile).
ENCODE = jax.jit(batch_forward.encode)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
  model = load_pretrained(str(tiny_model_dir), dtype=jnp.float32)
  tokenizer = tok.load_tokenizer(str(tiny_model_dir))
  processor = ImageProcessor.from_pretrained(str(tiny_model_dir))
  rng = np.random.default_rng(0)
  dialogues = dialogue.Dialogues(tokenizer)
  sequences = []
  image_pad = tok.special_token_ids(tokenizer).image_pad
  for sizes in SIZES:
    images = [rng.integers(0, 255, (*s, 3), np.uint8) for s in sizes]
    out = processor.patchify(images)
    tokens = dialogues.two_stage_query(
        [processor.num_image_tokens(*s) for s in sizes], "make it red")
    sequences.append(examples.EncodedSequence.build(
        tokens, out.patches, out.image_grid_thw, image_token_id=image_pad,
        merge_size=processor.merge_size))
  buckets = bucketing.Buckets(lengths=(256, 512), patches=(64, 256, 512))
  pad = tok.special_token_ids(tokenizer).pad
  batch = buckets.collate(sequences + [None], pad, 2, True)
  return model, processor, sequences, batch, buckets, pad


def _model_forward(model, processor, s):
  """The model's own forward (transformers' inputs) of one sequence."""
  ids = s.tokens.input_ids[None]
  forward = nnx.jit(lambda m, ids, pixels, thw: m(
      input_ids=ids, attention_mask=jnp.ones_like(ids), pixel_values=pixels,
      image_grid_thw=thw), static_argnums=3)
  return np.asarray(forward(model, ids, processor.normalize(s.patches),
                            tuple(map(tuple, np.asarray(s.image_grid_thw)))))[0]


def test_padded_batch_matches_per_example_forward(setup):
  model, processor, sequences, batch, _, _ = setup
  hidden = np.asarray(
      ENCODE(model, batch_forward.numpy_batch(batch)))
  assert np.isfinite(hidden).all()
  for i, s in enumerate(sequences):
    expected = _model_forward(model, processor, s)
    n = len(s.tokens)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(hidden[i, :n], expected, atol=2e-5 * scale)


def test_packing_skips_empty_views_and_groups_keep_rows_images(setup):
  """Two image groups (one per device of a 2-way batch split): each group holds the
  images of its own rows only, and the forward is unchanged."""
  model, processor, sequences, _, buckets, pad = setup
  rows = [sequences[0], sequences[1], sequences[2], None]
  batch = buckets.collate(rows, pad, 2, True, image_groups=2)
  groups, slots = batch["patches"].shape[:2]
  assert groups == 2
  # Group 0 shows rows 0-1 (1 + 3 images), group 1 shows row 2 (2 images); a
  # quarter of 2 rows x 5 views rounds to 3 slots, half to 5.
  assert slots == 5
  grid = batch["image_grid_thw"]
  assert (grid[0, :4] > 0).all() and not grid[0, 4].any()
  assert (grid[1, :2] > 0).all() and not grid[1, 2:].any()
  row1_slots = batch["image_slot"][1]
  np.testing.assert_array_equal(row1_slots[row1_slots >= 0].min(), 1)
  hidden = np.asarray(
      ENCODE(model, batch_forward.numpy_batch(batch)))
  for i, s in enumerate(rows[:3]):
    expected = _model_forward(model, processor, s)
    np.testing.assert_allclose(hidden[i, :len(s.tokens)], expected,
                               atol=2e-5 * np.abs(expected).max())


def test_encode_together_equals_separate_encodes(setup):
  model, _, sequences, batch, buckets, pad = setup
  captions = buckets.collate([sequences[2], sequences[0], None, sequences[1]], pad, 2,
                             False)
  together = jax.jit(batch_forward.encode_together)(
      model, [batch_forward.numpy_batch(batch), batch_forward.numpy_batch(captions),
              batch_forward.numpy_batch(batch)])
  alone = [ENCODE(model, batch_forward.numpy_batch(p))
           for p in (batch, captions)]
  for got, want in zip(together, alone + alone[:1]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))


def test_embeddings_are_unit_vectors_at_emb_all(setup):
  model, _, sequences, batch, _, _ = setup
  hidden = ENCODE(model, batch_forward.numpy_batch(batch))
  emb = np.asarray(batch_forward.gather_embeddings(
      hidden, jnp.asarray(batch["emb_positions"])))
  assert emb.shape == (4, 2, model.config.text.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      emb[0, 1], np.asarray(hidden)[0, sequences[0].tokens.emb_positions[1]] /
      np.linalg.norm(np.asarray(hidden)[0, sequences[0].tokens.emb_positions[1]]),
      rtol=1e-5, atol=1e-6)


def test_gradient_through_the_padded_forward_is_finite(setup):
  model, _, _, batch, _, _ = setup
  graphdef, params = nnx.split(model)

  def loss(p):
    m = nnx.merge(graphdef, p)
    h = batch_forward.encode(m, batch_forward.numpy_batch(batch))
    return jnp.sum(batch_forward.gather_embeddings(
        h, jnp.asarray(batch["emb_positions"]))[:3])

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert any(bool(jnp.abs(g).sum() > 0) for g in leaves)
