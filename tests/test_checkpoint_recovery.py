"""Damaged checkpoints: one clear error, and a fall back to the newest intact step.

Steps 15 and 20 are saved once (train state plus the grain iterator); each test copies
them and damages step 20 the way disks and people do.
"""

import asyncio
import gc
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from procir_jax.train import checkpoint as ckpt_lib


def _dataset():
  # No prefetch threads: the iterator's position is all that matters here.
  return grain.MapDataset.range(100).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _state(step):
  return {"params": {"w": jnp.full((4, 2), float(step)), "b": jnp.arange(3) + step},
          # A tuple inside, as optax states have: Orbax misreports a missing
          # _METADATA for such trees as a pytree structure mismatch.
          "opt_state": (jnp.zeros((2,)) + step, {"count": jnp.asarray(step)}),
          # Many arrays, so that many reads are in flight when one fails.
          "moments": {f"m{i}": jnp.full((8,), float(i + step)) for i in range(24)},
          "step": step}


def _abstract(state, shape_of_w=(4, 2)):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                     sharding=sharding), state)
  abstract["params"]["w"] = jax.ShapeDtypeStruct(shape_of_w, jnp.float32,
                                                 sharding=sharding)
  return abstract


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint directory holding steps 15 and 20, each after `step` elements."""
  directory = tmp_path_factory.mktemp("saved") / "ckpt"
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  iterator = iter(_dataset())
  for step in (15, 20):
    while next(iterator) < step - 1:
      pass
    checkpointer.save(step, _state(step), iterator, {"run": "test"})
  checkpointer.close()
  return directory


@pytest.fixture
def directory(saved, tmp_path):
  copy = tmp_path / "ckpt"
  shutil.copytree(saved, copy)
  return copy


def _truncate_data(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state")
           for name in names if os.path.basename(root) == "d"]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


DAMAGES = {
    # How each is done, and what the error must say about it.
    "truncated_data": (_truncate_data, "OUT_OF_RANGE"),
    "missing_metadata": (lambda d: (d / "state" / "_METADATA").unlink(),
                         "missing {d}/state/_METADATA"),
    "missing_manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(),
                         "missing {d}/state/manifest.ocdbt"),
    "missing_iterator": (lambda d: (d / "data" / "process_0-of-1.json").unlink(),
                         "missing {d}/data/process_0-of-1.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_falls_back_to_the_newest_intact_step(directory, damage, caplog):
  DAMAGES[damage][0](directory / "20")
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  iterator = iter(_dataset())
  with caplog.at_level("WARNING"):
    step, state = checkpointer.restore_latest(_abstract(_state(0)),
                                              data_iterator=iterator)
  assert step == 15
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 2), 15.0))
  np.testing.assert_array_equal(state["opt_state"][1]["count"], 15)
  assert next(iterator) == 15  # where step 15's iterator stood
  # Moved aside, not deleted, and no longer a step to Orbax.
  assert not (directory / "20").exists()
  assert (directory / "20.damaged-1" / "state").is_dir()
  assert checkpointer.all_steps() == [15]
  assert ckpt_lib.Checkpointer(str(directory)).all_steps() == [15]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("step 20" in w and DAMAGES[damage][1].split()[0] in w for w in warnings)
  checkpointer.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_without_fall_back_one_line_names_step_directory_and_cause(directory, damage):
  DAMAGES[damage][0](directory / "20")
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    checkpointer.restore_latest(_abstract(_state(0)), data_iterator=iter(_dataset()),
                                fall_back=False)
  message = str(error.value)
  assert "\n" not in message and "tensorstore_spec" not in message
  assert f"step 20 in {directory} " in message
  assert DAMAGES[damage][1].format(d=directory / "20") in message
  assert (directory / "20").is_dir()  # without fall_back nothing moves
  # `restore` of that step says the same.
  with pytest.raises(ckpt_lib.CheckpointError, match="step 20 in "):
    checkpointer.restore(20, _abstract(_state(0)), data_iterator=iter(_dataset()))
  checkpointer.close()


def test_training_resaves_a_step_that_was_moved_aside(directory):
  (directory / "20" / "state" / "manifest.ocdbt").unlink()
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  checkpointer.restore_latest(_abstract(_state(0)))
  checkpointer.save(20, _state(21))
  assert checkpointer.all_steps() == [15, 20]
  step, state = checkpointer.restore_latest(_abstract(_state(0)))
  assert step == 20 and float(state["params"]["w"][0, 0]) == 21.0
  assert (directory / "20.damaged-1").is_dir()
  checkpointer.close()


def test_no_intact_step_lists_what_was_tried(directory):
  for step in (15, 20):
    (directory / str(step) / "state" / "manifest.ocdbt").unlink()
  (directory / "20.damaged-1").mkdir()  # an earlier casualty keeps its name
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    checkpointer.restore_latest(_abstract(_state(0)))
  message = str(error.value)
  assert "\n" not in message
  assert message.index("step 20: missing") < message.index("step 15: missing")
  assert [s for s, _ in error.value.tried] == [20, 15]
  # Missing files are damage for sure: moved aside even though nothing restored.
  assert sorted(p.name for p in directory.iterdir()) == [
      "15.damaged-1", "20.damaged-1", "20.damaged-2"]
  assert checkpointer.latest_step() is None
  checkpointer.close()


def test_a_state_that_fits_no_step_moves_nothing(directory):
  # A changed model fails on every step alike: that is no damage.
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="steps 20, 15: .*not compat"):
    checkpointer.restore_latest(_abstract(_state(0), shape_of_w=(5, 2)))
  assert sorted(p.name for p in directory.iterdir()) == ["15", "20"]
  checkpointer.close()


def test_steps_saved_without_an_iterator_are_not_damage(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  checkpointer.save(5, _state(5))
  with pytest.raises(ckpt_lib.CheckpointError, match="saved without the data"):
    checkpointer.restore_latest(_abstract(_state(0)), data_iterator=iter(_dataset()))
  assert checkpointer.all_steps() == [5]  # still there, for a restore without one
  assert checkpointer.restore_latest(_abstract(_state(0)))[0] == 5
  checkpointer.close()


def test_readers_skip_damage_without_moving_it(directory):
  (directory / "20" / "data" / "process_0-of-1.json").unlink()
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
  step, _ = checkpointer.restore_latest(_abstract(_state(0)),
                                        data_iterator=iter(_dataset()),
                                        move_aside=False)
  assert step == 15 and (directory / "20").is_dir()
  checkpointer.close()


def _late_tensorstore_callback():
  """What a failed restore leaves behind: a tensorstore read finishing after Orbax
  closed the event loop awaiting it (tensorstore reports the RuntimeError of its
  callback through sys.unraisablehook)."""
  import tensorstore as ts

  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()

  async def start_waiting():
    future.__await__()  # registers the done-callback on this loop

  loop.run_until_complete(start_waiting())
  loop.close()
  promise.set_result(1)  # the callback finds the loop closed


def _closed_loop(errors):
  return sum(isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
             for e in errors)


def test_closed_event_loop_tracebacks_are_dropped_and_others_kept():
  gc.collect()  # leftovers of earlier tests go to the hook they met
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: seen.append(u.exc_value)
  try:
    _late_tensorstore_callback()
    assert _closed_loop(seen) == 1  # the noise is real
    ckpt_lib._quiet_closed_event_loops()
    _late_tensorstore_callback()
    assert _closed_loop(seen) == 1

    class Noisy:
      def __del__(self):
        raise KeyError("kept")

    Noisy()
    gc.collect()
    assert any(isinstance(e, KeyError) for e in seen)
  finally:
    sys.unraisablehook = previous


def test_a_failed_read_leaves_no_tracebacks_behind(directory):
  # Many arrays in flight when the first read fails: Orbax abandons the rest.
  _truncate_data(directory / "20")
  gc.collect()
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    with warnings.catch_warnings(record=True) as warned:
      warnings.simplefilter("always")
      checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)
      for _ in range(3):  # how many reads finish late varies from run to run
        with pytest.raises(ckpt_lib.CheckpointError, match="OUT_OF_RANGE"):
          checkpointer.restore(20, _abstract(_state(0)))
        with pytest.raises(ckpt_lib.CheckpointError, match="not compatible"):
          checkpointer.restore(15, _abstract(_state(0), shape_of_w=(5, 2)))
      checkpointer.close()
      time.sleep(0.2)  # reads still in flight finish on tensorstore's threads
      gc.collect()  # abandoned coroutines
  finally:
    sys.unraisablehook = previous
  assert [f"{u.object!r}: {u.exc_value!r}" for u in seen] == []
  assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []


def test_a_step_that_cannot_be_moved_aside_is_named(directory, monkeypatch):
  (directory / "20" / "state" / "_METADATA").unlink()
  checkpointer = ckpt_lib.Checkpointer(str(directory), async_save=False)

  def refuse(self, target):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(type(checkpointer._step_dir(20)), "rename", refuse)
  with pytest.raises(ckpt_lib.CheckpointError, match=(
      r"could not be moved aside: .*/20 \(PermissionError.*by hand")):
    checkpointer.restore_latest(_abstract(_state(0)))
  assert (directory / "20").is_dir()
  checkpointer.close()


_TWO_PROCESSES = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import grain, numpy as np
from jax.experimental import multihost_utils
from procir_jax.train import checkpoint as ckpt_lib
directory = sys.argv[3]
mesh = jax.make_mesh((2,), ("x",))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
dataset = grain.MapDataset.range(100)[jax.process_index()::2].to_iter_dataset(
    grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
iterator = iter(dataset)
for step in (15, 20):
  for _ in range(5):
    next(iterator)
  w = jax.make_array_from_callback((4, 2), rows, lambda i: np.full((4, 2), step)[i])
  checkpointer.save(step, {"w": w}, iterator)
checkpointer.close()
multihost_utils.sync_global_devices("saved")
if jax.process_index() == 1:  # only process 1 can tell that step 20 is damaged
  os.remove(os.path.join(directory, "20", "data", "process_1-of-2.json"))
multihost_utils.sync_global_devices("damaged")
checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
iterator = iter(dataset)
step, state = checkpointer.restore_latest(
    {"w": jax.ShapeDtypeStruct((4, 2), np.int32, sharding=rows)}, iterator)
checkpointer.close()
print(json.dumps({"step": step, "next": next(iterator),
                  "w": [int(s.data[0, 0]) for s in state["w"].addressable_shards]}))
"""


def test_two_processes_agree_on_the_step_when_only_one_sees_damage(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  processes = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESSES, f"127.0.0.1:{port}", str(i),
       str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  results = []
  for p in processes:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  # Both fell back to step 15, each with its own shard of the data at step 15's place.
  assert results == [{"step": 15, "next": 10, "w": [15]},
                     {"step": 15, "next": 11, "w": [15]}]
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["15", "20.damaged-1"]
