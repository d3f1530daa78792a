"""The synthetic FashionMV: release layout, determinism, learnable structure, and a
full TFDS build read back through tfds.data_source."""

import hashlib
import json
import pathlib

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_fashionmv  # noqa: F401  (registers fashionmv)
from tfds_fashionmv import synthetic

SMALL = synthetic.SyntheticConfig(seed=3, train_products=12, train_triplets=15,
                                  val_products=6, val_triplets=5, image_size=48)


def _digest(root) -> dict[str, str]:
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: epath.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  out = epath.Path(tmp_path_factory.mktemp("release"))
  counts = synthetic.generate(out, SMALL)
  return out, counts


def test_release_layout(release):
  out, _ = release
  for name in ("train_triplets", "val_triplets", "train_captions", "val_captions"):
    assert (out / "data" / f"{name}.jsonl").exists()
  assert {p.name for p in (out / "images").iterdir()} == {
      "deepfashion", "f200k", "fashiongen_train", "fashiongen_val"}
  assert next(pathlib.Path(out / "images" / "f200k").rglob("*.jpeg"))
  datasets = {r["dataset"] for r in _rows(out / "data" / "val_triplets.jsonl")}
  assert datasets == {"deepfashion", "f200k", "fashiongen_val"}
  deepfashion_ids = [r["product_id"]
                     for r in _rows(out / "data" / "train_captions.jsonl")
                     if r["dataset"] == "deepfashion"]
  assert all(pid.count("/") == 3 for pid in deepfashion_ids)  # WOMEN/Dresses/id_x/02


def test_same_seed_same_bytes_other_seed_differs(release, tmp_path):
  out, _ = release
  again = epath.Path(tmp_path / "again")
  synthetic.generate(again, SMALL)
  assert _digest(again) == _digest(out)
  other = epath.Path(tmp_path / "other")
  synthetic.generate(other, synthetic.SyntheticConfig(
      **{**SMALL.__dict__, "seed": SMALL.seed + 1}))
  assert _digest(other) != _digest(out)


def test_release_texts_are_pinned(release):
  """One seed, one catalogue: a change to the sampling (its draws or their order)
  changes every release, tokenizer corpus and benchmark input made from a seed."""
  out, _ = release
  digests = {name: hashlib.sha256((out / "data" / name).read_bytes()).hexdigest()[:16]
             for name in ("train_captions.jsonl", "train_triplets.jsonl",
                          "val_captions.jsonl", "val_triplets.jsonl")}
  assert digests == {"train_captions.jsonl": "911438083d8923d7",
                     "train_triplets.jsonl": "afe7fe339e3118c1",
                     "val_captions.jsonl": "e911bcb91f3d8452",
                     "val_triplets.jsonl": "df3ccd49f7604eed"}


def test_attribute_sampler():
  rng = np.random.default_rng(0)
  assert [synthetic.sample_attributes(rng) for _ in range(2)] == [
      synthetic.Attributes("coat", "pink", "dotted", "sleeveless", "cropped"),
      synthetic.Attributes("dress", "red", "solid", "sleeveless", "long")]
  # One uniform draw per attribute, in ATTRIBUTES order.
  rng, again = np.random.default_rng(1), np.random.default_rng(1)
  drawn = synthetic.sample_attributes(rng)
  assert drawn == synthetic.Attributes(
      **{k: str(again.choice(synthetic.CHOICES[k])) for k in synthetic.ATTRIBUTES})
  values = {synthetic.sample_value(rng, "sleeves", other_than="sleeveless")
            for _ in range(50)}
  assert values == {"short-sleeved", "long-sleeved"}


def test_triplets_are_solvable_from_attributes(release):
  out, _ = release
  for split in ("train", "val"):
    captions = {(r["dataset"], r["product_id"]): r["caption_short"]
                for r in _rows(out / "data" / f"{split}_captions.jsonl")}
    # No two products of one source and split look alike, so a target is unique.
    for dataset in {d for d, _ in captions}:
      shorts = [c for (d, _), c in captions.items() if d == dataset]
      assert len(shorts) == len(set(shorts))
    for row in _rows(out / "data" / f"{split}_triplets.jsonl"):
      source = captions[row["dataset"], row["source_id"]].split()
      target = captions[row["dataset"], row["target_id"]].split()
      assert row["source_id"] != row["target_id"]
      changed_words = [w for w in target if w not in source]
      # Every changed visible attribute of the target is named in the text.
      for word in changed_words:
        assert word.split("-")[0] in row["modification_text_short"], (row, word)
      assert row["modification_text_long"].startswith("Change ")


def test_modification_text_states_the_change():
  a = synthetic.Attributes("dress", "red", "solid", "long-sleeved", "regular")
  short, long = synthetic.modification_texts(a, a.replace(colour="blue",
                                                          pattern="striped"))
  assert short == "make it blue and striped"
  assert long == ("Change the colour from red to blue and the pattern from solid to "
                  "striped; keep everything else the same.")
  short, _ = synthetic.modification_texts(a, a.replace(category="jacket",
                                                       colour="orange"))
  assert short == "make it an orange jacket"


def test_views_differ_visibly():
  a = synthetic.Attributes("shirt", "green", "checked", "short-sleeved", "long")
  views = [np.asarray(synthetic.render_view(a, v, 64, np.random.default_rng(0)),
                      np.float32) for v in synthetic.VIEW_NAMES]
  for i in range(len(views)):
    for j in range(i + 1, len(views)):
      assert np.abs(views[i] - views[j]).mean() > 3.0, (i, j)


def test_tfds_build_reads_back_exact_counts(release, tmp_path):
  out, counts = release
  data_dir = tmp_path / "tfds"
  for config in ("products", "triplets"):
    tfds.builder(f"fashionmv/{config}", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=out))
  for split, prefix in (("train", "train"), ("validation", "val")):
    products = tfds.data_source("fashionmv/products", split=split, data_dir=data_dir)
    triplets = tfds.data_source("fashionmv/triplets", split=split, data_dir=data_dir)
    caption_rows = _rows(out / "data" / f"{prefix}_captions.jsonl")
    triplet_rows = _rows(out / "data" / f"{prefix}_triplets.jsonl")
    assert len(products) == len(caption_rows) == counts[f"{split}_products"]
    assert len(triplets) == len(triplet_rows) == counts[f"{split}_triplets"]
    examples = [products[i] for i in range(len(products))]
    assert sum(int(ex["num_views"]) for ex in examples) == counts[f"{split}_images"]
    assert all(len(ex["views"]) == ex["num_views"] and
               ex["views"][0].shape == (48, 48, 3) for ex in examples)
    by_id = {(ex["source"].decode(), ex["product_id"].decode()): ex for ex in examples}
    for row in caption_rows[:5]:
      source = ("fashiongen" if row["dataset"].startswith("fashiongen")
                else row["dataset"])
      assert by_id[source, row["product_id"]]["caption_long"].decode() == row[
          "caption_long"]
    ids = {(t["source"], t["source_id"], t["target_id"])
           for t in (triplets[i] for i in range(len(triplets)))}
    for s, src, tgt in ids:
      assert (s.decode(), src.decode()) in by_id and (s.decode(), tgt.decode()) in by_id
