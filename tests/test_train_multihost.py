"""Two real processes (4 CPU devices each) train together and agree with one process."""

import json
import os
import pickle
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from procir_jax import tiny_model
from procir_jax.data import pipeline
from procir_jax import sharding

_SCRIPT = """
import json, pickle, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[6])
from tests import test_train as t
from procir_jax.data import pipeline
from procir_jax import sharding
c = t._config(sys.argv[3], sys.argv[4])
mesh = sharding.make_mesh({"data": -1})
trainer = t._trainer(c, mesh)
state = trainer.init_state()
losses = []
batches = t._batches(c, mesh, n=2)
pickle.dump([pipeline.agree_on_shapes(b) for b in batches],
            open(sys.argv[5] + f"/batches{sys.argv[2]}.pkl", "wb"))
for batch in batches:
  state, metrics = trainer.step(state, pipeline.to_global(
      batch, sharding.batch_sharding(mesh)))
  losses.append(float(metrics["loss"]))
json.dump({"devices": jax.device_count(), "losses": losses},
          open(sys.argv[5] + f"/out{sys.argv[2]}.json", "w"))
"""


def test_two_processes_train_like_one(tmp_path, fashionmv_data_dir):
  from tests import test_train as t
  model_dir = tiny_model.write_model_dir(tmp_path / "model", "test")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "train2.py"
  script.write_text(_SCRIPT)
  repo = str(pathlib.Path(__file__).parents[1])
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  procs = [subprocess.Popen(
      [sys.executable, str(script), f"127.0.0.1:{port}", str(i),
       str(fashionmv_data_dir), str(model_dir), str(tmp_path), repo],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-4000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert results[0] == results[1] and results[0]["devices"] == 8

  # The same global batches (process 0's rows, then process 1's) on one process.
  local = [pickle.loads((tmp_path / f"batches{i}.pkl").read_bytes()) for i in range(2)]
  assert not set(local[0][0]["index"]) & set(local[1][0]["index"])  # disjoint shards
  c = t._config(str(fashionmv_data_dir), str(model_dir))
  mesh = sharding.make_mesh({"data": -1})
  trainer = t._trainer(c, mesh)
  state, losses = trainer.init_state(), []
  for a, b in zip(*local):
    batch = jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b)
    state, metrics = trainer.step(state, pipeline.to_global(
        batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(results[0]["losses"], losses, rtol=2e-4)
  assert jax.device_count() == 8
