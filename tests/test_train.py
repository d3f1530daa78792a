"""Training: objectives of every ablation setting, sharding, resume, preemption,
non-finite losses, checkpoints across meshes."""

import json
import os
import signal

from flax import nnx
import jax
import numpy as np
import pytest

from configs import ablation
from procir_jax import factories, tiny_model
from procir_jax.data import pipeline
from procir_jax.train import checkpoint as ckpt_lib
from procir_jax.train import loop as loop_lib
from procir_jax import sharding
from procir_jax.train import optimizer as opt_lib
from procir_jax.train import step as step_lib


@pytest.fixture(scope="module")
def test_model_dir(tmp_path_factory):
  return tiny_model.write_model_dir(tmp_path_factory.mktemp("test_model"), "test")


def _config(data_dir, model_dir, arg="two_stage=1,align=1,cot=1,sft=1", **train):
  c = ablation.get_config(arg)
  c.model.hf_dir = str(model_dir)
  c.data.data_dir = str(data_dir)
  c.data.global_batch_size = 8
  c.data.max_views = 2
  c.eval.max_views = 2
  c.train.update(dict(steps=2, warmup_steps=1, log_every=1, checkpoint_every=100),
                 **train)
  return c


def _data_config(c, **kw):
  return factories.data_config(c, data_dir=c.data.data_dir, model_dir=c.model.hf_dir,
                               **kw)


# Trainers by (config, mode, mesh): a Trainer holds no state of a run, so tests with
# the same settings share one and its compiled step (compiles dominate this file).
_TRAINERS = {}


def _trainer(c, mesh, mode="contrastive"):
  key = (json.dumps(c.to_dict(), sort_keys=True, default=str), mode,
         tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
  if key not in _TRAINERS:
    procir = factories.load_model(c, c.model.hf_dir, mesh)
    params = nnx.state(procir, nnx.Param)
    cfg = c.train if mode == "contrastive" else factories.stage_config(c, "sft")
    _TRAINERS[key] = step_lib.Trainer(
        procir, opt_lib.make_optimizer(cfg, params), mesh, factories.loss_config(c),
        mode=mode, cot=c.procir.cot, skip_nonfinite=c.train.skip_nonfinite)
  return _TRAINERS[key]


def _batches(c, mesh, mode="contrastive", n=2):
  dcfg = _data_config(c, batch_size=c.data.global_batch_size,
                                mesh=mesh)
  loader = pipeline.make_loader(mode, dcfg, pipeline.records_for(mode, dcfg, "train"),
                                train=True)
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_every_ablation_setting_trains_a_step(tmp_path, fashionmv_data_dir,
                                              test_model_dir):
  # One device: sharding is tested elsewhere, and 16 settings compile 9 programs.
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  sharding_for = sharding.batch_sharding(mesh)
  settings = ablation.all_settings()
  assert len(settings) == 16 and len(set(settings)) == 16
  # Settings that differ only in `sft` share the contrastive program and its inputs.
  runs = {}
  for arg in settings:
    c = _config(fashionmv_data_dir, test_model_dir, arg)
    modes = (["sft"] if c.procir.sft else []) + ["contrastive"]
    for mode in modes:
      program = (mode,) if mode == "sft" else (
          mode, c.procir.two_stage, c.procir.align, c.procir.cot)
      if program not in runs:
        trainer = _trainer(c, mesh, mode)
        batch = pipeline.to_global(_batches(c, mesh, mode, 1)[0], sharding_for)
        runs[program] = trainer.step(trainer.init_state(), batch)
      state, metrics = runs[program]
      metrics = jax.device_get(metrics)
      expected = {"sft"} if mode == "sft" else (
          {"retrieval"} | ({"align_source", "align_document"} if c.procir.align else
                           set()) | ({"cot"} if c.procir.cot else set()))
      assert expected <= set(metrics), (arg, mode, sorted(metrics))
      assert all(np.isfinite(metrics[k]) and metrics[k] > 0 for k in expected), arg
      assert int(state.step) == 1


def _run(c, mesh, steps, workdir, state=None, **loop):
  trainer = _trainer(c, mesh)
  dcfg = _data_config(c, batch_size=c.data.global_batch_size,
                                mesh=mesh)
  loader = pipeline.make_loader("contrastive", dcfg,
                                pipeline.records_for("contrastive", dcfg, "train"),
                                train=True)
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "ckpt"))
  state = loop_lib.train(trainer, loader, checkpointer,
                         loop_lib.LoopConfig(steps=steps, log_every=1,
                                             skip_nonfinite=c.train.skip_nonfinite,
                                             **loop),
                         workdir=str(workdir / "metrics"), config_dict=c.to_dict(),
                         global_batch_size=c.data.global_batch_size)
  checkpointer.close()
  return trainer, state


def test_resume_is_bitwise_exact(tmp_path, fashionmv_data_dir, test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir, steps=4)
  mesh = sharding.make_mesh({"data": -1})
  _, straight = _run(c, mesh, 4, tmp_path / "straight")
  _run(c, mesh, 2, tmp_path / "resumed")
  _, resumed = _run(c, mesh, 4, tmp_path / "resumed")
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_device_and_eight_devices_agree(tmp_path, fashionmv_data_dir,
                                           test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir)
  losses = []
  for mesh in (sharding.make_mesh({"data": 1}, jax.devices()[:1]),
               sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    trainer = _trainer(c, mesh)
    state = trainer.init_state()
    run = []
    # The same examples; images packed in one group per batch shard of the mesh.
    for batch in _batches(c, mesh, n=2):
      state, metrics = trainer.step(
          state, pipeline.to_global(batch, sharding.batch_sharding(mesh)))
      run.append(float(metrics["loss"]))
    losses.append(run)
  np.testing.assert_allclose(losses[0], losses[1], rtol=2e-4)


def test_kernels_run_per_shard_under_the_mesh(tmp_path, fashionmv_data_dir,
                                             test_model_dir):
  """The Pallas attention kernel (interpreted on CPU) runs on each device's rows
  and heads through shard_map, and the step equals the XLA attention step."""
  c = _config(fashionmv_data_dir, test_model_dir)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  batch = pipeline.to_global(_batches(c, mesh, n=1)[0],
                             sharding.batch_sharding(mesh))
  losses = []
  for attention, interpret in (("xla", False), ("flash", True)):
    c.model.attention, c.model.interpret_kernels = attention, interpret
    trainer = _trainer(c, mesh)
    jaxpr = str(jax.make_jaxpr(trainer._train_step)(trainer.abstract_state(), batch))
    assert ("shard_map" in jaxpr) == (attention == "flash")
    _, metrics = trainer.step(trainer.init_state(), batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)


def test_checkpoint_restores_onto_another_mesh_and_skips_partial_ones(
    tmp_path, fashionmv_data_dir, test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir)
  trainer, state = _run(c, sharding.make_mesh({"data": -1}), 2, tmp_path)
  # A save that died half-way leaves a temporary directory behind.
  (tmp_path / "ckpt" / "7.orbax-checkpoint-tmp-123").mkdir()
  other = _trainer(c, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert checkpointer.latest_step() == 2
  step, restored = checkpointer.restore(None, other.abstract_state().as_dict())
  assert step == 2
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kernel = restored["params"]["model"]["language_model"]["layers"][0]["mlp"][
      "up_proj"]["kernel"]
  assert kernel.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  checkpointer.close()


def test_sigterm_saves_and_stops(tmp_path, fashionmv_data_dir, test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir)
  mesh = sharding.make_mesh({"data": -1})
  trainer = _trainer(c, mesh)
  dcfg = _data_config(c, batch_size=8, mesh=mesh)
  loader = pipeline.make_loader("contrastive", dcfg,
                                pipeline.records_for("contrastive", dcfg, "train"),
                                train=True)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  calls = []

  def preempt(state):  # a scheduler's SIGTERM arriving during step 2
    calls.append(int(state.step))
    os.kill(os.getpid(), signal.SIGTERM)
    return {}

  with pytest.raises(loop_lib.TrainingStopped, match="SIGTERM.*step 2"):
    loop_lib.train(trainer, loader, checkpointer,
                   loop_lib.LoopConfig(steps=50, log_every=1, eval_every=2,
                                       checkpoint_every=100),
                   workdir=str(tmp_path / "m"), config_dict=c.to_dict(),
                   validate=preempt, global_batch_size=8)
  assert calls == [2]
  assert checkpointer.latest_step() == 2
  checkpointer.close()


def test_nonfinite_loss_names_step_and_term(tmp_path, fashionmv_data_dir,
                                            test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir)
  c.loss.temperature = 0.0  # 0 / 0 logits: NaN in the retrieval loss
  c.loss.learn_temperature = False
  with pytest.raises(FloatingPointError, match=r"Non-finite .*retrieval.* at step 1"):
    _run(c, sharding.make_mesh({"data": -1}), 2, tmp_path / "a")
  assert not (tmp_path / "a" / "ckpt").exists() or not any(
      p.name.isdigit() for p in (tmp_path / "a" / "ckpt").iterdir())


def test_nonfinite_updates_are_caught_on_the_device_and_skips_checkpointed(
    tmp_path, fashionmv_data_dir, test_model_dir):
  """An infinite learning rate: loss and gradient are finite at step 1, the update is
  not. Every step is checked on the device (not only on log steps), a skipped step
  leaves the parameters as they were, and the count is part of the checkpoint."""
  c = _config(fashionmv_data_dir, test_model_dir, steps=3, lr=float("inf"),
              warmup_steps=0, skip_nonfinite=True)
  mesh = sharding.make_mesh({"data": -1})
  trainer = _trainer(c, mesh)
  dcfg = _data_config(c, batch_size=8, mesh=mesh)

  def run(workdir, **loop):
    loader = pipeline.make_loader("contrastive", dcfg,
                                  pipeline.records_for("contrastive", dcfg, "train"),
                                  train=True)
    checkpointer = ckpt_lib.Checkpointer(str(workdir / "ckpt"), async_save=False)
    try:
      return checkpointer, loop_lib.train(
          trainer, loader, checkpointer, loop_lib.LoopConfig(steps=3, **loop),
          workdir=str(workdir / "metrics"), config_dict=c.to_dict(),
          global_batch_size=8)
    finally:
      checkpointer.close()

  with pytest.raises(FloatingPointError,
                     match=r"Non-finite loss, gradient or updated parameters "
                           r"at step 1"):
    run(tmp_path / "stop", log_every=2, skip_nonfinite=False)
  assert ckpt_lib.Checkpointer(str(tmp_path / "stop" / "ckpt")).latest_step() is None

  checkpointer, state = run(tmp_path / "skip", log_every=3, skip_nonfinite=True)
  assert int(state.nonfinite_steps) == 3 and int(state.first_nonfinite_step) == 1
  initial = trainer.init_state()
  for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing applied
  step, restored = ckpt_lib.Checkpointer(str(tmp_path / "skip" / "ckpt")).restore(
      None, trainer.abstract_state().as_dict())
  assert step == 3 and int(restored["nonfinite_steps"]) == 3


@pytest.mark.slow
def test_profile_steps_trace_exactly_those_steps(tmp_path, fashionmv_data_dir,
                                                 test_model_dir):
  c = _config(fashionmv_data_dir, test_model_dir, steps=3)
  profile = tmp_path / "profile"
  _run(c, sharding.make_mesh({"data": -1}), 3, tmp_path / "run",
       profile_steps=loop_lib.parse_profile_steps("2,3"), profile_dir=str(profile))
  traces = list(profile.rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  perfetto = list(profile.rglob("*.trace.json.gz"))
  assert len(perfetto) == 1
  # Each traced step is annotated with its number: steps 2 and 3, not 1.
  import gzip
  events = json.loads(gzip.decompress(perfetto[0].read_bytes()))
  events = events["traceEvents"] if isinstance(events, dict) else events
  steps = {str(e.get("args", {}).get("step_num")) for e in events
           if e.get("name") == "train"}
  assert {"2", "3"} <= steps and "1" not in steps, steps


def test_profile_steps_are_checked():
  assert loop_lib.parse_profile_steps("") is None
  assert loop_lib.parse_profile_steps("5,8") == (5, 8)
  assert loop_lib.parse_profile_steps("(5, 8)") == (5, 8)
  assert loop_lib.parse_profile_steps("7") == (7, 7)
  for bad in ("8,5", "0,2", "a,b", "1,2,3"):
    with pytest.raises(ValueError, match="profile_steps"):
      loop_lib.parse_profile_steps(bad)
