"""Resuming with a changed config: every difference listed, the ones that change the
run refused unless allowed, and the saved schedule kept when steps change."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax.train import optimizer as opt_lib
from procir_jax.train import resume


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint saved with the base config, and that config as read back."""
  directory = tmp_path_factory.mktemp("ckpt")
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  checkpointer.save(5, {"w": jnp.ones(3), "step": jnp.int32(5)},
                    config=base.get_config().to_dict())
  checkpointer.close()
  return ckpt_lib.Checkpointer(str(directory)).saved_config(), str(directory)


def _check(saved_config, config, stage="train", allow=False):
  section = config.train if stage == "train" else config[stage]
  schedule = config.train if stage == "train" else section
  return resume.checked_schedule(saved_config, config.to_dict(), stage, schedule,
                                 allow=allow, where="ckpt")


def test_the_same_config_resumes_silently(saved, caplog):
  config, _ = saved
  with caplog.at_level(logging.WARNING):
    assert _check(config, base.get_config()).steps == 300
  assert "changed config" not in caplog.text


def test_harmless_changes_are_listed(saved, caplog):
  current = base.get_config()
  current.train.log_every = 7
  current.data.worker_count = 4
  with caplog.at_level(logging.WARNING):
    _check(saved[0], current)
  assert "train.log_every: 10 -> 7" in caplog.text
  assert "data.worker_count: 0 -> 4" in caplog.text


@pytest.mark.parametrize("change, shown", [
    (lambda c: setattr(c, "seed", 1), "seed: 0 -> 1"),
    (lambda c: setattr(c.data, "global_batch_size", 32),
     "data.global_batch_size: 16 -> 32"),
    (lambda c: setattr(c.train, "steps", 600), "train.steps: 300 -> 600"),
    (lambda c: setattr(c.data.synthetic, "train_products", 5),
     "data.synthetic.train_products"),
    (lambda c: setattr(c.model, "hf_dir", "/models/other"), "model.hf_dir"),
    (lambda c: setattr(c.procir, "cot", False), "procir.cot: true -> false"),
])
def test_changes_that_alter_the_run_are_refused(saved, change, shown):
  current = base.get_config()
  change(current)
  with pytest.raises(ValueError, match="allow_resume_changes=True") as e:
    _check(saved[0], current)
  assert shown in str(e.value) and "ckpt" in str(e.value)


def test_a_stage_minds_its_own_steps(saved):
  current = base.get_config()
  current.sft.steps = 40
  with pytest.raises(ValueError, match=r"sft.steps: 20 -> 40"):
    _check(saved[0], current, stage="sft")
  current = base.get_config()
  current.train.steps = 600  # the contrastive stage's length: not the SFT stage's
  assert _check(saved[0], current, stage="sft").steps == 20


def test_more_steps_on_purpose_keep_the_saved_schedule(saved):
  current = base.get_config()
  current.train.steps = 600
  schedule = _check(saved[0], current, allow=True)
  assert schedule.steps == 300 and current.train.steps == 600
  kept = opt_lib.learning_rate(schedule)
  original = opt_lib.learning_rate(base.get_config().train)
  steps = np.arange(0, 600, 7)
  np.testing.assert_allclose([kept(s) for s in steps[steps <= 300]],
                             [original(s) for s in steps[steps <= 300]])
  final = base.get_config().train.lr * base.get_config().train.final_lr_fraction
  np.testing.assert_allclose([kept(s) for s in steps[steps > 300]], final, rtol=1e-6)


def test_a_checkpoint_without_a_config_is_not_compared(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert checkpointer.saved_config() is None
  checkpointer.save(1, {"w": jnp.ones(2)})
  checkpointer.wait()
  assert checkpointer.saved_config() is None
  checkpointer.close()
