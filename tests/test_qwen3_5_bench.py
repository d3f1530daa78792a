"""The encode benchmark keeps running (speed itself is never asserted)."""

import importlib.util
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_encode_benchmark_runs_on_cpu(capsys):
  path = os.path.join(os.path.dirname(__file__), "..", "bench", "encode.py")
  spec = importlib.util.spec_from_file_location("bench_encode", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--preset=tiny", "--batch=2", "--views=2", "--iters=1"])
  out = capsys.readouterr().out
  assert "products/s" in out and "ratio jax/transformers" in out
  cosine = float(out.split("min cosine ")[1].split(",")[0])
  assert cosine > 0.9999
