"""The encode benchmark keeps running (speed itself is never asserted)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_encode_benchmark_runs_on_cpu(capsys):
  from bench import encode as bench
  bench.main(["--preset=tiny", "--batch=2", "--views=2", "--iters=1"])
  out = capsys.readouterr().out
  assert "products/s" in out and "ratio jax/transformers" in out
  cosine = float(out.split("min cosine ")[1].split(",")[0])
  assert cosine > 0.9999
