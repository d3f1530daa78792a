"""Pallas kernels for the Qwen3.5 port: TPU fast paths, each held by the tests to the
pure-JAX reference beside its caller (layers.reference_attention)."""
