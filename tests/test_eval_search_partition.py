"""Sharded indexes partitioned by similarity, and shards built in child processes."""

import json
import os
import shutil

import numpy as np
import pytest

from procir_jax.eval import search
from procir_jax.eval.search import partition, tuning
from tests.test_eval_search import assert_target_holds


def _unit(x):
  return search.l2_normalize(x)


def _catalogue(rng, n, d, groups, clusters_per_group):
  """Rows in clusters that themselves gather in groups (as products gather in
  categories): a partition into about `groups` shards can follow the groups."""
  tops = _unit(rng.standard_normal((groups, d)))
  centres = _unit(np.repeat(tops, clusters_per_group, axis=0) +
                  0.8 * rng.standard_normal((groups * clusters_per_group, d))
                  / np.sqrt(d))
  rows = centres[rng.integers(0, len(centres), n)]
  return _unit(rows + 0.7 * rng.standard_normal((n, d)) / np.sqrt(d))


def _near(rng, gallery, num, noise=0.5):
  rows = rng.choice(len(gallery), num, replace=False)
  d = gallery.shape[1]
  return _unit(gallery[rows] + noise * rng.standard_normal((num, d)) / np.sqrt(d))


def _blocks(gallery, ids, rows):
  return lambda: ((ids[i:i + rows], gallery[i:i + rows])
                  for i in range(0, len(ids), rows))


def test_router_fills_the_nearest_shard_then_the_next_nearest():
  centres = np.eye(3, dtype=np.float32)
  router = partition.Router(centres, capacity=2)
  rows = _unit(np.array([[1, .1, 0], [1, .2, 0], [1, 0, .5], [0, 1, 0],
                         [.1, 0, 1]], np.float32))
  # Rows 0 and 1 fill shard 0; row 2 (nearest 0, then 2) spills to shard 2.
  np.testing.assert_array_equal(router.assign(rows), [0, 0, 2, 1, 2])
  assert router.spilled == 1 and router.counts.tolist() == [2, 1, 2]
  with pytest.raises(ValueError, match="2 more rows do not fit in 3 shards"):
    router.assign(rows[:2])
  assert partition.num_parts(1000, 300) == 4  # 1150 rows of room at least
  with pytest.raises(ValueError, match="3 centres need at least 3 sample rows"):
    partition.fit_centres(rows[:2], 3)


def test_fit_centres_finds_separated_groups():
  rng = np.random.default_rng(0)
  tops = np.eye(4, 16, dtype=np.float32)
  sample = _unit(tops[rng.integers(0, 4, 400)] +
                 0.1 * rng.standard_normal((400, 16)))
  centres = partition.fit_centres(sample, 4)
  assert sorted((centres @ tops.T).argmax(axis=1).tolist()) == [0, 1, 2, 3]
  np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1, rtol=1e-5)


def test_partitioned_exact_index_searching_every_shard_is_exact(tmp_path):
  """Untuned, a partitioned index searches every shard: the exact result, with
  every row in one shard; its directory moves; the scratch files are gone."""
  rng = np.random.default_rng(1)
  gallery = _catalogue(rng, 3000, 16, 4, 10)
  gallery[[5, 2900]] = gallery[7]  # A tie across shards: the lower row wins.
  ids = [f"p{i}" for i in range(3000)]
  queries = _near(rng, gallery, 50)
  index = search.build_partitioned_index(
      _blocks(gallery, ids, 700), count=3000, dim=16, capacity=1000,
      directory=tmp_path / "built", sample=gallery[::3], backend="exact")
  assert index.partitioned and len(index.shards) == 4  # ceil(3450 / 1000)
  assert index.shards_to_search == 4 and sorted(index.ids) == sorted(ids)
  assert max(s.count for s in index.shards) <= 1000
  whole = search.ExactSearch(gallery, ids)
  assert index.search_ids(queries, 10)[0] == whole.search_ids(queries, 10)[0]
  assert index.search_ids(gallery[[7]], 3)[0][0][:3] == ["p5", "p7", "p2900"]
  assert sorted(os.listdir(tmp_path / "built")) == [
      "centres.npy", "index.json"] + [f"shard_0000{i}" for i in range(4)]
  shutil.move(str(tmp_path / "built"), str(tmp_path / "moved"))
  loaded = search.load_index(tmp_path / "moved")
  assert loaded.partitioned and loaded.search_ids(queries, 10)[0] == (
      whole.search_ids(queries, 10)[0])
  assert "partitioned by similarity" in loaded.describe()
  assert loaded.memory_per_vector()["shard centres"] == pytest.approx(
      4 * 16 * 4 / 3000)
  with pytest.raises(ValueError, match="held 2100 rows where count=3000"):
    search.build_partitioned_index(
        lambda: ((ids[i:i + 700], gallery[i:i + 700]) for i in (0, 700, 1400)),
        count=3000, dim=16, capacity=1000, directory=tmp_path / "short",
        sample=gallery[::3], backend="exact")
  os.remove(tmp_path / "moved" / "centres.npy")
  with pytest.raises(FileNotFoundError, match="centres file .*centres.npy"):
    search.load_index(tmp_path / "moved")


def test_partitioned_scann_index_tuned_searches_the_nearest_shards(tmp_path):
  """With tuning queries, the whole index is tuned on the catalogue's exact top
  10: queries search fewer than all shards and recall holds on fresh ones."""
  rng = np.random.default_rng(2)
  gallery = _catalogue(rng, 12000, 32, 6, 20)
  ids = [f"WOMEN/id_{i:05d}" for i in range(12000)]
  tune_q, test_q = _near(rng, gallery, 400), _near(rng, gallery, 300)
  index = search.build_partitioned_index(
      _blocks(gallery, ids, 5000), count=12000, dim=32, capacity=2500,
      directory=tmp_path / "index", sample=gallery[::2],
      settings=dict(mode="tree_ah"), tuning_queries=tune_q)
  t = index.routing_tuning
  assert t.met and t.recall >= 0.95 and t.queries == "given"
  assert 1 <= index.shards_to_search < len(index.shards) == 6
  # The tried counts of shards, and why the last was kept.
  tried = [e[0] for e in index.routing_evaluations]
  assert tried[0] == 1 and index.shards_to_search in tried
  assert {(s.settings.leaves_to_search, s.settings.reorder_num_neighbors)
          for s in index.shards} == {(t.leaves_to_search,
                                      t.reorder_num_neighbors)}
  exact_indices, exact_scores = tuning.exact_top_k(gallery, test_q, 10)
  rows = {i: n for n, i in enumerate(ids)}
  found = np.array([[rows[i] for i in r]
                    for r in index.search_ids(test_q, 10)[0]])
  assert_target_holds(tuning.recall_of_exact(
      found, exact_indices, exact_scores, gallery, test_q), 0.95)

  loaded = search.load_index(tmp_path / "index")
  assert loaded.shards_to_search == index.shards_to_search
  assert loaded.tuned_recall == t.recall
  assert loaded.search_ids(test_q, 10)[0] == index.search_ids(test_q, 10)[0]
  meta = json.loads((tmp_path / "index" / "index.json").read_text())
  assert meta["routing"]["shards_to_search"] == index.shards_to_search
  assert meta["tuning"]["recall"] == t.recall
  assert not (tmp_path / "index" / ".partition_scratch").exists()
  # Searching every shard finds at least what the nearest ones do.
  every = loaded.search(test_q, 10, shards_to_search=6)[1]
  assert np.all(every[:, 0] >= loaded.search(test_q, 10)[1][:, 0] - 1e-6)


def test_shards_built_in_fresh_processes_equal_shards_built_here(tmp_path):
  rng = np.random.default_rng(3)
  gallery = _catalogue(rng, 600, 8, 2, 5)
  ids = [f"p{i}" for i in range(600)]
  def parts():
    return ((gallery[i:i + 300], ids[i:i + 300]) for i in (0, 300))
  here = search.build_sharded_index(parts(), backend="exact",
                                    directory=tmp_path / "here")
  child = search.build_sharded_index(parts(), backend="exact",
                                     directory=tmp_path / "child",
                                     fresh_processes=True)
  queries = _near(rng, gallery, 20)
  assert child.search_ids(queries, 5)[0] == here.search_ids(queries, 5)[0]
  assert sorted(os.listdir(tmp_path / "child")) == [
      "index.json", "shard_00000", "shard_00001"]  # no rows files left
  with pytest.raises(ValueError, match="give a directory"):
    search.build_sharded_index(parts(), backend="exact", fresh_processes=True)
  with pytest.raises(ValueError, match="shard 1 .*non-finite"):
    bad = gallery.copy()
    bad[400] = np.nan
    search.build_sharded_index(
        ((bad[i:i + 300], ids[i:i + 300]) for i in (0, 300)), backend="exact",
        directory=tmp_path / "bad", fresh_processes=True)
