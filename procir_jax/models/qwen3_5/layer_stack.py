"""Running a stack of layers: per-layer rematerialisation and an optional scan.

Parameters stay per layer (one NNX module per layer, as in the checkpoint), so the
loader, the sharding rules and the optimizer see the same tree whatever the options.
Under `scan_layers` the layers that share a position in the repeating pattern are
stacked on the fly and `lax.scan` runs one period per step: XLA compiles one period
instead of every layer, and the stacked copy costs one read and write of the weights
per step.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from flax import nnx
import jax
import jax.numpy as jnp

from procir_jax import sharding
from procir_jax.models.qwen3_5.options import ModelOptions

X = TypeVar("X")


def run_layers(layers: Sequence[nnx.Module], x: X,
               call: Callable[[nnx.Module, X], X], options: ModelOptions, *,
               period: int = 1) -> X:
  """Applies `call(layer, x)` for every layer in order and returns the final x.

  Args:
    layers: the modules, in order.
    x: the carried activations (any pytree of arrays).
    call: runs one layer; it may close over arrays shared by all layers (RoPE
      tables, masks), which rematerialisation keeps rather than recomputes.
    options: `remat`, `scan_layers` and `unroll_loops` are read from here.
    period: length of the repeating pattern of layer kinds (e.g. 4 for three
      linear-attention layers then one full-attention layer); the scan runs
      len(layers) / period steps.
  """
  policy = options.remat_policy()

  def step_fn(graphdef):
    def step(state, x):
      return sharding.constrain_batch(
          call(nnx.merge(graphdef, state), sharding.constrain_batch(x)))
    return jax.checkpoint(step, policy=policy) if policy is not None else step

  splits = [nnx.split(layer) for layer in layers]
  groups = len(layers) // period if period else 0
  scannable = (options.scan_layers and not options.unroll_loops and groups > 1 and
               len(layers) % period == 0 and
               all(gd == splits[i % period][0] for i, (gd, _) in enumerate(splits)))
  if not scannable:
    for graphdef, state in splits:
      x = step_fn(graphdef)(state, x)
    return x

  steps = [step_fn(splits[j][0]) for j in range(period)]
  stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves),
                          *[splits[g * period + j][1] for g in range(groups)])
             for j in range(period)]

  def body(x, states):
    for step, state in zip(steps, states):
      x = step(state, x)
    return x, None

  x, _ = jax.lax.scan(body, x, stacked)
  return x


def pattern_period(kinds: Sequence[str]) -> int:
  """The shortest period p with kinds[i] == kinds[i % p] that divides len(kinds)."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n
