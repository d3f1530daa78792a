"""Extracting FashionGen product images from its h5 files into the release layout.

FashionGen ships each split as one h5 file whose rows are images: `input_image`
(N, H, W, 3 uint8) and `input_productID` (N or N x 1), with the rows of one product
consecutive. FashionMV expects `images/fashiongen_{train,val}/<product_id>/*.jpg`.
"""

from __future__ import annotations

import dataclasses
import io

from etils import epath
import h5py
import numpy as np
from PIL import Image
import tqdm

_IMAGE_KEY = "input_image"
_ID_KEY = "input_productID"


@dataclasses.dataclass
class ExtractCounts:
  rows: int = 0
  written: int = 0
  already_there: int = 0  # from an earlier, interrupted run
  products: int = 0


def _product_id(value, row: int, h5_path) -> str:
  """The release's folder name: the id as an integer, `str(int(id))`."""
  value = np.asarray(value).reshape(-1)[0]
  try:
    return str(int(value))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{h5_path}: row {row} has product id {value!r}, which is not an "
                     f"integer; FashionGen ids are integers.") from e


def extract(h5_path: str | epath.Path, out_dir: str | epath.Path,
            chunk: int = 512, quality: int = 95, progress: bool = True
            ) -> ExtractCounts:
  """Writes row r of the h5 file to `<out_dir>/<product_id>/<r>.jpg`, as the release's
  tool does: the same names (no zero padding, so a product's views sort as those
  strings sort, which decides the views used), the same folders and the same bytes
  (PIL's JPEG encoder at `quality`, 95 in the release). Files that already exist are
  left alone, so an interrupted run can simply be started again.
  """
  out_dir = epath.Path(out_dir)
  counts = ExtractCounts()
  seen_products: set[str] = set()
  with h5py.File(epath.Path(h5_path).open("rb"), "r") as f:
    missing = [k for k in (_IMAGE_KEY, _ID_KEY) if k not in f]
    if missing:
      raise KeyError(f"{h5_path} lacks {missing}; keys found: {sorted(f.keys())}. "
                     f"Is this a FashionGen h5 file (fashiongen_256_256_*.h5)?")
    images, ids = f[_IMAGE_KEY], f[_ID_KEY]
    if len(images) != len(ids):
      raise ValueError(f"{h5_path}: {len(images)} images but {len(ids)} product ids.")
    bar = tqdm.tqdm(total=len(images), unit="img", desc=f"FashionGen {h5_path}",
                    disable=not progress)
    for start in range(0, len(images), chunk):
      block_images = images[start:start + chunk]
      block_ids = ids[start:start + chunk]
      for offset, (pixels, raw_id) in enumerate(zip(block_images, block_ids)):
        row = start + offset
        product_id = _product_id(raw_id, row, h5_path)
        seen_products.add(product_id)
        path = out_dir / product_id / f"{row}.jpg"
        counts.rows += 1
        padded = path.with_name(f"{row:07d}.jpg")
        if padded != path and padded.exists():
          raise FileExistsError(
              f"{padded} has a zero-padded name from an earlier version of this tool; "
              f"the release names views {row}.jpg, and its view order depends on it. "
              f"Remove {out_dir} and run the extraction again.")
        if path.exists():
          counts.already_there += 1
          continue
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels, np.uint8)).save(
            buffer, format="JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())
        counts.written += 1
      bar.update(len(block_images))
    bar.close()
  counts.products = len(seen_products)
  return counts
