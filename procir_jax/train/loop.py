"""The training loop: data, steps, metrics, validation, checkpoints, preemption."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Mapping

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import numpy as np

from procir_jax.data import pipeline
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax import sharding
from procir_jax.train import step as step_lib


class Preemption:
  """Turns SIGTERM (how TPU VMs and schedulers preempt) into a step to stop at.

  One process: a SIGTERM handler sets a flag. Several with JAX's distributed runtime:
  its preemption service catches the SIGTERM of any process and all of them stop at
  the same step (`multihost_utils.reached_preemption_sync_point`, as Orbax's and
  MaxText's loops do), so that they save the same checkpoint together. Several
  without it: each process's own flag, agreed on by all every `sync_every` steps.
  """

  def __init__(self, sync_every: int = 10):
    self._event = threading.Event()
    self._previous = None
    self._mode = "local"
    self._sync_every = sync_every

  def __enter__(self):
    if jax.process_count() > 1 and jax.distributed.is_initialized() and bool(
        jax.config.jax_enable_preemption_service):
      self._mode = "service"
    else:
      self._mode = "agree" if jax.process_count() > 1 else "local"
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called once for every step."""
    if self._mode == "service":
      return multihost_utils.reached_preemption_sync_point(step)
    if self._mode == "agree":
      if step % self._sync_every:
        return False
      return bool(np.max(multihost_utils.process_allgather(
          np.int32(self._event.is_set()))))
    return self._event.is_set()


@dataclasses.dataclass
class LoopConfig:
  steps: int
  log_every: int = 10
  eval_every: int = 0  # 0: no validation during training
  checkpoint_every: int = 100
  skip_nonfinite: bool = False
  # A checkpoint that fails to restore is moved aside and the next newest one tried.
  fall_back_on_bad_checkpoint: bool = True
  # (first, last) step to trace with jax.profiler into profile_dir, or None.
  profile_steps: tuple[int, int] | None = None
  profile_dir: str = ""


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """"A,B" (steps A to B, inclusive; "A" alone: one step) -> (A, B); "" -> None."""
  text = str(text).strip().strip("()[]")
  if not text:
    return None
  try:
    parts = [int(p) for p in text.replace(" ", "").split(",") if p]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
    raise ValueError(f"train.profile_steps must be 'A,B' with 1 <= A <= B (steps A to "
                     f"B are traced), got {text!r}.")
  return parts[0], parts[1]


class StepProfiler:
  """Traces steps A..B with jax.profiler (TensorBoard's profile tab, or Perfetto).

  The trace starts before step A runs and stops once step B's results are ready, so
  it holds exactly those steps (and the host work between them); each step is
  annotated with its number.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str):
    self.steps, self.directory, self.active = steps, directory, False

  def before(self, step: int) -> None:
    """Called before running `step` (1-based)."""
    if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
      # The xplane file is TensorBoard's; the .trace.json.gz beside it, Perfetto's.
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def annotate(self, step: int):
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, outputs) -> None:
    if self.active and step >= self.steps[1]:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if not self.active:
      return
    if outputs is not None:
      jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.active = False
    logging.info("Wrote a profile of steps %d-%d to %s (open it with `tensorboard "
                 "--logdir %s`, or the .trace.json.gz in ui.perfetto.dev).",
                 self.steps[0], self.steps[1], self.directory, self.directory)


class TrainingStopped(RuntimeError):
  """Training stopped early on purpose (preemption), its checkpoint saved."""

  def __init__(self, message: str, step: int, directory: str):
    super().__init__(message)
    self.step, self.directory = step, directory


def _progress(step: int, total: int, timer: tuple[float, int], examples: int,
              metrics: Mapping[str, float]) -> str:
  """The progress line; `timer` is (time, step) after the first, compiling, step,
  so that compilation stays out of the rate and the ETA."""
  elapsed = time.perf_counter() - timer[0]
  done = step - timer[1]
  terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                   if k not in ("finite",))
  if done <= 0:
    return f"step {step}/{total} | compiled, timing from the next step | {terms}"
  rate = done / max(elapsed, 1e-9)
  eta = (total - step) / max(rate, 1e-9)
  return (f"step {step}/{total} | {rate:.2f} steps/s {rate * examples:.1f} ex/s | "
          f"ETA {eta / 60:.1f} min | {terms}")


def _checked_metrics(metrics, state: step_lib.TrainState, step: int, cfg: LoopConfig,
                     reported: int) -> tuple[dict[str, float], int]:
  """The step's metrics on the host, after stopping on a non-finite step (the first
  one, by the state's own count) or, with `skip_nonfinite`, logging the new skips;
  and the count of non-finite steps reported so far."""
  metrics = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
  count = int(state.nonfinite_steps)
  if count == reported:
    return metrics, count
  first = int(state.first_nonfinite_step)
  if not cfg.skip_nonfinite:
    bad = step_lib.nonfinite_terms(metrics) if step == first else []
    what = ", ".join(bad) if bad else "loss, gradient or updated parameters"
    raise FloatingPointError(
        f"Non-finite {what} at step {first} ({count} non-finite step(s) by step "
        f"{step}). Lower the learning rate, check the inputs, or set "
        f"train.skip_nonfinite=True to skip such steps.")
  logging.warning("%d step(s) skipped so far for non-finite values (the first at step "
                  "%d); their updates were not applied.", count, first)
  return metrics, count


def train(trainer: step_lib.Trainer, loader, checkpointer: ckpt_lib.Checkpointer,
          cfg: LoopConfig, *, workdir: str, config_dict: dict,
          validate: Callable[[Any], dict[str, float]] | None = None,
          global_batch_size: int, state: step_lib.TrainState | None = None
          ) -> step_lib.TrainState:
  """Trains to `cfg.steps`, resuming from the latest checkpoint when there is one."""
  mesh = trainer.mesh
  sharding_for = sharding.batch_sharding(mesh)
  iterator = iter(loader)
  if checkpointer.latest_step() is not None:
    # The newest intact step: a damaged one is moved aside with a warning.
    start_step, restored = checkpointer.restore_latest(
        trainer.abstract_state().as_dict(), data_iterator=iterator,
        fall_back=cfg.fall_back_on_bad_checkpoint)
    state = step_lib.TrainState.from_dict(restored)
    logging.info("Resumed from step %d in %s.", start_step, checkpointer.directory)
  else:
    state = state if state is not None else trainer.init_state()
    start_step = int(state.step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  skip_counter: dict[str, int] = {}
  examples = global_batch_size
  step, last, timer = start_step, {}, None
  reported_nonfinite = int(state.nonfinite_steps)
  profiler = StepProfiler(cfg.profile_steps, cfg.profile_dir)
  with Preemption() as preemption:
    while step < cfg.steps:
      batch = next(iterator)
      pipeline.log_skips(batch, skip_counter)
      profiler.before(step + 1)
      with profiler.annotate(step + 1):
        state, metrics = trainer.step(state, pipeline.to_global(batch, sharding_for))
      step += 1
      if timer is None:  # the first call compiled the step
        timer = (time.perf_counter(), step)
      profiler.after(step, (state, metrics))
      log = step % cfg.log_every == 0 or step == cfg.steps
      validating = bool(validate and cfg.eval_every and (
          step % cfg.eval_every == 0 or step == cfg.steps))
      # The only host syncs: a state is checked before it is logged, validated or
      # saved, so a non-finite one is never checkpointed.
      if log or validating:
        last, reported_nonfinite = _checked_metrics(metrics, state, step, cfg,
                                                    reported_nonfinite)
      if log:
        writer.write_scalars(step, dict(last, **{k: float(v) for k, v in
                                                 skip_counter.items()}))
        logging.info(_progress(step, cfg.steps, timer, examples, last))
      val = None
      if validating:
        val = validate(state)
        writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
        logging.info("step %d validation: %s", step, val)
      stop = preemption.reached(step)
      save = step % cfg.checkpoint_every == 0 or step == cfg.steps or stop or validating
      if save and not (log or validating):
        last, reported_nonfinite = _checked_metrics(metrics, state, step, cfg,
                                                    reported_nonfinite)
      if save:
        checkpointer.save(step, state.as_dict(), iterator, config_dict, metrics=val,
                          force=True)
      if stop:
        profiler.stop()
        checkpointer.wait()
        writer.flush()
        raise TrainingStopped(
            f"Preempted (SIGTERM) at step {step}: the checkpoint of step {step} is "
            f"saved in {checkpointer.directory}; run the same command again to resume.",
            step, str(checkpointer.directory))
  profiler.stop(state)
  checkpointer.wait()
  writer.flush()
  return state
