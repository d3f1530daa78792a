"""Shared pytest setup.

Every test run sees 8 fake CPU devices so that sharding code is always exercised.
The flag must be set before jax is first imported, which is why it lives here at
import time rather than in a fixture.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by tfds) must not grab GPUs or spam the log in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402  (after the environment set-up above)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """A model directory holding the tiny tokenizer, chat template and processor config."""
  from procir_jax import tiny_model

  out = tmp_path_factory.mktemp("tiny_tokenizer")
  tiny_model.write_tokenizer_files(out, preset="tiny")
  return out
