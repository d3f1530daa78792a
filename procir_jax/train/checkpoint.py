"""Orbax checkpoints: train state, the grain iterator, and the config, together.

Saves are asynchronous; `max_to_keep` bounds how many stay, and with `best_metric`
the best by that (validation) metric are kept instead. Orbax writes each step into a
temporary directory and renames it only when complete, so a half-written checkpoint is
never listed, let alone restored. Restoring takes the target shardings, so a checkpoint
restores onto a different mesh.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A CheckpointManager whose items are `state`, `data` and `config`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3,
               best_metric: str | None = None, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        # Periodic and preemption saves carry no validation metrics; keep them too.
        best_mode="max", keep_checkpoints_without_metrics=True,
        enable_async_checkpointing=async_save, create=True)
    self.directory = epath.Path(directory)
    self._best_metric = best_metric
    self._manager = ocp.CheckpointManager(
        self.directory.resolve(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by `best_metric` among those saved with metrics; None when none
    has metrics (or no `best_metric` was given)."""
    if not self._best_metric:
      return None
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, config: dict | None = None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
    return self._manager.save(step, args=ocp.args.Composite(**items),
                              metrics=metrics, force=force)

  def restore(self, step: int | None, abstract_state: Any, data_iterator=None
              ) -> tuple[int, Any]:
    """Restores `state` with the shardings of `abstract_state` (and the iterator).

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `sharding` set, e.g.
    `jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state, shardings)`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
