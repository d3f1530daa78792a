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
      "0000000.jpg", "0000001.jpg", "0000002.jpg"]
  assert sorted(p.name for p in (tmp_path / "out" / "12").iterdir()) == [
      "0000003.jpg", "0000004.jpg"]
  with Image.open(tmp_path / "out" / "3" / "0000005.jpg") as image:
    assert image.size == (4, 4) and image.mode == "RGB"
  again = fashiongen.extract(tmp_path / "fg.h5", tmp_path / "out", progress=False)
  assert (again.written, again.already_there) == (0, 6)


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
