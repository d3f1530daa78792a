"""tools/build_index.py and tools/search.py on a small synthetic run."""

import pathlib
import subprocess
import sys

import numpy as np

from configs import base
from procir_jax import provision

REPO = pathlib.Path(__file__).parents[1]
OVERRIDES = ["--config.model.tiny_preset=test", "--config.data.max_views=2",
             "--config.eval.max_views=2",
             "--config.data.synthetic.train_products=6",
             "--config.data.synthetic.train_triplets=6",
             "--config.data.synthetic.val_products=6",
             "--config.data.synthetic.val_triplets=6",
             "--config.data.synthetic.image_size=48"]


def _run(args):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_index_then_search_writes_a_page(tmp_path):
  config = base.get_config()
  for flag in OVERRIDES:  # the same workdir the tools will find
    key, value = flag[len("--config."):].split("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  paths = provision.prepare(config, str(tmp_path))
  common = ["--config=configs/base.py", f"--workdir={tmp_path}", *OVERRIDES]
  # Shards of 2 products: tools/search.py opens a sharded index as any other.
  out = _run(["tools/build_index.py", *common, "--source=deepfashion",
              "--shard_rows=2", f"--out={tmp_path / 'index'}"])
  assert "Indexed" in out and (tmp_path / "index" / "shard_00001").is_dir()
  assert "bytes per vector" in out

  from procir_jax.data import fashionmv
  products = fashionmv.Products(paths.data_dir, "validation")
  query = next(k for k in products.keys() if k[0] == "deepfashion")[1]
  out = _run(["tools/search.py", *common, f"--index={tmp_path / 'index'}",
              "--source=deepfashion", f"--product_id={query}", "--text=make it blue",
              "--k=3", f"--out={tmp_path / 'page'}"])
  assert "Index: sharded:" in out and "recall@10 of exact 1.0000" in out
  ranked = [line.split()[-1] for line in out.splitlines() if line.strip()[:2] in
            ("1.", "2.", "3.")]
  assert len(ranked) == 3 and all(("deepfashion", r) in products for r in ranked)
  html = (tmp_path / "page" / "results.html").read_text()
  assert "make it blue" in html and ranked[0] in html
  for src in html.split('src="')[1:]:
    assert (tmp_path / "page" / src.split('"')[0]).exists()
  png = tmp_path / "page" / "results.png"
  from PIL import Image
  with Image.open(png) as image:
    assert image.size[0] > 200 and np.asarray(image).std() > 0


def test_build_index_tunes_on_the_evaluation_queries_and_shards(tmp_path):
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((400, 64)).astype(np.float32)
  gallery = centres[rng.integers(0, 400, 20000)] + rng.standard_normal(
      (20000, 64)).astype(np.float32)
  ids = np.array([f"WOMEN/id_{i:05d}" for i in range(20000)])
  queries = gallery[:300] + 0.5 * rng.standard_normal((300, 64)).astype(
      np.float32)
  np.savez(tmp_path / "emb.npz", gallery=gallery, gallery_ids=ids, q=queries)
  out = _run(["tools/build_index.py", f"--embeddings={tmp_path / 'emb.npz'}",
              "--shard_rows=10000", f"--out={tmp_path / 'index'}"])
  # Each shard is ScaNN (AH at this size), tuned on the file's 300 queries.
  shard_lines = [line for line in out.splitlines() if "  shard " in line]
  assert len(shard_lines) == 2, out
  for line in shard_lines:
    assert "scann ah: reorder_num_neighbors=" in line
    assert "on 300 tuning queries (the caller's queries)" in line
  assert "Index: sharded: 2 shards (scann), 20000 rows; recall@10 of exact" in out
  assert "int8 reorder rows 64" in out and "bytes per vector" in out

  from procir_jax.eval import search
  index = search.load_index(tmp_path / "index")
  assert isinstance(index, search.ShardedIndex) and index.tuned_recall >= 0.95
  assert index.ids == ids.tolist()
  # Tuned together, on the whole catalogue's exact top 10: one setting.
  assert {s.tuning.note for s in index.shards} == {
      "tuned across the shards, on the catalogue's exact top k"}
  assert len({s.settings.reorder_num_neighbors for s in index.shards}) == 1


def test_build_index_partitions_by_similarity(tmp_path):
  """--shard_by=similarity: shards that follow the data's groups, tuned as a
  whole on the file's queries, so a query searches fewer than all shards."""
  rng = np.random.default_rng(1)
  groups = rng.standard_normal((8, 64)).astype(np.float32) * 3
  centres = groups[rng.integers(0, 8, 400)] + rng.standard_normal(
      (400, 64)).astype(np.float32)
  gallery = centres[rng.integers(0, 400, 20000)] + 0.7 * rng.standard_normal(
      (20000, 64)).astype(np.float32)
  ids = np.array([f"WOMEN/id_{i:05d}" for i in range(20000)])
  queries = gallery[:400] + 0.3 * rng.standard_normal((400, 64)).astype(
      np.float32)
  np.savez(tmp_path / "emb.npz", gallery=gallery, gallery_ids=ids, q=queries)
  out = _run(["tools/build_index.py", f"--embeddings={tmp_path / 'emb.npz'}",
              "--shard_rows=3000", "--shard_by=similarity",
              "--nofresh_process_per_shard", f"--out={tmp_path / 'index'}"])
  assert "partitioned by similarity: each query searches the" in out, out

  from procir_jax.eval import search
  index = search.load_index(tmp_path / "index")
  assert index.partitioned and len(index.shards) == 8  # ceil(23000 / 3000)
  assert index.shards_to_search < 8 and index.tuned_recall >= 0.95
  assert sorted(index.ids) == sorted(ids.tolist())
  found = index.search_ids(gallery[1000:1010], 1)[0]
  assert [row[0] for row in found] == ids[1000:1010].tolist()
