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
import numpy as np

from procir_jax.data import pipeline
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax import sharding
from procir_jax.train import step as step_lib


class Preemption:
  """Turns SIGTERM (how TPU VMs and schedulers preempt) into a flag the loop checks."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  @property
  def requested(self) -> bool:
    return self._event.is_set()


@dataclasses.dataclass
class LoopConfig:
  steps: int
  log_every: int = 10
  eval_every: int = 0  # 0: no validation during training
  checkpoint_every: int = 100
  skip_nonfinite: bool = False
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
  pass


def _progress(step: int, total: int, start_step: int, start: float,
              examples: int, metrics: Mapping[str, float]) -> str:
  elapsed = time.perf_counter() - start
  done = step - start_step
  rate = done / max(elapsed, 1e-9)
  eta = (total - step) / max(rate, 1e-9)
  terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                   if k not in ("finite",))
  return (f"step {step}/{total} | {rate:.2f} steps/s {rate * examples:.1f} ex/s | "
          f"ETA {eta / 60:.1f} min | {terms}")


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
    start_step, restored = checkpointer.restore(
        None, trainer.abstract_state().as_dict(), data_iterator=iterator)
    state = step_lib.TrainState.from_dict(restored)
    logging.info("Resumed from step %d in %s.", start_step, checkpointer.directory)
  else:
    state = state if state is not None else trainer.init_state()
    start_step = int(state.step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  skip_counter: dict[str, int] = {}
  examples = global_batch_size
  start, step, last = time.perf_counter(), start_step, {}
  profiler = StepProfiler(cfg.profile_steps, cfg.profile_dir)
  with Preemption() as preemption:
    while step < cfg.steps:
      batch = next(iterator)
      pipeline.log_skips(batch, skip_counter)
      profiler.before(step + 1)
      with profiler.annotate(step + 1):
        state, metrics = trainer.step(state, pipeline.to_global(batch, sharding_for))
      step += 1
      profiler.after(step, (state, metrics))
      if not cfg.skip_nonfinite or step % cfg.log_every == 0 or step == cfg.steps:
        metrics = jax.device_get(metrics)
        bad = step_lib.nonfinite_terms(metrics)
        if bad and not cfg.skip_nonfinite:
          raise FloatingPointError(
              f"Non-finite {', '.join(bad)} at step {step} "
              f"({ {k: float(np.asarray(metrics[k])) for k in bad} }). Lower the "
              f"learning rate, check the inputs, or set train.skip_nonfinite=True to "
              f"skip such steps.")
        if cfg.skip_nonfinite and not bool(metrics["finite"]):
          skip_counter["nonfinite_steps"] = skip_counter.get("nonfinite_steps", 0) + 1
          logging.warning("Step %d skipped: non-finite %s.", step, bad)
        last = {k: float(np.asarray(v)) for k, v in metrics.items()}
      if step % cfg.log_every == 0 or step == cfg.steps:
        writer.write_scalars(step, dict(last, **{k: float(v) for k, v in
                                                 skip_counter.items()}))
        logging.info(_progress(step, cfg.steps, start_step, start, examples, last))
      val = None
      if validate and cfg.eval_every and (step % cfg.eval_every == 0 or
                                          step == cfg.steps):
        val = validate(state)
        writer.write_scalars(step, {f"val/{k}": v for k, v in val.items()})
        logging.info("step %d validation: %s", step, val)
      if (step % cfg.checkpoint_every == 0 or step == cfg.steps or
          preemption.requested or val is not None):
        checkpointer.save(step, state.as_dict(), iterator, config_dict, metrics=val,
                          force=True)
      if preemption.requested:
        profiler.stop()
        checkpointer.wait()
        writer.flush()
        raise TrainingStopped(f"Preempted (SIGTERM) at step {step}; the checkpoint "
                              f"in {checkpointer.directory} resumes from here.")
  profiler.stop(state)
  checkpointer.wait()
  writer.flush()
  return state
