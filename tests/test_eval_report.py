"""results.json, the details file, the table, the npz round trip, and the page."""

import html.parser
import json
import os

import numpy as np
import pytest

from procir_jax.eval import recall
from procir_jax.eval import report
from procir_jax.eval.pages import report_page

NAMES = ("DeepFashion", "Fashion200K", "FashionGen-val")


def _dataset(rng, name, docs=80, queries=50, dim=12):
  # Sources beyond the documents are reused; targets beyond them are dropped.
  ids = [f"{name}/id_{i:05d}/0{i % 3}" for i in range(docs + 8)]
  base = rng.standard_normal((docs + 8, dim)).astype(np.float32)
  source = rng.integers(0, docs + 4, queries)
  target = np.concatenate([rng.integers(0, docs + 4, queries - 2),
                           [docs + 5, docs + 7]])
  # FashionGen goes without texts, as embeddings from before they were kept.
  texts = ([] if name == "fashiongen" else
           [f"{name} text {i}: make it <blue>" for i in range(queries)])
  q = base[target] + 0.7 * rng.standard_normal((queries, dim))
  # One query points away from its target: ranked last, beyond the kept top 50.
  target[0], q[0] = 0, -base[0]
  return recall.DatasetEmbeddings(
      name, ids[:docs], base[:docs], [ids[i] for i in source],
      [ids[i] for i in target], q,
      rng.standard_normal((queries, dim)).astype(np.float32), texts=texts)


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
  # Written atomically, yet as readable as any other file the process writes.
  umask = os.umask(0)
  os.umask(umask)
  assert (out / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask


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
  assert loaded.texts == original.texts and loaded.texts
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


class _Page(html.parser.HTMLParser):
  """The parts of report.html the tests read."""

  def __init__(self):
    super().__init__()
    self.cells = {}      # (backend, data-key) -> text
    self.chance = []     # (dataset, k, text)
    self.curves = []     # polyline attributes
    self.examples = []   # article attributes + "rows", "text", "images"
    self.notes = []
    self._table = self._cell = self._dataset = None
    self._note = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "table":
      self._table = a.get("data-backend")
    elif tag == "tr":
      self._dataset = a.get("data-dataset")
    elif tag == "td" and ("data-key" in a or "data-chance" in a):
      self._cell = [a, ""]
    elif tag == "polyline" and a.get("class") == "curve":
      self.curves.append(a)
    elif tag == "article":
      self.examples.append(dict(a, rows=[], text="", images=0))
    elif tag == "div" and a.get("class", "").startswith("row"):
      self.examples[-1]["rows"].append(a)
    elif tag == "img" and self.examples:
      self.examples[-1]["images"] += 1
    elif tag == "p" and a.get("class") == "note":
      self._note = ""

  def handle_endtag(self, tag):
    if tag == "td" and self._cell:
      a, text = self._cell
      if "data-key" in a:
        self.cells[(self._table, a["data-key"])] = text
      else:
        self.chance.append((self._dataset, int(a["data-chance"]), text))
      self._cell = None
    elif tag == "p" and self._note is not None:
      self.notes.append(self._note)
      self._note = None

  def handle_data(self, data):
    if self._cell:
      self._cell[1] += data
    if self._note is not None:
      self._note += data
    if self.examples:
      self.examples[-1]["text"] += data


def _parse(path):
  page = _Page()
  page.feed(open(path, encoding="utf-8").read())
  return page


def _full_ranks(item):
  """Each evaluated query's target rank over the whole gallery, by brute force."""
  g = recall.assemble(item)
  sims = g.queries @ g.vectors.T
  own = sims[np.arange(len(g.targets)), g.targets]
  return g, 1 + (sims > own[:, None]).sum(axis=1)


def test_page_table_and_curves_match_results(written):
  out, _, results = written
  page = _parse(out / report.HTML_FILE)
  expected = json.loads((out / "results.json").read_text())
  got = {key: float(text) for (backend, key), text in page.cells.items()
         if backend == "exact"}
  assert got == expected
  for d in results.datasets:
    for k in (1, 5, 10):
      assert page.cells[("scann", f"{d.name}_R@{k}")] == (
          f"{d.recall['scann'][k]:.2f}")
  # Chance: a random ranking of G rows finds the target in the top k with
  # probability k / G.
  gallery = {d.dataset: d.num_gallery for d in results.datasets}
  assert len(page.chance) == 2 * 3 * 3
  for dataset, k, text in page.chance:
    assert float(text) == pytest.approx(100 * k / gallery[dataset], abs=0.005)

  assert sorted((c["data-dataset"], c["data-backend"]) for c in page.curves) == (
      sorted((d, b) for d in gallery for b in ("exact", "scann")))
  by_name = {d.dataset: d for d in results.datasets}
  for curve in page.curves:
    assert len(curve["points"].split()) == 50
    values = [float(v) for v in curve["data-values"].split(",")]
    assert len(values) == 50 and values == sorted(values)
    d = by_name[curve["data-dataset"]]
    for k in (1, 5, 10):
      assert values[k - 1] == d.recall[curve["data-backend"]][k]


def test_page_examples_name_their_queries_and_mark_the_target(written):
  out, data, results = written
  page = _parse(out / report.HTML_FILE)
  # Written from embeddings without views: ids only, and the page says so.
  assert any("shown by their ids" in n for n in page.notes)
  assert all(ex["images"] == 0 for ex in page.examples)
  by_name = {d.dataset: d for d in data}
  for d in results.datasets:
    examples = [ex for ex in page.examples if ex["data-dataset"] == d.dataset]
    assert [ex["data-kind"] for ex in examples] == ["best", "worst"] + [
        "random"] * 3
    item = by_name[d.dataset]
    g, ranks = _full_ranks(item)
    for ex in examples:
      query = int(ex["data-query"])
      assert ex["data-source"] == item.source_ids[query]
      assert ex["data-target"] == item.target_ids[query]
      assert f"query {query}" in ex["text"]
      assert item.source_ids[query] in ex["text"]
      if item.texts:
        assert item.texts[query] in ex["text"]
      else:
        assert "modification text not recorded" in ex["text"]
      targets = [r for r in ex["rows"] if "target" in r["class"].split()]
      assert [r["data-product"] for r in targets] == [ex["data-target"]]
      rank = int(ex["data-rank"])
      shown = [r["data-product"] for r in ex["rows"]][:5]
      assert (ex["data-target"] in shown) == (rank <= 5)
      assert rank == ranks[list(g.query_rows).index(query)]
    best, worst = examples[0], examples[1]
    if ranks.min() == 1:
      assert best["data-rank"] == "1"
      assert "target" in best["rows"][0]["class"].split()
    assert int(worst["data-rank"]) == ranks.max() > 50


def test_page_with_views_is_the_same_every_time(written, tmp_path):
  _, data, results = written
  item = next(d for d in data if d.dataset == "deepfashion")
  rng = np.random.default_rng(1)
  # Every other product has views; the rest show why they have none.
  views = {"deepfashion": {
      pid: [rng.integers(0, 255, (24, 16, 3), dtype=np.uint8)]
      for pid in item.gallery_ids[::2]}}
  first = report.write_html(tmp_path, results, data, views)
  text = open(first, encoding="utf-8").read()
  page = _parse(first)
  shown = [ex for ex in page.examples if ex["data-dataset"] == "deepfashion"]
  assert sum(ex["images"] for ex in shown) > 0
  assert "no views found" in text
  assert "<blue>" not in text and "&lt;blue&gt;" in text
  assert any("No product views for this dataset" in n for n in page.notes)
  assert report.write_html(tmp_path, results, data, views) == first
  assert open(first, encoding="utf-8").read() == text
  other = report_page.render(results, data, views, seed=1)
  assert other != text
