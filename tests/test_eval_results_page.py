"""The results page and contact sheet reference images that exist."""

import glob
import html.parser
import io
import os

import numpy as np
import pytest
from PIL import Image

from procir_jax.eval.pages import results_page


class _Sources(html.parser.HTMLParser):

  def __init__(self):
    super().__init__()
    self.sources = []

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.sources.append(dict(attrs)["src"])


def _products(release):
  """Product id -> view file paths, from a release's deepfashion images."""
  root = os.path.join(release, "images", "deepfashion")
  products = {}
  for path in sorted(glob.glob(os.path.join(root, "**", "*.jpg"),
                               recursive=True)):
    products.setdefault(os.path.relpath(os.path.dirname(path), root),
                        []).append(path)
  return products


def test_page_and_sheet_from_release_images(fashionmv_release, tmp_path):
  products = _products(fashionmv_release)
  ids = sorted(products)
  assert len(ids) >= 4
  source, target = ids[0], ids[2]
  # Query views as arrays, result views as file paths (through a callable).
  query_views = [np.asarray(Image.open(p)) for p in products[source]]
  ranked = ids[1:5] + ["missing/product"]
  scores = np.linspace(0.9, 0.5, len(ranked))
  paths = results_page.write_results_page(
      tmp_path / "out", query_views, "make it blue & <striped>", ranked,
      scores, products.get, target_id=target, source_id=source, name="q0")

  page = open(paths["html"], encoding="utf-8").read()
  assert "make it blue &amp; &lt;striped&gt;" in page
  for pid in ranked:
    assert pid in page
  assert "target at rank 2" in page and "no views found" in page
  parser = _Sources()
  parser.feed(page)
  expected = len(query_views) + sum(
      min(len(products.get(p, [])), 5) for p in ranked)
  assert len(parser.sources) == expected
  for src in parser.sources:
    assert not os.path.isabs(src)
    assert os.path.isfile(os.path.join(tmp_path / "out", src))
  assert sorted(paths["images"]) == sorted(
      os.path.join(tmp_path / "out", s) for s in parser.sources)

  with Image.open(paths["png"]) as sheet:
    assert sheet.format == "PNG"
    assert sheet.width > 400 and sheet.height > 6 * 160


def test_embedded_page_needs_no_side_files(tmp_path):
  views = {"a": [np.full((40, 30, 3), 200, np.uint8)],
           "b": [np.zeros((30, 40), np.uint8), np.zeros((30, 40, 4), np.uint8)]}
  paths = results_page.write_results_page(
      tmp_path, [np.zeros((20, 20, 1), np.uint8)], "", ["a", "b"], [0.5, 0.25],
      views, embed=True, name="embedded")
  assert paths["images"] == []
  assert not os.path.exists(tmp_path / "embedded_files")
  page = open(paths["html"], encoding="utf-8").read()
  assert page.count('src="data:image/jpeg;base64,') == 4


def test_bad_views_are_reported():
  with pytest.raises(ValueError, match="uint8"):
    results_page.to_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    results_page.to_image("no/such/view.jpg")


def test_views_may_be_encoded_bytes():
  # As fashionmv.Product.views holds them: the evaluation page passes them on.
  buf = io.BytesIO()
  Image.fromarray(np.full((12, 8, 3), 40, np.uint8)).save(buf, format="PNG")
  image = results_page.to_image(buf.getvalue())
  assert image.size == (8, 12) and image.getpixel((0, 0)) == (40, 40, 40)
