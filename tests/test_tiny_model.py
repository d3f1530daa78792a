"""The tiny model directory: a complete Qwen3.5 checkpoint that both this project and
transformers load, and that gives the same hidden states through the whole input path
(dialogue, image processor, model)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from procir_jax import tiny_model
from procir_jax.data import dialogue
from procir_jax.data import tokenizer as tok
from procir_jax.data.image_processing import ImageProcessor
from procir_jax.models.qwen3_5 import Qwen3_5Config, load_pretrained
from procir_jax.models.qwen3_5.config import PRESETS


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


def test_config_is_the_presets_with_the_tokenizers_vocabulary(model_dir):
  tokenizer = tok.load_tokenizer(str(model_dir))
  config = Qwen3_5Config.from_pretrained(str(model_dir))
  assert config == Qwen3_5Config.tiny(vocab_size=len(tokenizer),
                                      **tiny_model.token_ids(tokenizer))
  assert config.hf_config["eos_token_id"] == tokenizer.convert_tokens_to_ids(tok.IM_END)


def test_preprocessor_config_reads_the_same_here_and_in_transformers(model_dir):
  """Written by ImageProcessor.save_pretrained, plus what a Qwen3.5 checkpoint's
  file also holds: it reads back as ImageProcessor(), and transformers reads the
  same settings."""
  assert ImageProcessor.from_pretrained(str(model_dir)) == ImageProcessor()
  config = json.loads((model_dir / "preprocessor_config.json").read_text())
  assert config["processor_class"] == "Qwen3VLProcessor"
  assert (config["min_pixels"], config["max_pixels"]) == (128 * 128, 512 * 512)
  theirs = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
  assert (theirs.size["shortest_edge"], theirs.size["longest_edge"]) == (
      128 * 128, 512 * 512)
  assert (theirs.patch_size, theirs.merge_size,
          theirs.temporal_patch_size) == (16, 2, 2)
  assert list(theirs.image_mean) == list(theirs.image_std) == [0.5, 0.5, 0.5]
  assert theirs.resample == 3 and theirs.do_normalize and theirs.do_rescale


# Parameters of each preset (tiny ones with a 1000-token vocabulary): a preset's
# shape is what tests, the embedded default and workdirs made earlier rely on.
_PRESET_PARAMETERS = {"test": 137_684, "tiny": 499_784, "small": 1_810_488,
                      "qwen3_5_0_8b": 852_985_920}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_keep_their_shapes(name):
  import jax
  from flax import nnx
  from procir_jax.models.qwen3_5 import Qwen3_5Model
  if name == "qwen3_5_0_8b":
    config = Qwen3_5Config.preset(name)
  else:
    config = Qwen3_5Config.preset(name, vocab_size=1000, image_token_id=5,
                                  video_token_id=6, vision_start_token_id=7,
                                  vision_end_token_id=8)
  assert config.vision.out_hidden_size == config.text.hidden_size
  assert {"linear_attention", "full_attention"} == set(config.text.layer_types)
  model = nnx.eval_shape(lambda: Qwen3_5Model(config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == _PRESET_PARAMETERS[name]


def test_the_0_8b_preset_is_the_default_config():
  config = Qwen3_5Config.qwen3_5_0_8b()
  assert config == Qwen3_5Config()
  assert (config.text.vocab_size, config.text.hidden_size,
          config.text.num_hidden_layers, config.vision.depth) == (248320, 1024, 24, 12)


def test_presets_refuse_ids_outside_the_vocabulary_and_unknown_names():
  with pytest.raises(ValueError, match="outside the vocabulary of 64"):
    Qwen3_5Config.tiny(vocab_size=64)  # Qwen3.5's own ids are ~248k
  with pytest.raises(TypeError, match="Unknown token id"):
    Qwen3_5Config.tiny(vocab_size=64, image_id=5)
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    Qwen3_5Config.preset("huge")


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
