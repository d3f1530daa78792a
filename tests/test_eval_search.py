"""Exact and ScaNN search: agreement, ordering, index files."""

import json
import os
import shutil

import numpy as np
import pytest

from procir_jax.eval import search


def _unit(rng, n, d):
  return search.l2_normalize(rng.standard_normal((n, d)))


def _reference(queries, gallery, k):
  scores = queries @ gallery.T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


def test_exact_matches_numpy_across_chunks_and_batches():
  rng = np.random.default_rng(0)
  gallery, queries = _unit(rng, 1000, 24), _unit(rng, 37, 24)
  # Chunks and batches that do not divide the sizes exercise the padding.
  index = search.ExactSearch(gallery, query_batch_size=16,
                             gallery_chunk_size=300)
  indices, scores = index.search(queries, k=10)
  ref_indices, ref_scores = _reference(queries, gallery, 10)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
  assert indices.dtype == np.int64 and scores.dtype == np.float32


def test_ties_go_to_the_lower_index_and_k_is_capped():
  gallery = np.zeros((20, 4), np.float32)
  gallery[:, 0] = 1.0
  gallery[7] = [0.0, 1.0, 0.0, 0.0]
  query = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
  for index in (search.ExactSearch(gallery, gallery_chunk_size=8),
                search.ScannSearch(gallery)):
    indices, scores = index.search(query, k=5)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3, 4]])
    indices, _ = index.search(query, k=50)
    assert indices.shape == (1, 20)
    assert indices[0, -1] == 7  # The only lower score comes last.


def test_settings_follow_gallery_size_and_overrides():
  s = search.ScannSettings()
  assert s.resolve(5_000, 64).mode == "brute_force"
  assert s.resolve(50_000, 64).mode == "ah"
  large = s.resolve(1_000_000, 1024)
  assert large.mode == "tree_ah" and large.num_leaves == 1000
  assert 1 <= large.leaves_to_search < large.num_leaves
  custom = search.ScannSettings.from_config(
      {"mode": "tree_ah", "num_leaves": 7, "leaves_to_search": 3})
  assert custom.resolve(100, 8).num_leaves == 7
  with pytest.raises(ValueError, match="unknown ScaNN settings"):
    search.ScannSettings.from_config({"leaves": 3})
  with pytest.raises(ValueError, match="mode"):
    search.ScannSettings(mode="fast")


@pytest.mark.parametrize("settings", [
    None,  # auto: brute force for a small gallery
    # AH and tree + AH, rescoring every candidate: must equal exact search.
    dict(mode="ah", reorder_num_neighbors=1500),
    dict(mode="tree_ah", num_leaves=8, leaves_to_search=8,
         reorder_num_neighbors=1500, min_partition_size=10),
])
def test_scann_on_small_gallery_equals_exact(settings):
  rng = np.random.default_rng(1)
  gallery, queries = _unit(rng, 1500, 32), _unit(rng, 40, 32)
  exact = search.ExactSearch(gallery).search(queries, k=10)
  index = search.ScannSearch(gallery, settings=settings)
  indices, scores = index.search(queries, k=10)
  np.testing.assert_array_equal(indices, exact[0])
  np.testing.assert_allclose(scores, exact[1], atol=1e-5)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_saved_index_moves_and_answers_the_same(tmp_path, backend):
  rng = np.random.default_rng(2)
  gallery, queries = _unit(rng, 600, 16), _unit(rng, 9, 16)
  ids = [f"WOMEN/Dresses/id_{i:08d}/01" for i in range(600)]  # Slashes too.
  settings = (dict(mode="ah", reorder_num_neighbors=50)
              if backend == "scann" else None)
  index = search.build_index(gallery, ids, backend=backend, settings=settings)
  before = index.search_ids(queries, k=7)
  index.save(tmp_path / "built")
  shutil.move(str(tmp_path / "built"), str(tmp_path / "elsewhere"))
  assert not (tmp_path / "built").exists()
  loaded = search.load_index(tmp_path / "elsewhere")
  assert type(loaded) is type(index) and loaded.ids == ids
  after = loaded.search_ids(queries, k=7)
  assert after[0] == before[0]
  np.testing.assert_array_equal(after[1], before[1])
  meta = json.loads((tmp_path / "elsewhere" / "index.json").read_text())
  assert meta["backend"] == backend and meta["count"] == 600
  assert meta["dimension"] == 16
  # Nothing in the directory names where it was written.
  for root, _, files in os.walk(tmp_path / "elsewhere"):
    for name in files:
      if name.endswith((".json", ".pbtxt")):
        assert str(tmp_path) not in open(os.path.join(root, name)).read()


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_build_index_ranks_by_cosine_whatever_the_norms(tmp_path, backend):
  rng = np.random.default_rng(4)
  gallery, queries = _unit(rng, 200, 8), _unit(rng, 5, 8)
  scale = rng.uniform(0.1, 10.0, (200, 1)).astype(np.float32)
  index = search.build_index(gallery * scale, backend=backend)
  expected = search.ExactSearch(gallery).search(queries, k=5)
  for loaded in (index, search.load_index(index.save(tmp_path / "i"))):
    indices, scores = loaded.search(queries * 3.0, k=5)
    np.testing.assert_array_equal(indices, expected[0])
    np.testing.assert_allclose(scores, expected[1], atol=1e-5)


def test_broken_index_directories_say_what_is_missing(tmp_path):
  rng = np.random.default_rng(3)
  gallery = _unit(rng, 50, 8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    search.load_index(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="index.json"):
    search.load_index(tmp_path / "empty")

  search.ScannSearch(gallery).save(tmp_path / "scann")
  os.remove(tmp_path / "scann" / "scann" / "dataset.npy")
  with pytest.raises(FileNotFoundError, match="dataset.npy"):
    search.load_index(tmp_path / "scann")

  search.ExactSearch(gallery).save(tmp_path / "exact")
  os.remove(tmp_path / "exact" / "ids.json")
  with pytest.raises(FileNotFoundError, match="ids.json"):
    search.load_index(tmp_path / "exact")

  search.ExactSearch(gallery).save(tmp_path / "bad_json")
  (tmp_path / "bad_json" / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    search.load_index(tmp_path / "bad_json")

  search.ExactSearch(gallery).save(tmp_path / "short")
  np.save(tmp_path / "short" / "embeddings.npy", gallery[:10])
  with pytest.raises(ValueError, match="shape"):
    search.load_index(tmp_path / "short")


def test_bad_inputs_are_rejected():
  gallery = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="appears more than once"):
    search.ExactSearch(gallery, ids=["a", "b", "a", "c"])
  with pytest.raises(ValueError, match="3 ids for 4"):
    search.ExactSearch(gallery, ids=["a", "b", "c"])
  with pytest.raises(ValueError, match=r"shape \[Q, 4\]"):
    search.ExactSearch(gallery).search(np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match="cannot change"):
    search.ScannSearch.load("unused", num_leaves=4)
