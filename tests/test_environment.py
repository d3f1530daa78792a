"""The test environment itself: fake devices and the pinned stack import together."""

import jax


def test_eight_fake_cpu_devices():
  assert jax.device_count() == 8
  assert {d.platform for d in jax.devices()} == {"cpu"}


def test_scann_imports_beside_tensorflow():
  # scann's TF ops are built against TF 2.20; this breaks if the pin is lost.
  import scann  # noqa: F401
  import tensorflow as tf

  assert tf.__version__.startswith("2.20.")
