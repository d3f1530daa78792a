"""Loading and saving Hugging Face Qwen3.5 checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from procir_jax.models.qwen3_5 import (Qwen3_5Config, grow_vocab,  # noqa: E402
                                       load_pretrained, param_paths,
                                       save_pretrained)
from procir_jax.models.qwen3_5 import params as params_lib  # noqa: E402
from tests.test_qwen3_5_parity import (CASES, assert_close,  # noqa: E402
                                       build_hf_model, forward, hf_hidden,
                                       make_batch)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = build_hf_model("untied_odd_gqa3", seed=1)
  path = str(tmp_path_factory.mktemp("ckpt") / "hf")
  hf.save_pretrained(path)
  return hf, path


def _tensors(path):
  reader = params_lib.SafetensorsReader.from_dir(path)
  return {k: np.array(reader.get(k)) for k in reader.keys()}


def _write(path, tensors, config_from):
  os.makedirs(path, exist_ok=True)
  params_lib.write_safetensors(
      os.path.join(path, "model.safetensors"),
      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
  with open(os.path.join(config_from, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg)


def test_round_trip_through_transformers(hf_dir, tmp_path):
  hf, path = hf_dir
  out = str(tmp_path / "saved")
  save_pretrained(load_pretrained(path), out)
  reloaded = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      out).eval()
  original = _tensors(path)
  resaved = _tensors(out)
  assert sorted(original) == sorted(resaved)
  for k in original:
    np.testing.assert_array_equal(original[k], resaved[k], err_msg=k)
  ids, mask, pix, thw = make_batch(*CASES["padded_mixed_batch"])
  np.testing.assert_array_equal(hf_hidden(reloaded, ids, mask, pix, thw),
                                hf_hidden(hf, ids, mask, pix, thw))


def test_sharded_checkpoint_with_index(hf_dir, tmp_path):
  _, path = hf_dir
  model = load_pretrained(path)
  out = str(tmp_path / "sharded")
  save_pretrained(model, out, max_shard_bytes=200_000)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert len(set(index["weight_map"].values())) > 1
  again = load_pretrained(out)
  a, b = param_paths(model), param_paths(again)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k][...], b[k][...])


def test_bare_model_names_and_mtp_weights(hf_dir, tmp_path, caplog):
  _, path = hf_dir
  tensors = _tensors(path)
  # Qwen3_5Model.save_pretrained names have no "model." prefix.
  bare = {k[len("model."):] if k.startswith("model.") else k: v
          for k, v in tensors.items()}
  bare["mtp.fc.weight"] = np.zeros((3, 3), np.float32)
  bare["mtp.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
  _write(str(tmp_path / "bare"), bare, path)
  ref = param_paths(load_pretrained(path))
  with caplog.at_level("INFO"):
    got = param_paths(load_pretrained(str(tmp_path / "bare")))
  assert "Ignoring 2 multi-token-prediction tensors" in caplog.text
  for k in ref:
    np.testing.assert_array_equal(ref[k][...], got[k][...])


def test_bare_transformers_model_loads(tmp_path):
  hf = build_hf_model("tied_gqa2", seed=2)
  path = str(tmp_path / "bare_hf")
  hf.model.save_pretrained(path)
  model = load_pretrained(path)
  ids, mask, pix, thw = make_batch(*CASES["one_image"])
  assert_close(forward(model, ids, mask, pix, thw),
               hf_hidden(hf, ids, mask, pix, thw), mask)


def test_one_error_lists_every_problem(hf_dir, tmp_path):
  _, path = hf_dir
  tensors = _tensors(path)
  del tensors["model.language_model.layers.1.self_attn.k_norm.weight"]
  tensors["model.visual.blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
  tensors["model.language_model.norm.weight"] = np.zeros(7, np.float32)
  _write(str(tmp_path / "bad"), tensors, path)
  with pytest.raises(ValueError) as err:
    load_pretrained(str(tmp_path / "bad"))
  msg = str(err.value)
  assert "1 missing" in msg and "layers/1/self_attn/k_norm/scale" in msg
  assert "1 unexpected" in msg and "attn.extra.weight" in msg
  assert "1 mis-shaped" in msg and "model.language_model.norm.weight" in msg


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(
      Qwen3_5Config().to_hf_dict()))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained(str(tmp_path))


def test_tied_checkpoint_with_duplicate_head(tmp_path):
  hf = build_hf_model("tied_gqa2", seed=3)
  path = str(tmp_path / "src")
  hf.save_pretrained(path)
  tensors = _tensors(path)
  tensors["lm_head.weight"] = tensors[
      "model.language_model.embed_tokens.weight"].copy()
  _write(str(tmp_path / "dup"), tensors, path)
  model = load_pretrained(str(tmp_path / "dup"))
  assert model.config.tie_word_embeddings
  assert "lm_head/kernel" not in param_paths(model)


def test_direct_placement_on_a_mesh(hf_dir):
  _, path = hf_dir
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

  def shard(param_path, shape):
    # Kernels split their output dim over "model" where it divides evenly.
    if param_path.endswith("kernel") and shape[-1] % 4 == 0:
      return NamedSharding(mesh, P(None, "model"))
    return NamedSharding(mesh, P())

  model = load_pretrained(path, shardings=shard)
  ref = load_pretrained(path)
  kernel = model.language_model.layers[0].linear_attn.in_proj_qkv.kernel[...]
  assert kernel.shape[-1] % 4 == 0
  assert kernel.sharding.spec == P(None, "model")
  assert len(kernel.addressable_shards) == 8
  ids, mask, pix, thw = make_batch(*CASES["one_image"])
  assert_close(forward(model, ids, mask, pix, thw),
               forward(ref, ids, mask, pix, thw), mask, tol=1e-5)


def test_bfloat16_checkpoint(hf_dir, tmp_path):
  hf, path = hf_dir
  out = str(tmp_path / "bf16")
  hf.to(torch.bfloat16).save_pretrained(out)
  hf.to(torch.float32)
  model = load_pretrained(out, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  k = model.language_model.layers[0].mlp.up_proj.kernel[...]
  assert k.dtype == jnp.bfloat16
  ref = torch.tensor(_tensors(path)[
      "model.language_model.layers.0.mlp.up_proj.weight"])
  np.testing.assert_array_equal(np.asarray(k, np.float32),
                                ref.bfloat16().float().numpy().T)
  save_pretrained(model, str(tmp_path / "bf16_again"))
  cfg = json.loads((tmp_path / "bf16_again" / "config.json").read_text())
  assert cfg["dtype"] == "bfloat16"


def test_grow_vocab_and_save(hf_dir, tmp_path):
  _, path = hf_dir
  model = load_pretrained(path)
  old = model.config.text.vocab_size
  new_ids = grow_vocab(model, 3)
  assert list(new_ids) == [old, old + 1, old + 2]
  assert model.config.text.vocab_size == old + 3
  emb = model.language_model.embed_tokens.embedding[...]
  np.testing.assert_allclose(emb[old], emb[:old].mean(0), rtol=1e-6)
  ids = np.array([[1, 2, old + 2, 4]])
  logits = nnx.jit(lambda m, i: m.lm_logits(m(i)))(model, ids)
  assert logits.shape == (1, 4, old + 3)
  out = str(tmp_path / "grown")
  save_pretrained(model, out)
  hf = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(out)
  assert hf.config.text_config.vocab_size == old + 3
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  assert_close(logits, ref)


def test_every_parameter_has_a_rule():
  cfg = Qwen3_5Config.from_hf_dict(Qwen3_5Config().to_hf_dict())
  for tie in (True, False):
    model = nnx.eval_shape(lambda: params_lib.Qwen3_5Model(
        cfg.replace(tie_word_embeddings=tie)))
    for path in param_paths(model):
      name, _ = params_lib.nnx_to_hf_name(path)
      back, _ = params_lib.hf_to_nnx_name(name)
      assert back == path
