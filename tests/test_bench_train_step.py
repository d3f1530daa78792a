"""The training-step benchmark keeps running (speed itself is never asserted)."""

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _load_bench():
  from bench import train_step
  return train_step


@pytest.mark.slow
def test_train_step_benchmark_runs_on_cpu(capsys):
  bench = _load_bench()
  bench.main(["--preset=tiny", "--batch=2", "--views=1", "--iters=1"])
  out = capsys.readouterr().out
  rates = {}
  for name in ("jax", "transformers"):
    line = re.search(rf"^ *{name}: +([0-9.]+) triplets/s .*MFU ([0-9.]+)%", out,
                     re.M)
    assert line, f"no {name} rate in:\n{out}"
    rates[name] = float(line.group(1))
    assert rates[name] > 0 and float(line.group(2)) > 0
  ratio = float(re.search(r"ratio jax/transformers: ([0-9.]+)x", out).group(1))
  assert ratio == pytest.approx(rates["jax"] / rates["transformers"], rel=0.02)
  # Both sides start from random weights: each loss sums three InfoNCE terms
  # over 2 rows, near (1 + 0.5 + 0.5) ln 2 (weights from configs/base.py).
  for loss in re.findall(r"first loss ([0-9.]+)", out):
    assert 0.5 < float(loss) < 4.0


def test_step_flops_count_real_tokens_only():
  """Padding the batch further leaves the model FLOPs unchanged."""
  import numpy as np
  from procir_jax.models.qwen3_5 import Qwen3_5Config

  bench = _load_bench()
  hcfg = bench.hf_config("tiny", token_ids=(5, 6, 7, 8), vocab_size=64)
  cfg = Qwen3_5Config.from_hf_dict(hcfg.to_dict())
  mask = np.array([[1] * 10 + [0] * 6, [1] * 16])
  grid = np.array([[[1, 8, 8], [1, 8, 8], [1, 8, 4], [0, 0, 0]]])  # one group
  image = {"attention_mask": mask, "image_grid_thw": grid,
           "patches": np.zeros((1, 4, 64, 768), np.uint8)}
  text = {"attention_mask": mask}
  batch = dict(query=image, document=image, source_caption=text,
               target_caption=text)
  flops = bench.step_flops(cfg, batch)
  padded = dict(batch, source_caption={"attention_mask": np.pad(mask, ((0, 0),
                                                                      (0, 48)))})
  assert bench.step_flops(cfg, padded) == flops
  from bench import common
  one = common.decoder_flops(cfg, [10]) + common.decoder_flops(cfg, [16])
  vision = common.vision_flops(cfg, np.array([[1, 8, 8], [1, 8, 8], [1, 8, 4]]))
  assert flops == pytest.approx(3 * (4 * one + 2 * vision))
