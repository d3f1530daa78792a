"""FashionGen h5 -> image folders, as tools/prepare_fashiongen.py runs it."""

import pathlib
import subprocess
import sys

import h5py
import numpy as np
from PIL import Image
import pytest

from tfds_fashionmv import fashiongen

TOOL = pathlib.Path(__file__).parents[1] / "tools" / "prepare_fashiongen.py"


def _h5(path, ids, shape=(4, 4)):
  rng = np.random.default_rng(0)
  with h5py.File(path, "w") as f:
    f["input_image"] = rng.integers(0, 255, (len(ids), *shape, 3), dtype=np.uint8)
    f["input_productID"] = np.asarray(ids, np.int64)[:, None]
    f["input_description"] = np.asarray([b"x"] * len(ids))


def test_rows_become_product_folders(tmp_path):
  _h5(tmp_path / "fg.h5", [7, 7, 7, 12, 12, 3])
  counts = fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", chunk=4,
                              progress=False)
  assert (counts.rows, counts.products, counts.written) == (6, 3, 6)
  assert sorted(p.name for p in (tmp_path / "out" / "7").iterdir()) == [
      "0.jpg", "1.jpg", "2.jpg"]
  assert sorted(p.name for p in (tmp_path / "out" / "12").iterdir()) == [
      "3.jpg", "4.jpg"]
  with Image.open(tmp_path / "out" / "3" / "5.jpg") as image:
    assert image.size == (4, 4) and image.mode == "RGB"
  again = fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", progress=False)
  assert (again.written, again.already_there) == (0, 6)


def test_same_tree_and_bytes_as_the_release_tool(tmp_path):
  # Products whose rows cross row 10 and row 100: unpadded names sort "10" < "8".
  ids = [1] * 8 + [2001] * 4 + [3] * 86 + [40] * 4
  _h5(tmp_path / "fg.h5", ids, shape=(16, 16))
  counts = fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", chunk=7,
                              progress=False)
  assert (counts.rows, counts.products) == (102, 4)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "1", "2001", "3", "40"]
  assert sorted(p.name for p in (tmp_path / "out" / "2001").iterdir()) == [
      "10.jpg", "11.jpg", "8.jpg", "9.jpg"]
  assert sorted(p.name for p in (tmp_path / "out" / "40").iterdir()) == [
      "100.jpg", "101.jpg", "98.jpg", "99.jpg"]
  # The release saves each row with PIL, by extension, at quality 95.
  with h5py.File(tmp_path / "fg.h5", "r") as f:
    for row, product in [(0, "1"), (9, "2001"), (10, "2001"), (101, "40")]:
      reference = tmp_path / f"reference_{row}.jpg"
      Image.fromarray(f["input_image"][row]).save(reference, quality=95)
      written = tmp_path / "out" / product / f"{row}.jpg"
      assert written.read_bytes() == reference.read_bytes(), row


def test_ids_are_integers_as_in_the_release(tmp_path):
  with h5py.File(tmp_path / "fg.h5", "w") as f:
    f["input_image"] = np.zeros((2, 2, 2, 3), np.uint8)
    f["input_productID"] = np.asarray([[7.0], [7.0]])
  fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", progress=False)
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["7"]  # not "7.0"


def test_a_tree_from_zero_padded_names_is_refused(tmp_path):
  _h5(tmp_path / "fg.h5", [5, 5])
  (tmp_path / "out" / "5").mkdir(parents=True)
  (tmp_path / "out" / "5" / "0000001.jpg").write_bytes(b"old")
  with pytest.raises(FileExistsError,
                     match=r"0000001.jpg has a zero-padded name.*Remove"):
    fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", progress=False)


def test_wrong_h5_names_the_keys(tmp_path):
  with h5py.File(tmp_path / "other.h5", "w") as f:
    f["images"] = np.zeros((1, 2, 2, 3), np.uint8)
  with pytest.raises(KeyError, match=r"lacks \['input_image', 'input_productID'\]"):
    fashiongen.extract(tmp_path / "other.h5", tmp_path / "out", progress=False)


def test_command_line_tool(tmp_path):
  _h5(tmp_path / "fg.h5", [5, 5])
  out = subprocess.run(
      [sys.executable, str(TOOL), f"--h5={tmp_path / 'fg.h5'}",
       f"--out_dir={tmp_path / 'val'}"], capture_output=True, text=True, check=True)
  assert "2 rows, 1 products: 2 images written" in out.stdout
  assert len(list((tmp_path / "val" / "5").iterdir())) == 2
