"""Shared pytest setup.

Every test run sees 8 fake CPU devices so that sharding code is always exercised.
The flag must be set before jax is first imported, which is why it lives here at
import time rather than in a fixture.
"""

import os

# Tests run tiny models where compiling dominates: ask XLA for less optimisation.
_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by tfds) must not grab GPUs or spam the log in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import tempfile  # noqa: E402

import jax  # noqa: E402  (after the environment set-up above)
import pytest  # noqa: E402

# Identical programs built by different objects (a new Trainer per test, say) compile
# once per run.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """A model directory with the tiny tokenizer, chat template and processor config."""
  from procir_jax import tiny_model

  out = tmp_path_factory.mktemp("tiny_tokenizer")
  tiny_model.write_tokenizer_files(out, preset="tiny")
  return out


SMALL_SYNTHETIC = dict(seed=0, train_products=12, train_triplets=20, val_products=6,
                       val_triplets=8, image_size=64)


@pytest.fixture(scope="session")
def fashionmv_release(tmp_path_factory):
  """A small synthetic FashionMV in the release layout."""
  from tfds_fashionmv import synthetic

  out = tmp_path_factory.mktemp("release")
  synthetic.generate(out, synthetic.SyntheticConfig(**SMALL_SYNTHETIC))
  return out


@pytest.fixture(scope="session")
def fashionmv_data_dir(tmp_path_factory, fashionmv_release):
  """Both TFDS configs built from `fashionmv_release`."""
  import tensorflow_datasets as tfds
  import tfds_fashionmv  # noqa: F401

  data_dir = tmp_path_factory.mktemp("tfds")
  for config in ("products", "triplets"):
    tfds.builder(f"fashionmv/{config}", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=fashionmv_release))
  return data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A complete tiny Qwen3.5 directory: tokenizer, processor config, random weights."""
  from procir_jax import tiny_model

  return tiny_model.write_model_dir(tmp_path_factory.mktemp("tiny_model"), "tiny")


# The files that take minutes, longest first. xdist hands whole files to its workers in
# collection order (pyproject.toml turns off its own reordering by test count), so a
# long file collected last would leave one worker running it alone at the end.
_LONG_FILES_FIRST = ("test_train.py", "test_main.py", "test_multihost_failures.py",
                     "test_tpu_compile.py", "test_batch_forward.py",
                     "test_qwen3_5_parity.py", "test_tools.py",
                     "test_embed_collection.py", "test_train_multihost.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
