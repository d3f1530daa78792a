"""The evaluation protocol: source reuse, dropped queries, recall, averages."""

import dataclasses

import numpy as np
import pytest

from procir_jax.eval import recall


def _tiny_deepfashion():
  """Hand-built: 3 documents, 2 reused sources, 1 dropped query.

  Gallery after source reuse: A, B, C (documents), Y (s of query 0), X (s of
  query 2). Target ranks, worked out by hand from the vectors:
    0: source Y, target B          q=(0.1, 1, 0)      B first       -> rank 1
    1: source B, target Y          q=(0, 0, -1)       Y = -C        -> rank 1
       (Y is in the gallery only through query 0's source reuse)
    2: source X, target C          q=(1, 0.2, 0.1)    A, X, B, C    -> rank 4
    3: source A, target Z          Z is nowhere      -> dropped
    4: source X, target A          q=(0.1, 0, 1)      C, A, ...     -> rank 2
  """
  e = np.eye(3, dtype=np.float32)
  return recall.DatasetEmbeddings(
      dataset="deepfashion",
      gallery_ids=["A", "B", "C"],
      gallery=e * 3.0,  # Not unit length: the protocol normalises.
      source_ids=["Y", "B", "X", "A", "X"],
      target_ids=["B", "Y", "C", "Z", "A"],
      q=np.array([[0.1, 1, 0], [0, 0, -1], [1, 0.2, 0.1], [1, 1, 1],
                  [0.1, 0, 1]], np.float32),
      s=np.array([[0, 0, -2], [0, 1, 0], [1, 1, 0], [1, 0, 0],
                  # X's second s differs: only its first one may be used.
                  [0, 0, 1]], np.float32))


def _tiny_f200k():
  """12 one-hot documents; targets at rank 1 and rank 7."""
  e = np.eye(12, dtype=np.float32)
  weights = np.arange(12, 0, -1, dtype=np.float32)  # P0 highest ... P11 lowest
  return recall.DatasetEmbeddings(
      dataset="f200k", gallery_ids=[f"P{i}" for i in range(12)], gallery=e,
      source_ids=["P0", "P1"], target_ids=["P3", "P6"],
      q=np.stack([e[3] + 0.1 * e[0], weights]), s=e[:2])


def test_gallery_rules_on_hand_built_example():
  g = recall.assemble(_tiny_deepfashion())
  assert g.ids == ["A", "B", "C", "Y", "X"]
  assert g.num_documents == 3
  assert g.reused_source_ids == ["Y", "X"]
  np.testing.assert_allclose(g.vectors[4], [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
  np.testing.assert_allclose(g.vectors[3], [0, 0, -1])
  np.testing.assert_array_equal(g.query_rows, [0, 1, 2, 4])
  np.testing.assert_array_equal(g.targets, [1, 3, 2, 0])
  assert g.dropped_target_ids == ["Z"]


def test_recall_on_hand_built_example():
  results = recall.evaluate([_tiny_f200k(), _tiny_deepfashion()],
                            backends=("exact",))
  assert [d.dataset for d in results.datasets] == ["deepfashion", "f200k"]
  deep, f200k = results.datasets
  # Target ranks 1, 1, 4, 2 over 4 evaluated queries; R@10 capped at 5 rows.
  assert deep.recall["exact"] == {1: 50.0, 5: 100.0, 10: 100.0}
  assert (deep.num_gallery, deep.num_reused_sources, deep.num_queries,
          deep.num_evaluated, deep.num_dropped) == (5, 2, 5, 4, 1)
  assert f200k.recall["exact"] == {1: 50.0, 5: 50.0, 10: 100.0}
  assert results.results_json() == {
      "DeepFashion_R@1": 50.0, "DeepFashion_R@5": 100.0,
      "DeepFashion_R@10": 100.0, "Fashion200K_R@1": 50.0,
      "Fashion200K_R@5": 50.0, "Fashion200K_R@10": 100.0,
      "Average_R@5": 75.0, "Average_R@10": 100.0}


def _numpy_protocol(data, ks=(1, 5, 10)):
  """The released evaluation written out directly with dicts and argsort."""
  emb = {}
  for pid, v in zip(data.gallery_ids, data.gallery):
    emb.setdefault(pid, v)
  for pid, v in zip(data.source_ids, data.s):
    emb.setdefault(pid, v)
  ids = list(emb)
  gallery = np.stack([emb[p] for p in ids]).astype(np.float64)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  keep = [i for i, t in enumerate(data.target_ids) if t in emb]
  q = data.q[keep].astype(np.float64)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  order = np.argsort(-(q @ gallery.T), axis=1, kind="stable")
  gt = np.array([ids.index(data.target_ids[i]) for i in keep])
  rank = np.argmax(order == gt[:, None], axis=1)
  return {k: round(float(np.mean(rank < k)) * 100, 2) for k in ks}, len(keep)


def _random_dataset(rng, name, docs, queries, dim=16):
  pool = [f"{name}/{i}" for i in range(docs + 10)]
  gallery_ids = list(rng.choice(pool[:docs + 5], docs, replace=False))
  source = rng.choice(pool, queries)
  target = rng.choice(pool, queries)
  base = {p: rng.standard_normal(dim) for p in pool}
  q = np.stack([base[t] + rng.standard_normal(dim) for t in target])
  return recall.DatasetEmbeddings(
      name, gallery_ids, np.stack([base[p] for p in gallery_ids]),
      list(source), list(target), q,
      rng.standard_normal((queries, dim)).astype(np.float32))


def test_recall_equals_direct_numpy_computation():
  rng = np.random.default_rng(0)
  data = [_random_dataset(rng, "deepfashion", 300, 200),
          _random_dataset(rng, "f200k", 150, 120),
          _random_dataset(rng, "fashiongen", 60, 90)]
  results = recall.evaluate(data, backends=("exact",))
  by_name = {d.dataset: d for d in results.datasets}
  for item in data:
    expected, evaluated = _numpy_protocol(item)
    got = by_name[item.dataset]
    assert got.recall["exact"] == expected
    assert got.num_evaluated == evaluated
    assert got.num_dropped == len(item.target_ids) - evaluated
    assert got.num_reused_sources > 0 and got.num_dropped > 0
  out = results.results_json()
  assert list(out) == [
      f"{n}_R@{k}" for n in ("DeepFashion", "Fashion200K", "FashionGen-val")
      for k in (1, 5, 10)] + ["Average_R@5", "Average_R@10"]
  for k in (5, 10):
    mean = sum(out[f"{n}_R@{k}"] for n in
               ("DeepFashion", "Fashion200K", "FashionGen-val")) / 3
    assert out[f"Average_R@{k}"] == round(mean, 2)


def test_scann_agrees_on_small_galleries():
  rng = np.random.default_rng(1)
  data = [_random_dataset(rng, "deepfashion", 400, 100)]
  results = recall.evaluate(data)
  d = results.datasets[0]
  assert d.recall["scann"] == d.recall["exact"]
  assert d.scann_overlap == 1.0
  assert d.scann_settings["mode"] == "brute_force"
  details = results.details()["datasets"]["deepfashion"]
  assert details["scann"]["top10_overlap_with_exact"] == 1.0
  assert details["counts"]["dropped"] == d.num_dropped


def test_recall_percent_rounds_like_the_release():
  # float32 mean then Python round: 1/800 -> 0.12 (float64 would give 0.13).
  assert recall.recall_percent(1, 800) == 0.12
  assert recall.recall_percent(2, 3) == 66.67
  assert recall.recall_percent(5, 5) == 100.0


def test_overlap_of_top_k_counts_shared_items_whatever_their_order():
  approx = np.array([["a", "b", "c"], ["x", "y", "z"], ["c", "a", "q"]])
  exact = np.array([["c", "b", "a"], ["a", "b", "c"], ["a", "c", "b"]])
  np.testing.assert_allclose(recall.overlaps(approx, exact, 3), [1, 0, 2 / 3])
  np.testing.assert_allclose(recall.overlaps(approx, exact, 1), [0, 0, 0])
  assert recall.mean_overlap(approx, exact, 3) == pytest.approx(5 / 9)
  assert np.isnan(recall.mean_overlap(approx[:0], exact[:0], 3))


def test_unusable_inputs_fail_clearly():
  data = _tiny_deepfashion()
  data.target_ids = ["nope"] * 5
  with pytest.raises(ValueError, match="none of its 5 queries"):
    recall.evaluate([data], backends=("exact",))
  with pytest.raises(ValueError, match=r"q must have shape \[2, D\]"):
    recall.DatasetEmbeddings("f200k", ["a"], np.ones((1, 3)), ["a", "a"],
                             ["a", "a"], np.ones((3, 3)), np.ones((2, 3)))
  with pytest.raises(ValueError, match="given twice"):
    recall.evaluate([_tiny_f200k(), _tiny_f200k()], backends=("exact",))


def test_mapping_of_other_embedding_records_is_accepted():

  @dataclasses.dataclass
  class Encoded:  # The encoder's own record type, with its field names.
    gallery_ids: list
    gallery: np.ndarray
    query_source_ids: list
    query_target_ids: list
    q: np.ndarray
    s: np.ndarray
    skipped: list

  t = _tiny_deepfashion()
  encoded = Encoded(t.gallery_ids, t.gallery, t.source_ids, t.target_ids, t.q,
                    t.s, ["deepfashion/bad: undecodable image"])
  results = recall.evaluate({"deepfashion": encoded}, backends=("exact",))
  d = results.datasets[0]
  assert d.name == "DeepFashion" and d.recall["exact"][1] == 50.0
  assert d.counts()["encoder_skipped"] == 1
