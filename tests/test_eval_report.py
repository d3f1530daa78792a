"""results.json, the details file, the table, and the npz round trip."""

import json
import os

import numpy as np
import pytest

from procir_jax.eval import recall
from procir_jax.eval import report

NAMES = ("DeepFashion", "Fashion200K", "FashionGen-val")


def _dataset(rng, name, docs=80, queries=50, dim=12):
  # Sources beyond the documents are reused; targets beyond them are dropped.
  ids = [f"{name}/id_{i:05d}/0{i % 3}" for i in range(docs + 8)]
  base = rng.standard_normal((docs + 8, dim)).astype(np.float32)
  source = rng.integers(0, docs + 4, queries)
  target = np.concatenate([rng.integers(0, docs + 4, queries - 2),
                           [docs + 5, docs + 7]])
  return recall.DatasetEmbeddings(
      name, ids[:docs], base[:docs], [ids[i] for i in source],
      [ids[i] for i in target],
      base[target] + 0.7 * rng.standard_normal((queries, dim)),
      rng.standard_normal((queries, dim)).astype(np.float32))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  rng = np.random.default_rng(0)
  data = [_dataset(rng, n) for n in ("fashiongen", "deepfashion", "f200k")]
  out = tmp_path_factory.mktemp("eval")
  results = report.evaluate_and_write(out, data, echo=False)
  return out, data, results


def test_results_json_has_the_release_keys(written):
  out, _, results = written
  got = json.loads((out / "results.json").read_text())
  assert set(got) == {f"{n}_R@{k}" for n in NAMES for k in (1, 5, 10)} | {
      "Average_R@5", "Average_R@10"}
  for k in (5, 10):
    assert got[f"Average_R@{k}"] == round(
        sum(got[f"{n}_R@{k}"] for n in NAMES) / 3, 2)
  assert got == results.results_json()


def test_details_hold_counts_and_scann(written):
  out, data, results = written
  details = json.loads((out / "results_details.json").read_text())
  assert details["results_json_backend"] == "exact"
  for item, d in zip(sorted(data, key=lambda x: x.dataset), results.datasets):
    entry = details["datasets"][d.dataset]
    counts = entry["counts"]
    assert counts["queries"] == len(item.source_ids)
    assert counts["evaluated"] + counts["dropped"] == counts["queries"]
    assert counts["gallery"] == counts["documents"] + counts["reused_sources"]
    assert counts["reused_sources"] > 0 and counts["dropped"] > 0
    assert entry["scann"]["top10_overlap_with_exact"] == 1.0
    assert entry["scann"]["settings"]["mode"] == "brute_force"
    assert len(entry["dropped_target_ids"]) == counts["dropped"]
  assert set(details["averages"]) == {"exact", "scann"}
  table = (out / "results.txt").read_text()
  for name in NAMES + ("Average", "ScaNN"):
    assert name in table


def test_npz_round_trip_recomputes_identical_results(written, tmp_path):
  out, data, results = written
  files = sorted(os.listdir(out / "embeddings"))
  assert files == ["deepfashion.npz", "f200k.npz", "fashiongen.npz"]
  loaded = report.load_embeddings(out / "embeddings" / "f200k.npz")
  original = next(d for d in data if d.dataset == "f200k")
  assert loaded.gallery_ids == original.gallery_ids
  assert loaded.source_ids == original.source_ids
  assert loaded.target_ids == original.target_ids
  for key in ("gallery", "q", "s"):
    np.testing.assert_array_equal(getattr(loaded, key), getattr(original, key))
  again = report.recompute(out)
  assert again.results_json() == json.loads((out / "results.json").read_text())
  assert [d.counts() for d in again.datasets] == [
      d.counts() for d in results.datasets]
  # The embeddings folder alone is enough.
  assert report.recompute(out / "embeddings").results_json() == (
      results.results_json())


def test_missing_or_bad_embeddings_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="no <dataset>.npz"):
    report.load_embeddings_dir(tmp_path)
  np.savez(tmp_path / "broken.npz", dataset=np.asarray("f200k"),
           format_version=np.asarray(1), q=np.zeros((1, 2)))
  with pytest.raises(ValueError, match="lacks arrays"):
    report.load_embeddings(tmp_path / "broken.npz")
