"""Loading and saving Hugging Face Qwen3.5 checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
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
  # On absl's own logger: a test that parsed absl flags in this process leaves it at
  # WARNING, which would drop the INFO record before caplog sees it.
  with caplog.at_level("INFO", logger="absl"):
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


@pytest.mark.parametrize("transform", [params_lib.IDENTITY, params_lib.LINEAR,
                                       params_lib.CONV1D, params_lib.PATCH],
                         ids=lambda t: t.name)
def test_slices_read_through_each_transform(transform):
  shape = {"identity": (6, 8), "linear": (6, 8), "conv1d": (8, 1, 4),
           "patch": (4, 3, 2, 2, 2)}[transform.name]
  hf = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  whole = transform.to_nnx(hf)
  assert transform.nnx_shape(hf.shape) == whole.shape
  a, b = whole.shape
  for idx in [(slice(None), slice(None)), (slice(0, a // 2), slice(b // 2, b)),
              (slice(1, a), slice(0, 1))]:
    src, post = transform.source_index(idx)
    np.testing.assert_array_equal(transform.to_nnx(hf[src])[post], whole[idx])


def test_every_layout_placed_in_slices_on_a_2d_mesh(hf_dir, tmp_path):
  _, path = hf_dir
  out = str(tmp_path / "sharded")
  save_pretrained(load_pretrained(path), out, max_shard_bytes=200_000)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

  def shard(param_path, shape):
    axes = [("data", 2), ("model", 4)][-len(shape):]
    return NamedSharding(mesh, P(*(a if d % n == 0 else None
                                   for d, (a, n) in zip(shape, axes))))

  model = load_pretrained(out, shardings=shard)
  ref = param_paths(load_pretrained(path))
  got = param_paths(model)
  split = set()
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(ref[k][...]),
                                  err_msg=k)
    if not v[...].sharding.is_fully_replicated:
      split.add(params_lib.hf_to_nnx_name(params_lib.nnx_to_hf_name(k)[0])[1])
  assert {t.name for t in split} == {"identity", "linear", "conv1d", "patch"}


def test_written_files_are_what_safetensors_and_transformers_expect(tmp_path):
  bf16 = np.arange(6, dtype=np.float32).reshape(2, 3).astype(jnp.bfloat16)
  f = str(tmp_path / "model.safetensors")
  params_lib.write_safetensors(f, [("a", (2, 3), bf16.dtype, lambda: bf16),
                                   ("b", (3, 2), np.float32, lambda: bf16.T)])
  with safetensors.safe_open(f, framework="numpy") as st:
    assert st.metadata() == {"format": "pt"}
    assert st.get_slice("a").get_dtype() == "BF16"
    np.testing.assert_array_equal(st.get_tensor("a"), bf16)
    np.testing.assert_array_equal(st.get_tensor("b"), bf16.T.astype(np.float32))
  with safetensors.safe_open(f, framework="pt") as st:
    assert st.get_tensor("a").dtype == torch.bfloat16


def test_a_failed_write_leaves_no_file(tmp_path):
  f = str(tmp_path / "model.safetensors")

  def fail():
    raise RuntimeError("device lost")

  with pytest.raises(RuntimeError, match="device lost"):
    params_lib.write_safetensors(f, [("a", (2,), np.float32, fail)])
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="produced"):
    params_lib.write_safetensors(
        f, [("a", (2,), np.float32, lambda: np.zeros(3, np.float32))])
  assert os.listdir(tmp_path) == []


def test_unreadable_files_are_named(hf_dir, tmp_path):
  _, path = hf_dir
  bad = tmp_path / "bad"
  bad.mkdir()
  with open(os.path.join(path, "config.json")) as f:
    (bad / "config.json").write_text(f.read())
  (bad / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}")
  with pytest.raises(ValueError, match=r"bad/model.safetensors is not a "
                     "readable safetensors file"):
    load_pretrained(str(bad))
  safetensors.numpy.save_file(
      {"model.language_model.norm.weight": np.zeros(4, ml_dtypes.float8_e4m3fn)},
      str(bad / "model.safetensors"))
  with pytest.raises(ValueError, match="tensor model.language_model.norm.weight "
                     "has unsupported dtype F8_E4M3"):
    load_pretrained(str(bad))
  (bad / "model.safetensors.index.json").write_text("{}")
  with pytest.raises(ValueError, match="index.json is not a safetensors index"):
    load_pretrained(str(bad))
  (bad / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError,
                     match="model-00001-of-00002.safetensors is missing"):
    load_pretrained(str(bad))


def test_saving_again_replaces_earlier_weight_files(hf_dir, tmp_path):
  _, path = hf_dir
  model = load_pretrained(path)
  out = tmp_path / "out"
  save_pretrained(model, str(out), max_shard_bytes=200_000)
  assert (out / "model.safetensors.index.json").exists()
  grown = load_pretrained(path)
  grow_vocab(grown, 2)
  save_pretrained(grown, str(out))  # one file now: the index must go
  assert sorted(p.name for p in out.iterdir()) == ["config.json",
                                                   "model.safetensors"]
  again = load_pretrained(str(out))
  assert again.config.text.vocab_size == model.config.text.vocab_size + 2
