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


def _product_id(value) -> str:
  value = np.asarray(value).reshape(-1)[0]
  if isinstance(value, bytes):
    value = value.decode()
  return str(value.item() if hasattr(value, "item") else value).strip()


def extract(h5_path: str | epath.Path, out_dir: str | epath.Path,
            chunk: int = 512, quality: int = 95, progress: bool = True
            ) -> ExtractCounts:
  """Writes row r of the h5 file to `<out_dir>/<product_id>/<r:07d>.jpg`.

  Rows are named by their index so a product's views sort in file order; files that
  already exist are left alone, so an interrupted run can simply be started again.
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
        product_id = _product_id(raw_id)
        seen_products.add(product_id)
        path = out_dir / product_id / f"{row:07d}.jpg"
        counts.rows += 1
        if path.exists():
          counts.already_there += 1
          continue
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels, np.uint8)).convert("RGB").save(
            buffer, format="JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())
        counts.written += 1
      bar.update(len(block_images))
    bar.close()
  counts.products = len(seen_products)
  return counts
