"""The jitted training step over a sharded train state."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from procir_jax import procir as procir_lib
from procir_jax import sharding


@dataclasses.dataclass
class TrainState:
  """Everything a checkpoint restores: parameters, optimizer state, step, and the
  non-finite steps seen so far (how many, and the first one; -1 for none)."""

  params: Any
  opt_state: Any
  step: jax.Array
  nonfinite_steps: jax.Array
  first_nonfinite_step: jax.Array

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

  @classmethod
  def fresh(cls, params, opt_state) -> "TrainState":
    return cls(params, opt_state, jnp.int32(0), jnp.int32(0), jnp.int32(-1))


jax.tree_util.register_dataclass(
    TrainState, data_fields=["params", "opt_state", "step", "nonfinite_steps",
                             "first_nonfinite_step"], meta_fields=[])


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


class Trainer:
  """Builds the sharded state and the step for one mode (contrastive or sft)."""

  def __init__(self, procir: procir_lib.ProCIR, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, loss_cfg: procir_lib.LossConfig, *,
               mode: str, cot: bool = False, skip_nonfinite: bool = False):
    if mode not in ("contrastive", "sft"):
      raise ValueError(f"Trainer mode must be contrastive or sft, got {mode!r}.")
    self.graphdef, params = nnx.split(procir, nnx.Param)
    self.tx, self.mesh, self.loss_cfg = tx, mesh, loss_cfg
    self.mode, self.cot, self.skip_nonfinite = mode, cot, skip_nonfinite
    self._abstract = jax.eval_shape(
        lambda p: TrainState.fresh(p, tx.init(p)), params)
    self.shardings = sharding.tree_shardings(self._abstract, mesh)
    self._initial_params = params
    self._step = jax.jit(self._train_step, donate_argnums=0)

  def init_state(self) -> TrainState:
    """The fresh state, created directly in its shardings."""
    params = jax.device_put(self._initial_params, self.shardings.params)
    init = jax.jit(lambda p: TrainState.fresh(p, self.tx.init(p)),
                   out_shardings=self.shardings)
    return init(params)

  def abstract_state(self) -> TrainState:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self._abstract, self.shardings)

  def procir(self, state: TrainState) -> procir_lib.ProCIR:
    return nnx.merge(self.graphdef, state.params)

  def losses(self, params, batch) -> dict[str, jax.Array]:
    procir = nnx.merge(self.graphdef, params)
    if self.mode == "sft":
      return procir_lib.sft_losses(procir, batch, self.loss_cfg)
    return procir_lib.contrastive_losses(procir, batch, self.loss_cfg, self.cot)

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    def loss_fn(params):
      terms = self.losses(params, batch)
      return procir_lib.total_loss(terms, self.loss_cfg), terms

    with sharding.mesh_context(self.mesh):
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # A finite loss and gradient can still give a non-finite update (say the
    # temperature overflowing): the updated state itself is checked, on the device.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
              & _all_finite(opt_state))
    if self.skip_nonfinite:  # keep the old state; the skip is counted below
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    step = state.step + 1
    new = TrainState(
        params, opt_state, step,
        state.nonfinite_steps + (~finite).astype(jnp.int32),
        jnp.where(~finite & (state.first_nonfinite_step < 0), step,
                  state.first_nonfinite_step))
    new = jax.lax.with_sharding_constraint(new, self.shardings)
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite,
                   nonfinite_steps=new.nonfinite_steps)
    return new, metrics

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    return self._step(state, batch)

  def lower(self, batch) -> jax.stages.Lowered:
    """The step lowered for the abstract state and a batch (arrays or
    ShapeDtypeStructs with shardings): `.compile()` it ahead of time, e.g. for
    devices this host does not have, and read its memory and cost analyses."""
    return self._step.trace(self.abstract_state(), batch).lower()


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the metrics (loss terms, gradient norm) that are NaN or inf."""
  return [name for name, value in metrics.items()
          if name not in ("finite", "nonfinite_steps")
          and not bool(jnp.isfinite(jnp.asarray(value)).all())]
