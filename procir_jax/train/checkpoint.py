"""Orbax checkpoints: train state, the grain iterator, and the config, together.

Saves are asynchronous; `max_to_keep` bounds how many stay, and with `best_metric`
the best by that (validation) metric are kept instead. Orbax writes each step into a
temporary directory and renames it only when complete, so a half-written checkpoint is
never listed, let alone restored. Restoring takes the target shardings, so a checkpoint
restores onto a different mesh.

A complete checkpoint can still be damaged later (a disk fault, a file removed by
hand). `restore_latest` then falls back to the newest intact step and moves the damaged
ones aside as `<directory>/<step>.damaged-<n>` (Orbax lists only names that are plain
step numbers, so it neither restores nor deletes them); every restore failure is one
`CheckpointError` whose one-line message names the step, the directory and the cause.

Multi-host: every process checks and restores the same step (process 0 picks it and
broadcasts it), the processes agree on whether it worked before anyone falls back, and
only process 0 moves directories, behind a barrier.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

# The suffix of a damaged step moved aside: not a step name to Orbax, whose standard
# names are `^(0|[1-9]\d*)$` (and, for legacy listings, digits after the last '_').
DAMAGED = ".damaged-"


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored. `tried` lists (step, cause) newest first."""

  def __init__(self, message: str, directory: epath.Path,
               tried: list[tuple[int, str]]):
    super().__init__(message)
    self.directory = directory
    self.tried = tried


def _restore_subset(directory: epath.Path, abstract_state: Any) -> Any:
  """The leaves of a saved `state` item that `abstract_state` names, read alone.

  StandardRestore needs the whole tree; the PyTree handler beneath it (same files)
  restores a subset, so evaluation reads no optimizer state.
  """
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True))


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

  def saved_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest), or None when there is no
    step, it was saved without one, or it cannot be read (restoring then says why)."""
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "config").exists():
      return None
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not read the config saved with step %d in %s: %s", step,
                      self.directory, str(e).splitlines()[0] if str(e) else e)
      return None
    return dict(restored["config"])

  def restore(self, step: int | None, abstract_state: Any, data_iterator=None, *,
              partial: bool = False) -> tuple[int, Any]:
    """Restores `state` with the shardings of `abstract_state` (and the iterator).

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `sharding` set, e.g.
    `jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state, shardings)`. `step=None` means the latest, without falling back (see
    `restore_latest`). Raises CheckpointError when the step cannot be restored.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    state, problem, _ = self._attempt(step, abstract_state, data_iterator, partial)
    if problem is not None:
      raise self._error(step, problem)
    return step, state

  def restore_latest(self, abstract_state: Any, data_iterator=None, *,
                     fall_back: bool = True, move_aside: bool = True,
                     partial: bool = False) -> tuple[int, Any]:
    """Restores the newest step that restores; returns (step, state).

    When a step fails and `fall_back`, logs a warning naming it and the cause and
    tries the next newest. Once an older step restores, the newer failed ones are
    moved aside (`<step>.damaged-<n>`, never deleted) so that training re-saves
    those step numbers cleanly; a step with files missing or unreadable is moved
    aside even when nothing restores. A failure that every step shares (e.g. an
    `abstract_state` that no longer matches after a model change) moves nothing.
    `move_aside=False` only skips damaged steps (for readers such as evaluation that
    must not touch a directory a training run owns). Raises CheckpointError naming
    every step tried when none restores, or on the first failure without `fall_back`.
    """
    tried: list[tuple[int, str]] = []
    definite: list[int] = []
    remaining = sorted(self.all_steps(), reverse=True)
    if not remaining:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    while True:
      # Process 0 picks the step so that every process restores the same one even
      # if their listings of a shared filesystem disagree for a moment.
      step = _broadcast_int(remaining[0] if remaining else -1)
      if step < 0:
        break
      remaining = [s for s in remaining if s < step]
      state, problem, damaged = self._attempt(step, abstract_state, data_iterator,
                                              partial)
      if problem is None:
        if tried and move_aside:
          self._move_aside([s for s, _ in tried])
        if tried:
          logging.warning("Restored step %d from %s after skipping damaged step(s) "
                          "%s.", step, self.directory,
                          ", ".join(str(s) for s, _ in tried))
        return step, state
      if not fall_back:
        raise self._error(step, problem)
      tried.append((step, problem))
      if damaged:
        definite.append(step)
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); %s", step,
                      self.directory, problem,
                      f"trying step {remaining[0]}." if remaining else
                      "no older step is left.")
    moved = self._move_aside(definite) if move_aside and definite else {}
    # Steps failing alike (a changed model, say) share one cause in the listing.
    groups: list[tuple[list[int], str]] = []
    for s, cause in tried:
      if groups and groups[-1][1] == cause:
        groups[-1][0].append(s)
      else:
        groups.append(([s], cause))
    listing = "; ".join(f"step{'s' if len(g) > 1 else ''} "
                        f"{', '.join(map(str, g))}: {cause}" for g, cause in groups)
    where = (f" Moved aside: {', '.join(str(p) for p in moved.values())}; rerunning "
             f"starts from scratch unless an intact checkpoint is put back."
             if moved else "")
    raise CheckpointError(
        f"No checkpoint in {self.directory} restores ({listing}).{where} If the "
        f"model, optimizer or data pipeline changed since they were saved, run with "
        f"the config they were saved with or use a new workdir; if they are damaged, "
        f"move them out of {self.directory}.", self.directory, tried)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restore internals --------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self._manager.directory) / str(step)

  def _attempt(self, step: int, abstract_state: Any, data_iterator, partial: bool
               ) -> tuple[Any, str | None, bool]:
    """(state, None, False) on success, else (None, cause, surely damaged). Every
    process returns the same verdict. `partial`: restore only the leaves
    `abstract_state` names (say the parameters, without the optimizer's moments)."""
    _quiet_closed_event_loops()
    problem, damaged = self._check_files(step, with_data=data_iterator is not None)
    if not _all_processes(problem is None):
      damaged = not _all_processes(not damaged)  # damaged anywhere, damaged
      return None, problem or "files missing on another process", damaged
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = None
    try:
      if partial:
        state = _restore_subset(self._step_dir(step) / "state", abstract_state)
      else:
        state = self._manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:  # pylint: disable=broad-except  (any failure is reported)
      # The whole story (tensorstore specs, nested causes) for whoever turns on
      # debug logging; the error itself stays one line.
      logging.debug("Restoring step %d from %s failed.", step, self.directory,
                    exc_info=True)
      problem = _cause(e)
    if not _all_processes(problem is None):
      return None, problem or "failed on another process", False
    return state, None, False

  def _check_files(self, step: int, *, with_data: bool) -> tuple[str | None, bool]:
    """(cause, damaged): the first file a restore needs that is missing or
    unreadable, checked before Orbax reads anything, whose own errors for these are
    misleading (a missing _METADATA reads as a pytree structure mismatch) or buried
    in log noise. `damaged` is False when the step was only saved without an item
    asked for (no iterator saved): that is no reason to move it aside."""
    root = self._step_dir(step)
    metadata = root / "state" / "_METADATA"
    if not metadata.exists():
      return f"missing {metadata}", True
    try:
      use_ocdbt = json.loads(metadata.read_text()).get("use_ocdbt", False)
    except (OSError, ValueError, AttributeError) as e:
      return f"unreadable {metadata} ({_cause(e)})", True
    manifest = root / "state" / "manifest.ocdbt"
    if use_ocdbt and not manifest.exists():
      return f"missing {manifest}", True
    if with_data:
      if not (root / "data").exists():
        return f"saved without the data iterator (no {root / 'data'})", False
      # grain.checkpoint.CheckpointHandler's name for this process's iterator state.
      data = root / "data" / (f"process_{jax.process_index()}-of-"
                              f"{jax.process_count()}.json")
      if not data.exists():
        return f"missing {data}", True
    return None, False

  def _error(self, step: int, problem: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint step {step} in {self.directory} cannot be restored: {problem}. "
        f"If it is damaged, move {self._step_dir(step)} out of {self.directory} and "
        f"rerun.", self.directory, [(step, problem)])

  def _move_aside(self, steps: list[int]) -> dict[int, epath.Path]:
    """Renames each step directory to `<step>.damaged-<n>` (process 0 only), then
    every process reloads its step list. Returns {step: new path}."""
    moved = {}
    failed = []
    if jax.process_index() == 0:
      for step in steps:
        source = self._step_dir(step)
        n = 1
        while (target := source.parent / f"{step}{DAMAGED}{n}").exists():
          n += 1
        try:
          source.rename(target)
        except OSError as e:
          failed.append(f"{source} ({_cause(e)})")
          continue
        moved[step] = target
        logging.warning("Moved damaged checkpoint step %d to %s.", step, target)
    # Every process waits for the renames, then lists the steps afresh; all raise
    # together when process 0 could not move one.
    _barrier(f"procir_checkpoint_moved_{'_'.join(map(str, steps))}")
    self._manager.reload()
    if not _all_processes(not failed):
      raise CheckpointError(
          f"Damaged checkpoint(s) in {self.directory} could not be moved aside: "
          f"{'; '.join(failed) or 'see process 0'}. Move them out of "
          f"{self.directory} by hand and rerun.", self.directory, [])
    return moved


def _cause(e: BaseException) -> str:
  """The exception's type and first line, without tensorstore's JSON spec dump."""
  lines = str(e).strip().splitlines()
  text = re.sub(r"\s*\[tensorstore_spec.*$", "", lines[0] if lines else "")
  if len(text) > 400:  # tensorstore nests its causes: the last one is the root
    text = f"{text[:150]} ... {text[-240:]}"
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (all see the same answer)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _broadcast_int(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _quiet_closed_event_loops() -> None:
  """Drops the tracebacks a failed restore leaves behind, one per array in flight.

  Orbax reads every array through a tensorstore future awaited on a fresh event
  loop, which it closes as soon as the first read fails. Two kinds of leftovers then
  reach `sys.unraisablehook`: reads finishing later on tensorstore's threads, whose
  done-callbacks call `call_soon_threadsafe` on the closed loop (RuntimeError 'Event
  loop is closed'), and Orbax's abandoned read coroutines, which turn the
  GeneratorExit of their clean-up into an Exception carrying a whole TensorStore
  spec (or, never started, warn that they were never awaited). Only these are
  dropped; everything else goes to the hook installed before. Installed for good:
  the leftovers arrive after restore returns.
  """
  warnings.filterwarnings(
      "ignore", message="coroutine '_read_array_index_and_device_put' was never",
      category=RuntimeWarning)
  if getattr(sys.unraisablehook, "_procir_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error, source = unraisable.exc_value, unraisable.object
    if (source is None and isinstance(error, RuntimeError) and
        str(error) == "Event loop is closed"):
      return
    if (isinstance(error.__cause__, GeneratorExit) and
        "/orbax/" in getattr(getattr(source, "cr_code", None), "co_filename", "")):
      return
    previous(unraisable)

  hook._procir_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def abstract_like(state: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
