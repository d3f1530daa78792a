"""The evaluation gallery and queries on a release with imageless products, built the
way the FashionMV release's evaluation builds them.

A small synthetic release whose DeepFashion validation rows are, in file order:
  1. P0 -> P1   usable
  2. P2 -> P3   P3's folder is missing
  3. P4 -> P5   P5's folder holds no image (only a text file)
  4. P1 -> P0   usable
The gallery must hold P0, P1, P2 and P4 (the sources of rows 2 and 3 too) and the
queries only rows 1 and 4. No model is built.
"""

import json
import shutil

from etils import epath
import pytest
import tensorflow_datasets as tfds

from procir_jax.data import fashionmv, pipeline
from procir_jax.eval import encode
from tfds_fashionmv import synthetic

SMALL = synthetic.SyntheticConfig(seed=0, train_products=2, train_triplets=2,
                                  val_products=6, val_triplets=2, image_size=32,
                                  max_views=2)


def _rows(path: epath.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(data_dir, release dir, the six DeepFashion ids P0..P5, all validation rows)."""
  release = epath.Path(tmp_path_factory.mktemp("release"))
  synthetic.generate(release, SMALL)
  ids = sorted(r["product_id"] for r in _rows(release / "data" / "val_captions.jsonl")
               if r["dataset"] == "deepfashion")[:6]
  ours = [{"dataset": "deepfashion", "source_id": ids[s], "target_id": ids[t],
           "modification_text_short": f"make {s} like {t}",
           "modification_text_long": f"Change {s} into {t}."}
          for s, t in ((0, 1), (2, 3), (4, 5), (1, 0))]
  triplets_file = release / "data" / "val_triplets.jsonl"
  rows = ours + [r for r in _rows(triplets_file) if r["dataset"] != "deepfashion"]
  triplets_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
  folder = release / "images" / "deepfashion"
  shutil.rmtree(folder / ids[3])
  for image in (folder / ids[5]).iterdir():
    image.unlink()
  (folder / ids[5] / "notes.txt").write_text("not an image")  # does not count
  data_dir = tmp_path_factory.mktemp("tfds")
  for config in ("products", "triplets"):
    tfds.builder(f"fashionmv/{config}", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=release))
  return data_dir, ids, rows


def test_triplets_build_keeps_rows_without_images_and_flags_them(built):
  data_dir, ids, rows = built
  source = tfds.data_source("fashionmv/triplets", split="validation",
                            data_dir=data_dir)
  assert len(source) == len(rows)
  flags = {int(ex["row"]): (bool(ex["source_has_images"]),
                            bool(ex["target_has_images"]))
           for ex in (source[i] for i in range(len(source)))}
  assert [flags[r] for r in (1, 2, 3, 4)] == [
      (True, True), (True, False), (True, False), (True, True)]
  assert all(flags[r] == (True, True) for r in range(5, len(rows) + 1))
  report = tfds.builder("fashionmv/triplets", data_dir=data_dir).info.metadata[
      "build_report"]["validation"]
  assert (report["triplets"], report["triplets_usable"]) == (len(rows), len(rows) - 2)
  assert report["triplets_unusable"] == [
      {"row": 2, "source_id": ids[2], "target_id": ids[3],
       "products_without_images": [ids[3]]},
      {"row": 3, "source_id": ids[4], "target_id": ids[5],
       "products_without_images": [ids[5]]}]
  assert report["products_dropped_no_folder"] == [f"deepfashion/{ids[3]}"]
  assert report["products_dropped_no_readable_image"] == [f"deepfashion/{ids[5]}"]


def test_gallery_holds_the_products_of_unusable_rows(built):
  data_dir, ids, rows = built
  cfg = pipeline.DataConfig(data_dir=str(data_dir), model_dir="unused",
                            global_batch_size=1)
  records = encode.evaluation_records(cfg, "validation")
  keys, gallery, joined = records["deepfashion"]
  assert keys == sorted(("deepfashion", ids[i]) for i in (0, 1, 2, 4))
  assert [gallery[i].product_id for i in range(len(gallery))] == [k[1] for k in keys]
  assert [joined[i].triplet.row for i in range(len(joined))] == [1, 4]
  assert joined.unusable == 2
  for source, dataset in (("f200k", "f200k"), ("fashiongen", "fashiongen_val")):
    keys, _, joined = records[source]
    named = [r for r in rows if r["dataset"] == dataset]
    assert keys == sorted({(source, r[k]) for r in named
                           for k in ("source_id", "target_id")})
    assert (len(joined), joined.unusable) == (len(named), 0)
  # Training reads the same usable rows, from every source at once.
  assert len(pipeline.records_for("contrastive", cfg, "validation")) == len(rows) - 2


class _ProductsWithout:
  """A products config that disagrees with the triplets one about one product."""

  split = "validation"

  def __init__(self, products, absent=(), present=()):
    self._products, self._absent, self._present = products, set(absent), set(present)

  def __contains__(self, key):
    return key not in self._absent and (key in self._present or key in self._products)


def test_flags_that_disagree_with_products_say_rebuild_both(built):
  data_dir, ids, _ = built
  products = fashionmv.Products(str(data_dir), "validation")
  triplets = fashionmv.Triplets(str(data_dir), "validation")
  with pytest.raises(ValueError, match=(
      rf"fashionmv/triplets validation and fashionmv/products validation disagree "
      rf"about which products have images \(row 2: deepfashion product "
      rf"'{ids[2]}' has images by fashionmv/triplets but is absent from "
      rf"fashionmv/products; 1 in all\).*Rebuild both from the same release")):
    fashionmv.JoinedTriplets(
        _ProductsWithout(products, absent=[("deepfashion", ids[2])]), triplets)
  with pytest.raises(ValueError, match=(
      rf"row 2: deepfashion product '{ids[3]}' has no images by fashionmv/triplets "
      rf"but is in fashionmv/products")):
    fashionmv.JoinedTriplets(
        _ProductsWithout(products, present=[("deepfashion", ids[3])]), triplets,
        ["deepfashion"])
