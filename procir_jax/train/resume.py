"""What may change between a run and its resumption.

A checkpoint keeps the config it was saved with. On resume every difference from the
current config is listed; the ones that would make the resumed run differ from an
uninterrupted one (schedule length, batch size, seed, data, model) stop the run unless
`train.allow_resume_changes` is set. Resuming with a different number of steps on
purpose keeps the saved learning-rate schedule, so the steps already planned follow
the same trajectory and the extra ones continue at its final rate.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from absl import logging
import ml_collections

# Keys (or prefixes ending in ".") whose change makes a resumed run differ from an
# uninterrupted one; `{stage}` is the stage's section (train or sft).
PROTECTED = ("seed", "data.global_batch_size", "{stage}.steps",
             "data.manual_dir", "data.data_dir", "data.use_synthetic",
             "data.synthetic.", "data.max_views", "data.query_text",
             "data.image_backend", "model.hf_dir", "model.tiny_preset",
             "model.checkpoint", "model.dtype", "procir.")
OVERRIDE = "--config.train.allow_resume_changes=True"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _stage_view(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
  """The flat config as a stage sees it: its section is `train` with the stage's
  overrides (the SFT stage's steps and lr), and the other sections as they are."""
  # As saved: JSON, so that tuples and lists, and odd values, compare as stored.
  config = json.loads(json.dumps(dict(config), default=str))
  effective = dict(config.get("train", {}))
  if stage != "train":
    effective.update(config.get(stage, {}))
  flat = _flatten({k: v for k, v in config.items() if k not in ("train", "sft")})
  flat.update(_flatten(effective, f"{stage}."))
  return flat


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], stage: str
                ) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every key that differs."""
  old, new = _stage_view(saved, stage), _stage_view(current, stage)
  missing = object()
  return [(k, old.get(k, missing), new.get(k, missing))
          for k in sorted(set(old) | set(new))
          if old.get(k, missing) != new.get(k, missing)]


def _protected(key: str, stage: str) -> bool:
  for rule in PROTECTED:
    rule = rule.format(stage=stage)
    if key == rule or (rule.endswith(".") and key.startswith(rule)):
      return True
  return False


def _show(value) -> str:
  return "(absent)" if not isinstance(value, (str, int, float, bool, list, type(None))
                                      ) else json.dumps(value)


def checked_schedule(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                     stage: str, schedule: ml_collections.ConfigDict, *,
                     allow: bool, where: str) -> ml_collections.ConfigDict:
  """Compares the checkpoint's config with the current one for a resumed `stage`.

  Logs every difference; raises ValueError listing those that change the run unless
  `allow`. Returns the settings to build the learning-rate schedule from: `schedule`
  (the stage's train settings), with the saved number of steps when it changed.
  """
  if saved is None:
    return schedule
  diffs = differences(saved, current, stage)
  if not diffs:
    return schedule
  lines = [f"  {k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs]
  logging.warning("Resuming from %s with a changed config:\n%s", where,
                  "\n".join(lines))
  refused = [f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs
             if _protected(k, stage)]
  if refused and not allow:
    raise ValueError(
        f"The checkpoint in {where} was saved with another config, and resuming "
        f"with these changes would not continue the same run: {'; '.join(refused)}. "
        f"Use the saved values, a new --workdir, or {OVERRIDE} to resume anyway.")
  saved_steps = _stage_view(saved, stage).get(f"{stage}.steps")
  if isinstance(saved_steps, int) and saved_steps != schedule.steps:
    logging.warning("The learning-rate schedule keeps the saved run's length (%d "
                    "steps); the run now stops at step %d.", saved_steps,
                    schedule.steps)
    schedule = ml_collections.ConfigDict(schedule.to_dict())
    schedule.steps = saved_steps
  return schedule
