"""The main job end to end on the embedded default, shrunk to a few steps."""

import json
import subprocess
import sys
import pathlib

import pytest

from configs import base
from procir_jax import experiment

REPO = pathlib.Path(__file__).parents[1]


def _small(config):
  config.model.tiny_preset = "test"
  config.data.synthetic.update(dict(train_products=8, train_triplets=16,
                                    val_products=6, val_triplets=6, image_size=48))
  config.data.global_batch_size = 8
  config.data.eval_batch_size = 8
  config.data.max_views = 2
  config.train.update(dict(steps=2, warmup_steps=1, log_every=1))
  config.sft.update(dict(steps=1, warmup_steps=0))
  return config


def test_train_mode_writes_results(tmp_path, capsys):
  metrics = experiment.run_train(_small(base.get_config()), str(tmp_path))
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  keys = {f"{d}_R@{k}" for d in ("DeepFashion", "Fashion200K", "FashionGen-val")
          for k in (1, 5, 10)} | {"Average_R@5", "Average_R@10"}
  assert set(results) == keys and results == pytest.approx(metrics)
  assert all(0.0 <= v <= 100.0 for v in results.values())
  for name in ("deepfashion", "f200k", "fashiongen"):
    assert (tmp_path / "eval" / "embeddings" / f"{name}.npz").exists()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
      "contrastive", "sft"]
  out = capsys.readouterr().out
  assert "Average" in out and "chance R@10" in out


def test_command_line_rejects_unknown_modes(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "procir_jax.main", "--config=configs/base.py",
       f"--workdir={tmp_path}", "--config.mode=dance"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert "config.mode must be one of" in result.stderr
