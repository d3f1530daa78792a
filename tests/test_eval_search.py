"""Exact, ScaNN and sharded search: agreement, ordering, tuning, index files."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from procir_jax.eval import search
from procir_jax.eval.search import scann_index, tuning


def _unit(rng, n, d):
  return search.l2_normalize(rng.standard_normal((n, d)))


def _clustered(rng, n, d, clusters, spread):
  """Unit rows around random centres; spread 1 makes neighbouring clusters
  overlap (a row's cosine to its centre is about 0.7)."""
  centres = _unit(rng, clusters, d)
  rows = centres[rng.integers(0, clusters, n)]
  return search.l2_normalize(rows + rng.standard_normal((n, d)) * spread
                             / np.sqrt(d))


def _near(rng, gallery, num, noise):
  """Queries near (not on) gallery rows, as composed queries are."""
  rows = rng.choice(len(gallery), num, replace=False)
  d = gallery.shape[1]
  return search.l2_normalize(gallery[rows] + rng.standard_normal((num, d))
                             * noise / np.sqrt(d))


def _recall(index, gallery, queries):
  """Each query's recall@10 of the exact top 10."""
  exact_indices, exact_scores = tuning.exact_top_k(gallery, queries, 10)
  found, _ = index.search(queries, 10)
  return tuning.recall_of_exact(found, exact_indices, exact_scores, gallery,
                                queries)


def assert_target_holds(recalls, target):
  """A target met on the tuning sample holds on fresh queries up to the fresh
  sample's own error: three standard errors of its mean (about 0.015 for 300
  queries). ScaNN's k-means is multi-threaded, so a tree, and the setting tuned
  on it, differ a little from run to run."""
  margin = 3 * recalls.std(ddof=1) / np.sqrt(len(recalls))
  assert recalls.mean() >= target - margin, (recalls.mean(), margin)


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
  assert large.mode == "tree_ah" and large.num_leaves == 2000
  assert 1 <= large.leaves_to_search < large.num_leaves
  # The tree trains on 250 rows per leaf, the codebooks on at most 250K rows.
  assert large.tree_training_sample_size == 500_000
  assert large.training_sample_size == 250_000
  small = s.resolve(200_000, 64)
  assert small.tree_training_sample_size == small.training_sample_size == 200_000
  assert search.ScannSettings(tree_training_sample_size=7).resolve(
      1_000_000, 8).tree_training_sample_size == 7
  custom = search.ScannSettings.from_config(
      {"mode": "tree_ah", "num_leaves": 7, "leaves_to_search": 3})
  assert custom.resolve(100, 8).num_leaves == 7
  with pytest.raises(ValueError, match="unknown ScaNN settings"):
    search.ScannSettings.from_config({"leaves": 3})
  with pytest.raises(ValueError, match="mode"):
    search.ScannSettings(mode="fast")


def test_rescoring_precision_follows_the_target():
  """int8 rescoring caps recall near 0.98, so higher targets get bfloat16."""
  def dtype(**settings):
    return search.ScannSettings(**settings).resolve(200_000, 64).reorder_dtype
  assert dtype() == "int8"  # The default target, 0.95.
  assert dtype(target_recall=None) == "int8"
  assert dtype(target_recall=0.96) == "int8"
  assert dtype(target_recall=0.99) == "bfloat16"
  assert dtype(target_recall=0.99, reorder_dtype="int8") == "int8"  # Kept.
  with pytest.raises(ValueError, match="reorder_dtype must be auto"):
    search.ScannSettings(reorder_dtype="float16")


@pytest.mark.parametrize("settings", [
    None,  # auto: brute force for a small gallery
    # AH and tree + AH, rescoring every candidate in float32: must equal
    # exact search.
    dict(mode="ah", reorder_num_neighbors=1500, reorder_dtype="float32"),
    dict(mode="tree_ah", num_leaves=8, leaves_to_search=8,
         reorder_num_neighbors=1500, min_partition_size=10,
         reorder_dtype="float32"),
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
  if backend == "scann":
    # A build-time setting that older indexes record and that no longer exists
    # does not stop them loading.
    meta["settings"]["tuning_own_row_share"] = 0.9
    (tmp_path / "elsewhere" / "index.json").write_text(json.dumps(meta))
    assert search.load_index(tmp_path / "elsewhere").search_ids(
        queries, k=7)[0] == before[0]
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


def test_exact_top_k_matches_a_full_sort_whatever_the_blocks():
  rng = np.random.default_rng(5)
  gallery, queries = _unit(rng, 2003, 16), _unit(rng, 31, 16)
  gallery[1500] = gallery[20]  # A tie: the lower row ranks first.
  queries[0] = gallery[20]
  expected = _reference(queries, gallery, 10)
  for block in (7, 500, 4096):
    indices, scores = tuning.exact_top_k(gallery, queries, 10, block_rows=block)
    np.testing.assert_array_equal(indices, expected[0])
    np.testing.assert_allclose(scores, expected[1], atol=1e-6)
  assert tuning.exact_top_k(gallery[:4], queries, 10)[0].shape == (31, 4)
  # Blocks of uneven sizes (some under k), stored in float16, as a collection
  # on disk is read: the same ranking as the float32 rows of the same values.
  half = gallery.astype(np.float16)
  cuts = [0, 3, 4, 900, 1700, 2003]
  indices, scores = tuning.exact_top_k_blocks(
      (half[a:b] for a, b in zip(cuts, cuts[1:])), queries, 10)
  expected = _reference(queries, half.astype(np.float32), 10)
  np.testing.assert_array_equal(indices, expected[0])
  np.testing.assert_allclose(scores, expected[1], atol=1e-6)


def test_recall_counts_tied_rows_and_not_empty_slots():
  gallery = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]  # Rows 0 and 1 tie.
  queries = np.eye(4, dtype=np.float32)[:1]
  exact = tuning.exact_top_k(gallery, queries, 1)
  assert exact[0].tolist() == [[0]]
  for found, expected in (([[1]], 1.0), ([[2]], 0.0), ([[-1]], 0.0)):
    got = tuning.recall_of_exact(np.array(found), *exact, gallery, queries)
    assert got.tolist() == [expected]


def test_tuning_reaches_the_target_where_fixed_settings_do_not(tmp_path):
  rng = np.random.default_rng(6)
  gallery = _clustered(rng, 3000, 32, 60, 1.0)
  queries = _near(rng, gallery, 300, 0.7)
  fixed = search.ScannSearch(gallery, settings=dict(mode="tree_ah",
                                                    target_recall=None))
  assert fixed.tuned_recall is None and fixed.tuning.target is None
  assert _recall(fixed, gallery, queries).mean() < 0.8  # The silent failure.

  index = search.ScannSearch(gallery, settings=dict(mode="tree_ah"))
  t = index.tuning
  assert t.met and t.target == 0.95 and index.tuned_recall >= 0.95
  assert t.queries == "gallery" and t.num_queries == 1000
  assert not t.alternatives  # A mode was asked for.
  # Noise such that a query keeps about half of its row's top 10.
  assert 0.35 <= t.neighbours_kept <= 0.65 and t.noise_scale > 0
  pilot = sorted((float(norm), kept) for norm, kept in
                 t.pilot_neighbours_kept.items())
  assert pilot[0][1] > 0.5 > pilot[-1][1]  # The grid brackets the share.
  s = index.settings
  assert (s.leaves_to_search, s.reorder_num_neighbors) == (
      t.leaves_to_search, t.reorder_num_neighbors)
  assert s.leaves_to_search < s.num_leaves
  # Tuned on its own rows, it holds on queries it never saw.
  assert_target_holds(_recall(index, gallery, queries), 0.95)
  # Fewer leaves or candidates than chosen miss the target on the sample.
  assert any(leaves < s.leaves_to_search and recall < 0.95
             for leaves, _, _, recall in t.evaluations)
  assert any(leaves == s.leaves_to_search and reorder < s.reorder_num_neighbors
             and recall < 0.95 for leaves, reorder, _, recall in t.evaluations)

  loaded = search.load_index(index.save(tmp_path / "tuned"))
  assert loaded.tuned_recall == index.tuned_recall
  assert loaded.tuning == t and loaded.settings == s
  meta = json.loads((tmp_path / "tuned" / "index.json").read_text())
  assert meta["tuning"]["recall"] == t.recall
  assert meta["tuning"]["num_queries"] == 1000
  np.testing.assert_array_equal(loaded.search(queries, 10)[0],
                                index.search(queries, 10)[0])


def test_a_tree_that_searches_most_leaves_is_compared_with_flat_indexes(
    tmp_path):
  """Without clusters a tree must search most of its leaves: the auto index
  also builds flat AH indexes, tunes them on the same queries, times those that
  meet the target and keeps the fastest."""
  rng = np.random.default_rng(8)
  gallery = _unit(rng, 4000, 32)  # no clusters at all
  queries = _near(rng, gallery, 300, 0.7)
  settings = dict(brute_force_below=100, tree_from=1000)
  index = search.ScannSearch(gallery, settings=settings)
  t = index.tuning
  assert t.met
  compared = t.alternatives
  assert [(a["mode"], a["dims_per_block"]) for a in compared] == [
      ("tree_ah", 2), ("ah", 2), ("ah", 4)]
  tree = compared[0]
  assert tree["leaves_to_search"] >= 0.25 * 126  # round(2 sqrt(4000)) leaves
  assert all(a["queries_per_s"] > 0 for a in compared if a["met"])
  assert all(a["queries_per_s"] is None for a in compared if not a["met"])
  kept = [a for a in compared if a["kept"]]
  assert len(kept) == 1 and kept[0]["queries_per_s"] == max(
      a["queries_per_s"] for a in compared if a["met"])
  s = index.settings
  assert (s.mode, s.dims_per_block, s.reorder_num_neighbors) == (
      kept[0]["mode"], kept[0]["dims_per_block"],
      kept[0]["reorder_num_neighbors"])
  assert t.recall == kept[0]["recall"]
  assert f"{s.dims_per_block} dims per code" in index.describe()
  assert "the fastest of 3 indexes" in index.describe()
  assert_target_holds(_recall(index, gallery, queries), 0.95)

  loaded = search.load_index(index.save(tmp_path / "index"))
  assert loaded.settings == s and loaded.tuning.alternatives == compared
  np.testing.assert_array_equal(loaded.search(queries, 10)[0],
                                index.search(queries, 10)[0])
  # A mode asked for is kept, and clustered data keeps its tree.
  asked = search.ScannSearch(gallery, settings=dict(settings, mode="tree_ah"))
  assert asked.settings.mode == "tree_ah" and not asked.tuning.alternatives
  clustered = search.ScannSearch(_clustered(rng, 4000, 32, 100, 0.3),
                                 settings=settings)
  assert clustered.settings.mode == "tree_ah"
  assert not clustered.tuning.alternatives


def test_big_galleries_tune_on_fewer_queries_given_ones_on_more():
  """The exact pass for tuning stays near EXACT_PASS_FLOPS: gallery-derived
  queries also need their rows' own top 10, so they get half as many."""
  settings = search.ScannSettings()
  assert settings.tuning_queries(100_000, 1024) == 1000
  assert settings.tuning_queries(100_000, 1024, given=True) == 1000
  assert settings.tuning_queries(1_000_000, 1024) == 488
  assert settings.tuning_queries(1_000_000, 1024, given=True) == 976
  assert settings.tuning_queries(10_000_000, 1024, given=True) == 400
  assert search.ScannSettings(tuning_sample_size=50).tuning_queries(
      1_000_000, 1024, given=True) == 50


def test_high_targets_tune_on_more_queries():
  """The margin of two standard errors must stay small beside 1 - target:
  0.99 gets five times the sample (and exact-pass budget) of 0.95, of which
  the usual count decides what it can."""
  assert search.ScannSettings(target_recall=0.95).tuning_scale() == 1.0
  assert search.ScannSettings(target_recall=0.98).tuning_scale() == 2.5
  high = search.ScannSettings(target_recall=0.99)
  assert high.tuning_scale() == 5.0
  assert search.ScannSettings(target_recall=0.999).tuning_scale() == 5.0
  assert high.tuning_queries(100_000, 1024) == 5000
  assert high.tuning_queries(1_000_000, 1024, given=True) == 4882
  assert high.tuning_queries(1_000_000, 1024) == 2441
  assert high.tuning_queries(1_000_000, 1024, given=True, scaled=False) == 976
  assert search.ScannSettings(target_recall=0.99, tuning_sample_size=300
                              ).tuning_queries(100_000, 1024) == 300


def _meter_over(recalls_by_setting, num_queries, base):
  """A RecallMeter whose search returns, for each setting, rows that give each
  query the recall listed (one value per query)."""
  exact = np.arange(num_queries * 10).reshape(num_queries, 10)

  def fake_search(queries, leaves, reorder):
    per_query = recalls_by_setting[leaves][:len(queries)]
    found = exact[:len(queries)].copy()
    for i, r in enumerate(per_query):
      found[i, int(round(r * 10)):] = -1
    return found

  return tuning.RecallMeter(fake_search, np.zeros((num_queries, 4), np.float32),
                            exact, None, None, base=base)


def test_recall_meter_searches_the_rest_only_for_settings_in_doubt():
  num, base = 4000, 1000
  ones = np.ones(num)
  doubtful = np.where(np.arange(num) % 100 == 0, 0.0, 1.0)  # mean 0.99
  meter = _meter_over({1: ones, 2: np.full(num, 0.5), 3: doubtful}, num, base)
  # Clearly passes on the base: the rest is not searched.
  assert meter.passes(1, 10, 0.99)
  assert max(e[2] for e in meter.evaluations) == base
  # Clearly fails: rejected on the quick quarter of the base.
  assert not meter.passes(2, 10, 0.99)
  assert meter.evaluations[-1][2] == base // 4
  # Mean 0.99 with two standard errors of 0.0063 on the base, 0.0031 on the
  # whole sample: in doubt on the base for 0.986, so the whole sample decides.
  assert meter.passes(3, 10, 0.986)
  assert meter.evaluations[-1][2] == num
  assert not meter.passes(3, 10, 0.988)
  # Without a base the whole sample decides, as before.
  whole = _meter_over({1: ones}, num, None)
  assert whole.passes(1, 10, 0.99)
  assert [e[2] for e in whole.evaluations] == [num // 4, num]


def test_flat_indexes_compared_may_rescore_a_share_of_the_rows(monkeypatch):
  """A flat index scans every row anyway: tuning it may rescore up to
  FLAT_MAX_REORDER_SHARE of the rows, beyond max_reorder_num_neighbors."""
  monkeypatch.setattr(scann_index, "FLAT_MAX_REORDER_SHARE", 0.1)  # 400 rows
  rng = np.random.default_rng(8)
  gallery = _unit(rng, 4000, 32)
  index = search.ScannSearch(gallery, settings=dict(
      brute_force_below=100, tree_from=1000, max_reorder_num_neighbors=20))
  tree, *flat = index.tuning.alternatives
  assert tree["mode"] == "tree_ah" and tree["reorder_num_neighbors"] <= 20
  assert [a["mode"] for a in flat] == ["ah", "ah"]
  rescored = [a["reorder_num_neighbors"] for a in flat]
  assert max(rescored) > 20 and max(rescored) <= 400, index.tuning.alternatives


def test_tuning_on_given_queries_and_kept_settings():
  rng = np.random.default_rng(7)
  gallery = _clustered(rng, 2000, 32, 40, 1.0)
  queries = _near(rng, gallery, 400, 0.7)
  index = search.ScannSearch(
      gallery, settings=dict(mode="ah", tuning_sample_size=200),
      tuning_queries=queries)
  assert index.tuning.queries == "given" and index.tuning.num_queries == 200
  assert index.tuning.noise_scale is None and index.tuned_recall >= 0.95
  assert_target_holds(_recall(index, gallery, queries), 0.95)
  # A value given is kept and only measured.
  kept = search.ScannSearch(gallery, settings=dict(mode="ah",
                                                   reorder_num_neighbors=10))
  assert kept.settings.reorder_num_neighbors == 10
  assert [e[1] for e in kept.tuning.evaluations] == [10]
  with pytest.raises(ValueError, match="target_recall is unset"):
    search.ScannSearch(gallery, settings=dict(target_recall=None),
                       tuning_queries=queries)
  with pytest.raises(ValueError, match="target_recall"):
    search.ScannSettings(target_recall=1.5)


def test_unreachable_target_is_warned_about_and_recorded(caplog):
  rng = np.random.default_rng(8)
  gallery = _clustered(rng, 2000, 32, 40, 1.0)
  with caplog.at_level(logging.WARNING):
    index = search.ScannSearch(gallery, settings=dict(
        mode="ah", target_recall=0.999, max_reorder_num_neighbors=12))
  t = index.tuning
  assert not t.met and t.recall < 0.999
  assert t.reorder_num_neighbors == 12  # The largest allowed.
  assert "below the target 0.999" in t.note
  assert "max_reorder_num_neighbors" in t.note and "bfloat16" in t.note
  assert t.note in caplog.text
  assert "TARGET MISSED" in index.describe()


def test_bytes_per_vector_counts_codes_reorder_data_and_ids():
  rng = np.random.default_rng(9)
  gallery = _clustered(rng, 3000, 64, 60, 1.0)
  ids = [f"id_{i:06d}" for i in range(3000)]
  index = search.ScannSearch(gallery, ids, settings=dict(mode="tree_ah",
                                                         target_recall=None))
  parts = index.memory_per_vector()
  assert parts["int8 reorder rows"] == 64  # The default: one byte a dim.
  assert parts["AH codes"] == 16  # 32 two-dim blocks, 4 bits each.
  assert parts["tree"] == 8 and 50 < parts["id"] < 100
  assert index.bytes_per_vector == pytest.approx(sum(parts.values()))
  float32 = search.ScannSearch(gallery, ids, settings=dict(
      mode="tree_ah", target_recall=None, reorder_dtype="float32"))
  assert float32.memory_per_vector()["float32 reorder rows"] == 256
  exact = search.ExactSearch(gallery, ids)
  assert exact.bytes_per_vector > 512 > index.bytes_per_vector
  assert exact.tuned_recall == 1.0


def _split(gallery, ids, sizes):
  start = 0
  for size in sizes:
    yield gallery[start:start + size], ids[start:start + size]
    start += size


def test_sharded_exact_index_equals_one_exact_index():
  rng = np.random.default_rng(10)
  gallery, queries = _unit(rng, 700, 16), _unit(rng, 23, 16)
  # A tie across shards (exact in any summation order): the lower row wins.
  gallery[[3, 650]] = queries[0] = np.eye(16, dtype=np.float32)[0]
  ids = [f"p{i}" for i in range(700)]
  whole = search.ExactSearch(gallery, ids)
  sharded = search.build_sharded_index(_split(gallery, ids, [300, 250, 150]),
                                       backend="exact")
  assert isinstance(sharded, search.ShardedIndex) and sharded.ids == ids
  for k in (1, 10, 700, 5000):
    got, expected = sharded.search(queries, k), whole.search(queries, k)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
  assert sharded.search_ids(queries, 5)[0] == whole.search_ids(queries, 5)[0]
  assert sharded.search(queries[:0], 5)[0].shape == (0, 5)
  assert sharded.tuned_recall == 1.0
  # build_index splits a gallery itself.
  split = search.build_index(gallery, ids, backend="exact", shard_rows=300)
  assert [s.count for s in split.shards] == [300, 300, 100]
  np.testing.assert_array_equal(split.search(queries, 10)[0],
                                whole.search(queries, 10)[0])
  with pytest.raises(ValueError, match="'p0' of shard 1 is also in an earlier"):
    search.build_sharded_index([(gallery[:10], ids[:10]),
                                (gallery[10:20], ids[:10])], backend="exact")


def test_sharded_scann_index_reaches_the_target_and_moves(tmp_path):
  rng = np.random.default_rng(11)
  gallery = _clustered(rng, 4000, 32, 80, 1.0)
  ids = [f"WOMEN/id_{i:05d}" for i in range(4000)]
  queries = _near(rng, gallery, 300, 0.7)
  directory = tmp_path / "built"

  def shards():
    for number, part in enumerate(_split(gallery, ids, [2000, 2000])):
      if number:  # Shard 0 is saved before shard 1 is even read.
        assert (directory / "shard_00000" / "index.json").is_file()
      yield part

  index = search.build_sharded_index(
      shards(), settings=dict(mode="tree_ah", tuning_sample_size=500),
      directory=directory)
  assert [s.backend for s in index.shards] == ["scann", "scann"]
  assert all(s.tuning.met for s in index.shards)
  assert index.tuned_recall >= 0.95
  assert_target_holds(_recall(index, gallery, queries), 0.95)
  before = index.search_ids(queries, 10)

  shutil.move(str(directory), str(tmp_path / "moved"))
  loaded = search.load_index(tmp_path / "moved")
  assert isinstance(loaded, search.ShardedIndex) and loaded.ids == ids
  assert loaded.search_ids(queries, 10)[0] == before[0]
  assert loaded.tuned_recall == index.tuned_recall
  assert "2 shards" in loaded.describe()
  meta = json.loads((tmp_path / "moved" / "index.json").read_text())
  assert meta["backend"] == "sharded" and meta["count"] == 4000
  assert [s["path"] for s in meta["shards"]] == ["shard_00000", "shard_00001"]
  assert meta["tuning"]["recall"] == index.tuned_recall
  for root, _, files in os.walk(tmp_path / "moved"):
    for name in files:
      if name.endswith((".json", ".pbtxt")):
        assert str(tmp_path) not in open(os.path.join(root, name)).read()
  assert loaded.bytes_per_vector == pytest.approx(
      np.mean([s.bytes_per_vector for s in loaded.shards]))


def test_sharded_index_tuned_across_shards_on_the_catalogue_top_10(tmp_path):
  """tune() measures what the merged search returns against the whole
  catalogue's exact top 10, sets one setting for every shard, and
  save_settings() keeps it without rewriting the searchers."""
  rng = np.random.default_rng(12)
  gallery = _clustered(rng, 6000, 32, 60, 1.0)
  ids = [f"p{i}" for i in range(6000)]
  tune_q, test_q = _near(rng, gallery, 400, 0.7), _near(rng, gallery, 300, 0.7)
  directory = tmp_path / "sharded"
  index = search.build_sharded_index(
      _split(gallery, ids, [2000, 2000, 2000]), directory=directory,
      settings=dict(mode="tree_ah", target_recall=None))
  blocks = (gallery[i:i + 1500] for i in range(0, 6000, 1500))
  exact, _ = tuning.exact_top_k_blocks(blocks, tune_q, 10)
  t = index.tune(tune_q, exact, 0.95)
  assert t.met and t.recall >= 0.95 and t.queries == "given"
  assert t.num_queries == 400 and t.leaves_to_search < max(
      s.settings.num_leaves for s in index.shards)
  assert {(s.settings.leaves_to_search, s.settings.reorder_num_neighbors)
          for s in index.shards} == {(t.leaves_to_search,
                                      t.reorder_num_neighbors)}
  # Fewer leaves fall short of the catalogue's top 10.
  assert any(leaves < t.leaves_to_search and recall < 0.95
             for leaves, _, _, recall in t.evaluations)
  assert_target_holds(_recall(index, gallery, test_q), 0.95)  # Held out.

  searchers = sorted(directory.glob("*/scann/*"))
  mtimes = [p.stat().st_mtime_ns for p in searchers]
  index.save_settings(directory)
  assert [p.stat().st_mtime_ns for p in searchers] == mtimes
  loaded = search.load_index(directory)
  assert loaded.tuned_recall == t.recall
  assert [s.settings for s in loaded.shards] == [s.settings for s in index.shards]
  assert loaded.search_ids(test_q, 10)[0] == index.search_ids(test_q, 10)[0]
  with pytest.raises(ValueError, match="400 tuning queries but exact results "
                     "for 10"):
    index.tune(tune_q, exact[:10])


def test_broken_sharded_directories_name_the_shard(tmp_path):
  rng = np.random.default_rng(12)
  gallery = _unit(rng, 40, 8)
  ids = [str(i) for i in range(40)]
  search.build_sharded_index(_split(gallery, ids, [20, 20]), backend="exact",
                             directory=tmp_path / "a")
  shutil.rmtree(tmp_path / "a" / "shard_00001")
  missing = str(tmp_path / "a" / "shard_00001")
  with pytest.raises(FileNotFoundError, match=f"shard 1 .*{missing}"):
    search.load_index(tmp_path / "a")

  search.build_sharded_index(_split(gallery, ids, [20, 20]), backend="exact",
                             directory=tmp_path / "b")
  os.remove(tmp_path / "b" / "shard_00000" / "embeddings.npy")
  with pytest.raises(FileNotFoundError, match="shard 0 .*embeddings.npy"):
    search.load_index(tmp_path / "b")

  search.build_sharded_index(_split(gallery, ids, [20, 20]), backend="exact",
                             directory=tmp_path / "c")
  meta = json.loads((tmp_path / "c" / "index.json").read_text())
  meta["shards"][0]["path"] = "../elsewhere"
  (tmp_path / "c" / "index.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="inside the index directory"):
    search.load_index(tmp_path / "c")


@pytest.mark.parametrize("high_passes", [False, True])
def test_smallest_passing_brackets_the_threshold(high_passes):
  tried = []

  def passes(x):
    tried.append(x)
    return x >= 37

  value, found = tuning.smallest_passing(1, 1000, passes, tolerance=0.1,
                                         high_passes=high_passes)
  assert found and 37 <= value <= 37 * 1.1 + 1
  assert any(x < 37 for x in tried) and len(tried) <= 12
  assert tuning.smallest_passing(1, 50, lambda x: False) == (50, False)
  assert tuning.smallest_passing(4, 50, lambda x: True) == (4, True)


class _ThresholdMeter:
  """Passes a setting when it reorders at least `needed` candidates."""

  def __init__(self, needed):
    self.needed, self.tried = needed, []

  def passes(self, leaves, reorder, target):
    self.tried.append(reorder)
    return reorder >= self.needed


@pytest.mark.parametrize("needed", [60, 10089])
def test_reordering_is_chosen_within_a_quarter_or_a_fixed_gap(needed):
  # A flat index at 1M rows may rescore up to 20,000 candidates, and needed
  # 10,089 for 0.99 on one benchmark: a quarter (of the count chosen, so a
  # third of the count needed) above that is over 3,000 candidates, 10% of
  # its speed, where a third of 60 is a handful.
  meter = _ThresholdMeter(needed)
  leaves, reorder = tuning.choose_settings(meter, 0.99, k=10, num_leaves=None,
                                           max_reorder=20000)
  assert leaves is None
  assert needed <= reorder <= needed + min(needed // 3, tuning.REORDER_GAP)
  assert any(x < needed for x in meter.tried) and len(meter.tried) <= 14
