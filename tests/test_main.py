"""The main job end to end on the embedded default, shrunk to a few steps."""

import json
import sys
import pathlib

import pytest

from configs import base
from procir_jax import factories, modes

REPO = pathlib.Path(__file__).parents[1]


def _small(config):
  config.model.tiny_preset = "test"
  config.data.synthetic.update(dict(train_products=8, train_triplets=16,
                                    val_products=6, val_triplets=6, image_size=48))
  config.data.global_batch_size = 8
  config.data.eval_batch_size = 8
  config.data.max_views = 2
  config.eval.max_views = 2
  config.train.update(dict(steps=2, warmup_steps=1, log_every=1))
  config.sft.update(dict(steps=1, warmup_steps=0))
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, metrics, stdout) of one short training run, shared by the tests."""
  import contextlib
  import io

  workdir = tmp_path_factory.mktemp("trained")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    metrics = modes.run_train(_small(base.get_config()), str(workdir))
  return workdir, metrics, out.getvalue()


def test_train_mode_writes_results(trained):
  tmp_path, metrics, out = trained
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  keys = {f"{d}_R@{k}" for d in ("DeepFashion", "Fashion200K", "FashionGen-val")
          for k in (1, 5, 10)} | {"Average_R@5", "Average_R@10"}
  assert set(results) == keys and results == pytest.approx(metrics)
  assert all(0.0 <= v <= 100.0 for v in results.values())
  for name in ("deepfashion", "f200k", "fashiongen"):
    assert (tmp_path / "eval" / "embeddings" / f"{name}.npz").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
      "contrastive", "sft"]
  assert "Average" in out and "chance R@10" in out
  # config.eval.backends: exact, then ScaNN beside it.
  table = (tmp_path / "eval" / "results.txt").read_text()
  assert "\nScaNN\n" in table
  # The page to look at: a curve per dataset and backend, examples with views.
  page = (tmp_path / "eval" / "report.html").read_text()
  assert page.count('class="curve"') == 3 * 2 and "data:image/jpeg" in page


def test_export_is_a_hugging_face_directory_of_the_trained_model(trained, tmp_path):
  """mode=export writes the trained state where transformers and this project load
  it: transformers' hidden states equal the trained model's, and the directory is
  again a model directory (same parameters, tokenizer with <emb_all>, processors)."""
  from flax import nnx
  import numpy as np
  import transformers

  from procir_jax.data import tokenizer as tok
  from procir_jax.models.qwen3_5 import load_pretrained, param_paths
  from tests.test_tiny_model import assert_same_hidden_states_as_transformers

  workdir, _, _ = trained
  config = _small(base.get_config())
  config.export.update(dict(dir=str(tmp_path / "hf"), dtype="float32"))
  out = pathlib.Path(modes.run_export(config, str(workdir)))
  names = {p.name for p in out.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "preprocessor_config.json",
          "video_preprocessor_config.json", "processor_config.json"} <= names
  _, _, graphdef, params = modes.load_trained(config, str(workdir))
  trained_model = nnx.merge(graphdef, params).model
  exported = load_pretrained(str(out))
  ours, theirs = param_paths(trained_model), param_paths(exported)
  assert sorted(ours) == sorted(theirs)
  for name in ours:
    np.testing.assert_array_equal(np.asarray(ours[name][...]),
                                  np.asarray(theirs[name][...]), err_msg=name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok.EMB_TOKEN in tokenizer.get_vocab()
  assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                       tokenize=False).startswith(tok.IM_START)
  preprocessor = json.loads((out / "preprocessor_config.json").read_text())
  assert preprocessor["processor_class"] == "Qwen3VLProcessor"
  assert preprocessor["size"] == {"shortest_edge": 128 * 128,
                                  "longest_edge": 512 * 512}
  assert_same_hidden_states_as_transformers(out, trained_model)
  # Exported again into the same place, in bf16 and shards: old shards do not stay.
  config.export.update(dict(dtype="bfloat16", max_shard_gb=1e-4))
  modes.run_export(config, str(workdir))
  shards = sorted(p.name for p in out.glob("model*.safetensors"))
  assert len(shards) > 1 and "model.safetensors" not in shards
  assert load_pretrained(str(out)).config == exported.config


@pytest.fixture
def run_main(tmp_path, monkeypatch):
  """Calls `procir_jax.main.main` in this process with the base config and flags."""
  import importlib

  from absl import flags

  def forget_main():
    # absl flags are global: other tests in this process (bench/tpu_compile.py)
    # define --config themselves, and a fresh import of main defines it again.
    for name in list(flags.FLAGS):
      if name in ("config", "workdir", "traceback") or name.startswith("config."):
        delattr(flags.FLAGS, name)
    sys.modules.pop("procir_jax.main", None)

  forget_main()
  main_lib = importlib.import_module("procir_jax.main")
  monkeypatch.chdir(REPO)

  def run(mode: str = "train"):
    flags.FLAGS(["main", "--config=configs/base.py", f"--workdir={tmp_path}"])
    main_lib._CONFIG.value.mode = mode  # pylint: disable=protected-access
    return main_lib.main(["main"])

  yield run
  flags.FLAGS.unparse_flags()
  forget_main()


def test_exit_status_tells_preemption_and_user_errors_from_crashes(
    run_main, tmp_path, monkeypatch, capsys):
  """Preempted: one line and 75 (EX_TEMPFAIL), so a scheduler requeues. An error that
  is the user's to fix: one line and 2, the trace in <workdir>/errors.log. Anything
  else: its traceback."""
  from procir_jax.train import loop as loop_lib

  def preempted(config, workdir):
    raise loop_lib.TrainingStopped("Preempted (SIGTERM) at step 3: saved", 3, "c")

  def bad_input(config, workdir):
    raise FileNotFoundError("/data/x.jsonl not found: put the release there")

  def bug(config, workdir):
    raise KeyError("a bug")

  for run, code in ((preempted, 75), (bad_input, 2)):
    monkeypatch.setitem(modes.MODES, "train", run)
    with pytest.raises(SystemExit) as exit_info:
      run_main()
    assert exit_info.value.code == code
  out, err = capsys.readouterr()
  assert out.strip().splitlines()[-1] == "Preempted (SIGTERM) at step 3: saved"
  assert err.strip().splitlines()[-1].startswith(
      "Error: /data/x.jsonl not found: put the release there (full trace in ")
  assert "Traceback" not in out + err
  assert "bad_input" in (tmp_path / "errors.log").read_text()
  monkeypatch.setitem(modes.MODES, "train", bug)
  with pytest.raises(KeyError):
    run_main()


def test_command_line_rejects_unknown_modes(run_main):
  from absl import app

  with pytest.raises(app.UsageError, match="config.mode must be one of"):
    run_main(mode="dance")


def test_eval_backends_come_from_the_config():
  config = base.get_config()
  assert factories.eval_backends(config) == ("exact", "scann")
  config.eval.backends = ("exact,scann",)  # as `--config.eval.backends=exact,scann`
  assert factories.eval_backends(config) == ("exact", "scann")
  config.eval.backends = ("exact",)
  assert factories.eval_backends(config) == ("exact",)
  for bad in [("scann",), ("exact", "faiss")]:
    config.eval.backends = bad
    with pytest.raises(ValueError, match=r"config.eval.backends=.*'exact' must be"):
      factories.eval_backends(config)


def _partial_release(tmp_path, config):
  """A release holding no Fashion200K images, as the main job would be pointed at."""
  import shutil

  from tfds_fashionmv import synthetic

  release = tmp_path / "release"
  synthetic.generate(release, synthetic.SyntheticConfig(**config.data.synthetic))
  shutil.rmtree(release / "images" / "f200k")
  config.data.manual_dir = str(release)
  config.data.use_synthetic = False
  return config


def test_a_partial_release_evaluates_what_it_holds(tmp_path, capsys):
  config = _partial_release(tmp_path, _small(base.get_config()))
  config.eval.backends = ("exact",)
  metrics = modes.run_eval(config, str(tmp_path / "run"))
  assert set(metrics) == {f"{d}_R@{k}" for d in ("DeepFashion", "FashionGen-val")
                          for k in (1, 5, 10)} | {"Average_R@5", "Average_R@10"}
  table = (tmp_path / "run" / "eval" / "results.txt").read_text()
  assert "Left out, nothing to evaluate in this data: Fashion200K" in table


def test_training_stops_before_it_starts_when_validation_has_no_data(tmp_path):
  config = _partial_release(tmp_path, _small(base.get_config()))
  config.train.eval_every = 1
  config.eval.validation_sources = ("f200k",)
  with pytest.raises(ValueError, match=r"validation_sources=\('f200k',\) has nothing "
                                       r"to validate on.*'deepfashion'"):
    modes.run_train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  config.eval.sources = ("f200k",)
  with pytest.raises(ValueError, match=r"nothing to evaluate for any of "
                                       r"config.eval.sources=\('f200k',\).*images/f200k"):
    modes.run_eval(config, str(tmp_path / "run"))
