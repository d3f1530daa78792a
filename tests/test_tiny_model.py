"""The tiny model directory: a complete Qwen3.5 checkpoint that both this project and
transformers load, and that gives the same hidden states through the whole input path
(dialogue, image processor, model)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from procir_jax import dialogue, tiny_model
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import load_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_model.write_model_dir(tmp_path_factory.mktemp("tiny_model"), "tiny")


def test_directory_holds_a_qwen3_5_checkpoint(model_dir):
  names = {p.name for p in model_dir.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "preprocessor_config.json"} <= names
  config = json.loads((model_dir / "config.json").read_text())
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"
  assert config["text_config"]["vocab_size"] == len(tokenizer)
  assert config["image_token_id"] == tokenizer.convert_tokens_to_ids(tok.IMAGE_PAD)
  assert tok.EMB_TOKEN in tokenizer.get_vocab()


def assert_same_hidden_states_as_transformers(model_dir, ours=None):
  """transformers' Qwen3.5 loaded from `model_dir` gives `ours`'s hidden states (by
  default the model this project loads from the same directory) on a two-stage
  query with two views, through the whole input path."""
  tokenizer = tok.load_tokenizer(str(model_dir))
  processor = ImageProcessor.from_pretrained(str(model_dir))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (64, 96, 3), np.uint8),
            rng.integers(0, 255, (160, 128, 3), np.uint8)]
  processed = processor(images)
  tokens = dialogue.Dialogues(tokenizer).two_stage_query(
      [processor.num_image_tokens(*im.shape[:2]) for im in images], "make it blue")
  ids = tokens.input_ids[None]

  if ours is None:
    ours = load_pretrained(str(model_dir), dtype=jnp.float32)
  hidden = np.asarray(ours(input_ids=ids, attention_mask=np.ones_like(ids),
                           pixel_values=processed.pixel_values,
                           image_grid_thw=processed.image_grid_thw))
  reference = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      str(model_dir), dtype=torch.float32).eval()
  with torch.no_grad():
    out = reference.model(input_ids=torch.from_numpy(ids).long(),
                          pixel_values=torch.from_numpy(processed.pixel_values),
                          image_grid_thw=torch.from_numpy(processed.image_grid_thw).long(),
                          mm_token_type_ids=torch.from_numpy(
                              (ids == ours.config.image_token_id).astype(np.int64)))
  expected = out.last_hidden_state.numpy()
  scale = np.abs(expected).max()
  np.testing.assert_allclose(hidden, expected, atol=1e-4 * scale)
  # The embeddings ProCIR reads sit at the <emb_all> positions.
  assert hidden[0, tokens.emb_positions].shape == (2, ours.config.text.hidden_size)


def test_same_hidden_states_as_transformers_on_a_product_dialogue(model_dir):
  assert_same_hidden_states_as_transformers(model_dir)


def test_unknown_preset_is_refused(tmp_path):
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    tiny_model.write_tokenizer_files(tmp_path, preset="huge")
