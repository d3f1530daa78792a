"""`--config.mode=embed` into a sharded collection, and its reader.

One straight one-process run (in this process, 8 CPU devices) is the reference; two
real processes finish a collection of which that run's first shard is already there
(so the rerun also has another process count); a run killed while publishing a shard
is rerun; a bad product is listed, not lost; embedding with another config or trained
state into a collection is refused; and the reader refuses missing, foreign and
unexpected shards. The model is the tiny "test" preset, one view per product, two
sources of the small synthetic validation split (28 products, 4 shards of 8).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from procir_jax import modes, tiny_model
from procir_jax.eval import collection as collection_lib
from procir_jax.eval import encode as encode_lib

_REPO = pathlib.Path(__file__).parents[1]
_SOURCES = ("deepfashion", "fashiongen")
_NAME = "validation-deepfashion-fashiongen"


def _overrides(data_dir, model_dir) -> dict:
  return {"model.hf_dir": str(model_dir), "data.data_dir": str(data_dir),
          "data.eval_batch_size": 8, "eval.max_views": 1, "embed.shard_size": 8,
          "embed.sources": _SOURCES}


def _config(data_dir, model_dir, **changes):
  config = base.get_config()
  config.mode = "embed"
  for key, value in {**_overrides(data_dir, model_dir), **changes}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fashionmv_data_dir):
  """(data_dir, model_dir, reference collection dir) of one straight run."""
  model_dir = tiny_model.write_model_dir(tmp_path_factory.mktemp("model"), "test")
  workdir = tmp_path_factory.mktemp("reference")
  modes.run_embed(_config(fashionmv_data_dir, model_dir), str(workdir))
  return fashionmv_data_dir, model_dir, workdir / "embeddings" / _NAME


def _headers(directory) -> dict[str, dict]:
  return {p.name.split(".")[0]: json.loads(p.read_text().splitlines()[0])
          for p in sorted(pathlib.Path(directory).glob("*.ids.jsonl"))}


def _mtimes(directory, shard) -> list[int]:
  return [os.stat(p).st_mtime_ns for p in sorted(directory.glob(f"{shard}.*"))]


def test_the_reference_collection(setup):
  _, _, ref_dir = setup
  ref = collection_lib.open_collection(ref_dir)
  ids = ref.ids
  assert len(ref) == len(ids) == 28 and ref.num_shards == 4
  assert ids == sorted(ids) and {i.split("/", 1)[0] for i in ids} == set(_SOURCES)
  assert ref.dim == 32 and ref.dtype == np.float32 and not ref.skipped
  emb = ref.load()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  shards = list(ref.iter_shards())
  assert [len(i) for i, _ in shards] == [8, 8, 8, 4]
  assert all(isinstance(e, np.memmap) for _, e in shards)
  np.testing.assert_array_equal(np.concatenate([e for _, e in shards]), emb)
  assert ref.fingerprint["checkpoint"] == {"dir": "", "step": None}
  assert ref.fingerprint["procir"]["cot"] is True


def test_blocks_cross_shards_and_the_index_tool_reads_a_collection(setup, tmp_path):
  """iter_blocks regroups rows across shard files; tools/build_index.py indexes a
  collection block by block, and each product finds itself first."""
  from procir_jax.eval import search

  _, _, ref_dir = setup
  ref = collection_lib.open_collection(ref_dir)
  blocks = list(ref.iter_blocks(10))
  assert [len(i) for i, _ in blocks] == [10, 10, 8]
  assert sum((i for i, _ in blocks), []) == ref.ids
  np.testing.assert_array_equal(np.concatenate([e for _, e in blocks]), ref.load())
  out = tmp_path / "index"
  result = subprocess.run(
      [sys.executable, "tools/build_index.py", f"--embeddings={ref_dir}",
       "--backend=exact", "--shard_rows=10", f"--out={out}"],
      cwd=_REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  index = search.load_index(str(out))
  assert isinstance(index, search.ShardedIndex) and index.ids == ref.ids
  found = index.search_ids(ref.load()[:5], k=1)[0]
  assert [row[0] for row in found] == ref.ids[:5]

  # Rows by position, in the order asked, across shard files.
  np.testing.assert_array_equal(ref.rows([27, 3, 11]), ref.load()[[27, 3, 11]])
  with pytest.raises(IndexError, match="rows 3 to 28 asked of a collection of 28"):
    ref.rows([3, 28])
  # Partitioned by similarity (untuned: every query searches every shard), each
  # shard built in its own process.
  result = subprocess.run(
      [sys.executable, "tools/build_index.py", f"--embeddings={ref_dir}",
       "--backend=exact", "--shard_rows=10", "--shard_by=similarity",
       f"--out={tmp_path / 'partitioned'}"],
      cwd=_REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  index = search.load_index(str(tmp_path / "partitioned"))
  assert index.partitioned and len(index.shards) == 4  # ceil(28 * 1.15 / 10)
  assert sorted(index.ids) == sorted(ref.ids)
  found = index.search_ids(ref.load()[:5], k=1)[0]
  assert [row[0] for row in found] == ref.ids[:5]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_write_disjoint_shards_like_one(setup, tmp_path):
  data_dir, model_dir, ref_dir = setup
  ref = collection_lib.open_collection(ref_dir)
  # A one-process run got as far as its first shard.
  out_dir = tmp_path / "work" / "embeddings" / _NAME
  shutil.copytree(ref_dir, out_dir)
  for p in out_dir.glob("shard-0000[1-9]-*"):
    p.unlink()
  first = _mtimes(out_dir, "shard-00000-of-00004")

  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1")
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  port = _free_port()
  flags = {**_overrides(data_dir, model_dir), "embed.sources": ",".join(_SOURCES),
           "distributed.coordinator_address": f"127.0.0.1:{port}",
           "distributed.num_processes": 2, "embed.key_block_records": 20}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "procir_jax.main", "--config=configs/base.py",
       f"--workdir={tmp_path / 'work'}", "--config.mode=embed",
       f"--config.distributed.process_id={i}",
       *(f"--config.{k}={v}" for k, v in flags.items())],
      cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "(1 kept from an earlier run)" in outs[0], outs[0][-2000:]

  # Shards 1 and 3 by process 0, shard 2 by process 1, the first left as it was.
  writers = {name: (h["process"], h["processes"])
             for name, h in _headers(out_dir).items()}
  assert writers == {"shard-00000-of-00004": (0, 1), "shard-00001-of-00004": (0, 2),
                     "shard-00002-of-00004": (1, 2), "shard-00003-of-00004": (0, 2)}
  assert _mtimes(out_dir, "shard-00000-of-00004") == first
  # The products' keys were read in blocks of 20 records, shared by the processes.
  keys = tmp_path / "work" / "product_keys" / "fashionmv_products-validation"
  assert sorted(p.name for p in keys.iterdir()) == [
      f"keys-0000{n}-of-00003.jsonl" for n in range(3)]
  got = collection_lib.open_collection(out_dir)
  assert got.ids == ref.ids and got.fingerprint == ref.fingerprint
  np.testing.assert_allclose(got.load(), ref.load(), atol=2e-5)
  assert not list(out_dir.glob("*.tmp"))


class _Killed(BaseException):
  """Stands for SIGKILL: nothing of the run's own error handling sees it."""


def test_a_killed_run_resumes_without_loss_or_duplicates(setup, tmp_path,
                                                          monkeypatch):
  data_dir, model_dir, ref_dir = setup
  config = _config(data_dir, model_dir, **{"embed.dtype": "float16"})
  workdir = tmp_path / "work"
  out_dir = workdir / "embeddings" / _NAME
  publish = collection_lib._publish

  def dies_publishing_the_second_ids_file(tmp, path):
    if path.name == "shard-00001-of-00004.ids.jsonl":
      raise _Killed()
    publish(tmp, path)

  monkeypatch.setattr(collection_lib, "_publish", dies_publishing_the_second_ids_file)
  with pytest.raises(_Killed):
    modes.run_embed(config, str(workdir))
  monkeypatch.setattr(collection_lib, "_publish", publish)
  # The second shard's embeddings are in place but not its ids: it counts as missing.
  assert (out_dir / "shard-00001-of-00004.npy").exists()
  assert (out_dir / "shard-00001-of-00004.ids.jsonl.tmp").exists()
  with pytest.raises(collection_lib.CollectionError,
                     match=r"incomplete: 3 of 4 shards missing: shard-00001-of-00004 "
                           r"\(partly written when its run stopped\), "
                           r"shard-00002-of-00004, shard-00003-of-00004\. Rerun the "
                           r"embed mode with the same config"):
    collection_lib.open_collection(out_dir)
  first = _mtimes(out_dir, "shard-00000-of-00004")
  keys = _mtimes(workdir / "product_keys" / "fashionmv_products-validation", "keys-*")

  encoded = []
  embed_local = encode_lib.Encoder.embed_local

  def counting(self, params, batch):
    index, emb = embed_local(self, params, batch)
    encoded.extend(int(i) for i in index if i >= 0)
    return index, emb

  monkeypatch.setattr(encode_lib.Encoder, "embed_local", counting)
  modes.run_embed(config, str(workdir))
  # The finished shard was neither encoded nor written again; the rest once each.
  assert _mtimes(out_dir, "shard-00000-of-00004") == first
  # Nor were the products' keys read again.
  assert _mtimes(workdir / "product_keys" / "fashionmv_products-validation",
                 "keys-*") == keys and len(keys) == 1
  assert len(encoded) == len(set(encoded)) == 28 - 8
  got = collection_lib.open_collection(out_dir)
  ref = collection_lib.open_collection(ref_dir)
  assert got.dtype == np.float16 and got.ids == ref.ids
  assert len(set(got.ids)) == len(got) == 28
  np.testing.assert_allclose(got.load().astype(np.float32), ref.load(), atol=2e-3)
  assert not list(out_dir.glob("*.tmp"))


def test_bad_products_are_listed_not_lost(setup, tmp_path, monkeypatch):
  """With data.skip_bad_examples, a product the pipeline cannot read is left out of
  its shard and named, with its error, in the shard's header."""
  from procir_jax.data import examples

  data_dir, model_dir, ref_dir = setup
  ref = collection_lib.open_collection(ref_dir)
  victim = ref.ids[9]
  gallery = examples.ExampleBuilder.gallery

  def fails_on_one(self, product):
    if collection_lib.product_id((product.source, product.product_id)) == victim:
      raise examples.BadExampleError("its views are broken")
    return gallery(self, product)

  monkeypatch.setattr(examples.ExampleBuilder, "gallery", fails_on_one)
  config = _config(data_dir, model_dir, **{"data.skip_bad_examples": True})
  modes.run_embed(config, str(tmp_path))
  got = collection_lib.open_collection(tmp_path / "embeddings" / _NAME)
  assert got.ids == [i for i in ref.ids if i != victim] and len(got) == 27
  assert [s["id"] for s in got.skipped] == [victim]
  assert "its views are broken" in got.skipped[0]["error"]
  assert _headers(got.directory)["shard-00001-of-00004"]["skipped"] == got.skipped
  keep = [i != victim for i in ref.ids]
  np.testing.assert_allclose(got.load(), ref.load()[keep], atol=2e-5)


def test_reader_refuses_missing_foreign_and_unexpected_shards(setup, tmp_path):
  _, _, ref_dir = setup
  ref = collection_lib.open_collection(ref_dir)
  expected = json.loads(json.dumps(ref.fingerprint))
  assert collection_lib.open_collection(ref_dir, expected).ids == ref.ids
  expected["checkpoint"] = {"dir": "/trained", "step": 300}
  with pytest.raises(collection_lib.CollectionError,
                     match=r"another model or config than expected.*checkpoint\.dir: "
                           r'"" -> "/trained"; checkpoint\.step: null -> 300'):
    collection_lib.open_collection(ref_dir, expected)

  missing = tmp_path / "missing"
  shutil.copytree(ref_dir, missing)
  (missing / "shard-00002-of-00004.npy").unlink()
  with pytest.raises(collection_lib.CollectionError,
                     match=r"incomplete: 1 of 4 shards missing: shard-00002-of-00004\. "
                           r"Rerun the embed mode"):
    collection_lib.open_collection(missing)

  # A shard of another run (another manifest) put in place of one of this run.
  mixed = tmp_path / "mixed"
  shutil.copytree(ref_dir, mixed)
  manifest = json.loads((mixed / "manifest.json").read_text())
  manifest["fingerprint"]["model"]["dtype"] = "bfloat16"
  manifest.pop("shards_sha256")
  manifest["shards_sha256"] = collection_lib._sha256(collection_lib._canonical(
      manifest))
  (mixed / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(collection_lib.CollectionError,
                     match=r"Shard shard-00000-of-00004 .* was written for another "
                           r"model, config or product list"):
    collection_lib.open_collection(mixed)
  with pytest.raises(FileNotFoundError, match="holds no manifest.json"):
    collection_lib.open_collection(tmp_path)


def test_embedding_with_another_config_or_state_into_a_collection_is_refused(
    setup, tmp_path):
  """Into a collection of the model directory's own weights: another config is
  refused, and so is the workdir's trained state once training has saved one."""
  from flax import nnx

  from procir_jax import factories, provision, sharding
  from procir_jax.train import checkpoint as ckpt_lib

  data_dir, model_dir, ref_dir = setup
  workdir = tmp_path / "work"
  shutil.copytree(ref_dir, workdir / "embeddings" / _NAME)
  before = {p.name: os.stat(p).st_mtime_ns for p in ref_dir.iterdir()}
  config = _config(data_dir, model_dir, **{"procir.cot": False})
  with pytest.raises(collection_lib.CollectionError,
                     match=r"already holds a collection of another model, config or "
                           r"product list \(written -> now\): "
                           r"fingerprint\.procir\.cot: true -> false\. Embed into a "
                           r"new directory \(--config\.embed\.name=\.\.\.\) or delete"):
    modes.run_embed(config, str(workdir))

  config = _config(data_dir, model_dir)
  paths = provision.prepare(config, str(workdir))
  mesh = sharding.make_mesh({"data": -1})
  _, params = nnx.split(factories.load_model(config, paths.model_dir, mesh), nnx.Param)
  checkpointer = ckpt_lib.Checkpointer(str(paths.contrastive_checkpoints))
  checkpointer.save(3, {"params": params})
  checkpointer.close()
  with pytest.raises(collection_lib.CollectionError,
                     match=r"fingerprint\.checkpoint\.dir: \"\" -> "
                           r"\".*/work/checkpoints/contrastive\"; "
                           r"fingerprint\.checkpoint\.step: null -> 3\. "):
    modes.run_embed(config, str(workdir))
  assert {p.name: os.stat(p).st_mtime_ns for p in ref_dir.iterdir()} == before


def test_arrays_made_elsewhere_become_a_collection(tmp_path):
  """write_arrays takes rows in blocks of any size; the reader gives them back;
  a rerun keeps the shards; short, long, non-finite or foreign input is refused."""
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((23, 4)).astype(np.float32)
  ids = [f"shop/{i:03d}" for i in range(23)]
  cuts = [0, 1, 9, 10, 23]
  blocks = lambda: (rows[a:b] for a, b in zip(cuts, cuts[1:]))  # noqa: E731
  kwargs = dict(dim=4, fingerprint={"model": "elsewhere"},
                collection={"catalogue": "shop"}, shard_size=5)
  where = tmp_path / "shop"
  stats = collection_lib.write_arrays(where, ids, blocks(), **kwargs)
  assert stats == dict(shards=5, written=5, kept=0, rows=23)
  coll = collection_lib.open_collection(where)
  assert coll.ids == ids
  np.testing.assert_array_equal(coll.load(), rows.astype(np.float16))

  mtimes = {p: p.stat().st_mtime_ns for p in where.iterdir()}
  os.remove(where / "shard-00002-of-00005.ids.jsonl")  # As if killed mid-shard.
  stats = collection_lib.write_arrays(where, ids, blocks(), **kwargs)
  assert stats == dict(shards=5, written=1, kept=4, rows=5)
  assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()
             if "00002" not in p.name)
  np.testing.assert_array_equal(collection_lib.open_collection(where).load(),
                                rows.astype(np.float16))

  with pytest.raises(ValueError, match="fewer than the ids"):
    collection_lib.write_arrays(tmp_path / "short", ids, [rows[:20]], **kwargs)
  with pytest.raises(ValueError, match="more rows than the 23 ids"):
    collection_lib.write_arrays(tmp_path / "long", ids, [rows, rows[:1]], **kwargs)
  bad = rows.copy()
  bad[12, 1] = np.nan
  with pytest.raises(ValueError, match="row 12 .* not finite"):
    collection_lib.write_arrays(tmp_path / "nan", ids, [bad[:10], bad[10:]], **kwargs)
  with pytest.raises(ValueError, match=r"shape \(23, 3\), not \[rows, 4\]"):
    collection_lib.write_arrays(tmp_path / "dim", ids, [rows[:, :3]], **kwargs)
  with pytest.raises(collection_lib.CollectionError, match="elsewhere"):
    collection_lib.write_arrays(where, ids, blocks(),
                                **dict(kwargs, fingerprint={"model": "other"}))
