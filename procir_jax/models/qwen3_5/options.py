"""How the model runs, apart from what it computes: attention kernel, remat, layer scan.

These choices never change the result beyond floating-point rounding (tests hold every
combination to the same numbers); they trade memory, HBM traffic and compile time.
They are not part of the Hugging Face config and are not saved with a checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax

# "reference": einsum scores with a materialised mask (the readable standard).
# "xla": jax.nn.dot_product_attention; cuDNN's fused kernel on GPU where it applies.
# "flash": the Pallas TPU flash-attention kernel (kernels/tpu_flash_attention.py).
# "auto": flash on TPU, xla elsewhere.
ATTENTION = ("auto", "reference", "xla", "flash")

# The Gated DeltaNet's delta rule. "chunked": the pure-JAX chunked form with its
# hand-written backward (gated_delta.py). "recurrent": one step per token (the
# reference; slow). "pallas": the Pallas TPU kernel (kernels/tpu_gated_delta.py) where
# the head dims are multiples of 128, the chunked form otherwise. "auto": pallas on
# TPU, chunked elsewhere.
DELTA_RULE = ("auto", "chunked", "recurrent", "pallas")

# "none": autodiff keeps every intermediate. "full": each decoder layer and vision block
# keeps only its input and recomputes the rest in the backward pass. "save_dots": like
# full, but keeps the outputs of the weight matmuls (more memory, less recompute).
REMAT = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Execution choices of Qwen3_5Model (see the module docstring).

  Attributes:
    attention: one of ATTENTION.
    delta_rule: one of DELTA_RULE.
    remat: one of REMAT, applied per decoder layer and per vision block.
    scan_layers: run the decoder's repeating layer pattern and the vision blocks
      under `lax.scan`, so XLA compiles one period instead of every layer (much
      faster compiles; parameters stay per layer and are stacked on the fly).
    unroll_loops: no loops in the program: layers are never scanned and the
      chunked delta rule's loop over chunks is unrolled. XLA's cost analysis
      counts a loop body once, so only such a program shows its whole cost
      (bench/tpu_compile.py); it compiles more slowly.
    interpret_kernels: run Pallas kernels in interpret mode, so that CPU tests
      can run the TPU kernels (slow; never for real work).
  """

  attention: str = "auto"
  delta_rule: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  unroll_loops: bool = False
  interpret_kernels: bool = False

  def __post_init__(self):
    if self.attention not in ATTENTION:
      raise ValueError(f"Unknown attention implementation {self.attention!r}; "
                       f"choose one of {ATTENTION}.")
    if self.delta_rule not in DELTA_RULE:
      raise ValueError(f"Unknown delta rule {self.delta_rule!r}; choose one of "
                       f"{DELTA_RULE}.")
    if self.remat not in REMAT:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of {REMAT}.")

  def for_platform(self, platform: str) -> "ModelOptions":
    """These options with "auto" resolved for devices of `platform` ("tpu", ...).

    The platform is the target devices', which is not always jax.default_backend():
    compiling for TPU from a CPU host is one such case.
    """
    tpu = platform == "tpu"
    changes = {}
    if self.attention == "auto":
      changes["attention"] = "flash" if tpu else "xla"
    if self.delta_rule == "auto":
      changes["delta_rule"] = "pallas" if tpu else "chunked"
    return dataclasses.replace(self, **changes)

  def remat_policy(self):
    """The jax.checkpoint policy, or None when layers are not rematerialised."""
    if self.remat == "none":
      return None
    if self.remat == "full":
      return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
