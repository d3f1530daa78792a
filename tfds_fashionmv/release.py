"""Reading the FashionMV release: annotation JSONL files and product image folders.

The release ships `data/*.jsonl` annotations and users download the images into
`images/<folder>/<product_id>/`. This module turns both into plain Python records and
leaves the TFDS wiring to the builder. Paths go through `etils.epath`, so a manual dir
on a cloud bucket works the same as a local one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import concurrent.futures
import os
from typing import Any, Iterable, Iterator, Sequence

from etils import epath
from PIL import Image

# Canonical source names and the `dataset` values that mean them.
SOURCES = ("deepfashion", "f200k", "fashiongen")
_SOURCE_ALIASES = {
    "deepfashion": "deepfashion",
    "f200k": "f200k",
    "fashion200k": "f200k",
    "fashiongen": "fashiongen",
    "fashiongen_val": "fashiongen",
    "fashiongen_train": "fashiongen",
}

SPLIT_FILES = {
    "train": ("data/train_triplets.jsonl", "data/train_captions.jsonl"),
    "validation": ("data/val_triplets.jsonl", "data/val_captions.jsonl"),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_MAX_VIEWS = 5  # the reference protocol's cap on views per product

# Caption rows: the release's exact key names are not pinned down, so each canonical
# field accepts the obvious spellings. The first key present wins.
_PRODUCT_ID_KEYS = ("product_id", "id", "item_id", "pid")
_LONG_CAPTION_KEYS = (
    "caption_long", "long_caption", "captions_long", "long_captions",
    "description", "caption", "long", "detailed_caption",
)
_SHORT_CAPTION_KEYS = (
    "caption_short", "short_caption", "captions_short", "short_captions",
    "short", "title", "brief_caption",
)
_VIEW_CAPTION_KEYS = (
    "view_captions", "captions_per_view", "per_view_captions", "image_captions",
    "captions",
)
_TRIPLET_KEYS = ("dataset", "source_id", "target_id", "modification_text_short")
_TRIPLET_TEXT_KEYS = ("modification_text_short", "modification_text_long")


class ReleaseError(ValueError):
  """The release on disk does not look like FashionMV; the message says what to fix."""


def canonical_source(dataset: str, where: str) -> str:
  """Maps a row's `dataset` value to deepfashion | f200k | fashiongen."""
  source = _SOURCE_ALIASES.get(str(dataset).strip().lower())
  if source is None:
    raise ReleaseError(
        f"{where}: unknown dataset {dataset!r}; expected one of "
        f"{sorted(_SOURCE_ALIASES)}.")
  return source


def image_folder(source: str, split: str) -> str:
  """The folder under `images/` that holds the products of `source` in `split`.

  FashionGen keeps its training and validation products in separate folders.
  """
  if source == "fashiongen":
    return "fashiongen_val" if split == "validation" else "fashiongen_train"
  return source


def read_jsonl(path: epath.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, row) for each non-empty line; bad JSON names the line."""
  with path.open("r") as f:
    for line_number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}:{line_number}: not valid JSON ({e}).") from e
      if not isinstance(row, dict):
        raise ReleaseError(f"{path}:{line_number}: expected a JSON object, got "
                           f"{type(row).__name__}.")
      yield line_number, row


@dataclasses.dataclass(frozen=True)
class Triplet:
  row: int  # line number in the JSONL file, for traceability
  source: str  # canonical source
  source_id: str
  target_id: str
  modification_text_short: str
  modification_text_long: str
  extra_texts: tuple[tuple[str, str], ...]  # any other text field, by name


@dataclasses.dataclass(frozen=True)
class Captions:
  long: str = ""
  short: str = ""
  per_view: tuple[str, ...] = ()
  extra_texts: tuple[tuple[str, str], ...] = ()


def _text(value: Any) -> str:
  return "" if value is None else str(value)


def _extra_texts(row: dict[str, Any], used: set[str]) -> tuple[tuple[str, str], ...]:
  """Every string field not already mapped, so no text of the release is lost."""
  return tuple(sorted((k, v) for k, v in row.items()
                      if k not in used and isinstance(v, str)))


def read_triplets(path: epath.Path) -> list[Triplet]:
  triplets = []
  for line_number, row in read_jsonl(path):
    where = f"{path}:{line_number}"
    missing = [k for k in _TRIPLET_KEYS if k not in row]
    if missing:
      raise ReleaseError(
          f"{where}: triplet row lacks {missing}; keys seen: {sorted(row)}. A triplet "
          f"needs {list(_TRIPLET_KEYS)}.")
    source = canonical_source(row["dataset"], where)
    used = {"dataset", "source_id", "target_id", *_TRIPLET_TEXT_KEYS}
    triplets.append(Triplet(
        row=line_number,
        source=source,
        source_id=check_product_id(row["source_id"], where),
        target_id=check_product_id(row["target_id"], where),
        modification_text_short=_text(row.get("modification_text_short")),
        modification_text_long=_text(row.get("modification_text_long")),
        extra_texts=_extra_texts(row, used),
    ))
  return triplets


def check_product_id(product_id: Any, where: str) -> str:
  """Product ids become folder paths: refuse ones that would escape `images/`."""
  product_id = str(product_id).strip()
  parts = product_id.split("/")
  if not product_id or any(p in ("", ".", "..") for p in parts):
    raise ReleaseError(f"{where}: invalid product id {product_id!r}.")
  return product_id


def _first_key(row: dict[str, Any], keys: Sequence[str]) -> str | None:
  return next((k for k in keys if k in row), None)


def _first_of_type(row: dict[str, Any], keys: Sequence[str], kind: type,
                   used: set[str]) -> str | None:
  return next((k for k in keys
               if k not in used and isinstance(row.get(k), kind)), None)


def _parse_captions(row: dict[str, Any]) -> tuple[Captions, set[str]]:
  """Canonical captions from one caption row, and the keys it used.

  Strings are whole-product captions, lists are one caption per view, and a nested
  object (e.g. `"captions": {"long": ..., "short": ...}`) is read the same way.
  """
  used: set[str] = set()
  captions = Captions()
  nested_key = _first_of_type(row, ("captions", "caption"), dict, used)
  if nested_key is not None:
    captions, _ = _parse_captions(row[nested_key])
    used.add(nested_key)
  long_key = _first_of_type(row, _LONG_CAPTION_KEYS, str, used)
  if long_key is not None:
    captions = dataclasses.replace(captions, long=row[long_key])
    used.add(long_key)
  short_key = _first_of_type(row, _SHORT_CAPTION_KEYS, str, used)
  if short_key is not None:
    captions = dataclasses.replace(captions, short=row[short_key])
    used.add(short_key)
  view_key = _first_of_type(
      row, _VIEW_CAPTION_KEYS + _LONG_CAPTION_KEYS, list, used)
  if view_key is not None:
    captions = dataclasses.replace(
        captions, per_view=tuple(_text(v) for v in row[view_key]))
    used.add(view_key)
  return captions, used


def read_captions(path: epath.Path) -> tuple[dict[tuple[str, str], Captions], int]:
  """Captions keyed by (canonical source, product id), and the duplicate-row count.

  Raises ReleaseError naming the keys seen when no row of the file carries a caption
  field this reader knows.
  """
  captions: dict[tuple[str, str], Captions] = {}
  keys_seen: set[str] = set()
  recognised = 0
  duplicates = 0
  for line_number, row in read_jsonl(path):
    where = f"{path}:{line_number}"
    keys_seen.update(row)
    id_key = _first_key(row, _PRODUCT_ID_KEYS)
    if id_key is None or "dataset" not in row:
      raise ReleaseError(
          f"{where}: caption row needs a product id (one of {list(_PRODUCT_ID_KEYS)}) "
          f"and `dataset`; keys seen: {sorted(row)}.")
    parsed, used = _parse_captions(row)
    if used:
      recognised += 1
    used |= {id_key, "dataset"}
    parsed = dataclasses.replace(parsed, extra_texts=_extra_texts(row, used))
    key = (canonical_source(row["dataset"], where),
           check_product_id(row[id_key], where))
    if key in captions:
      duplicates += 1  # first row wins; counted in the build report
      continue
    captions[key] = parsed
  if captions and not recognised:
    raise ReleaseError(
        f"{path}: no row has a caption field this builder knows. Keys seen: "
        f"{sorted(keys_seen)}. Known long-caption keys: {list(_LONG_CAPTION_KEYS)}; "
        f"short: {list(_SHORT_CAPTION_KEYS)}; per view: {list(_VIEW_CAPTION_KEYS)}.")
  return captions, duplicates


@dataclasses.dataclass
class ProductViews:
  """What scanning one product folder found."""
  folder_exists: bool
  views: list[bytes]  # RGB JPEG or PNG bytes, in file-name order
  corrupt_files: list[str]  # paths relative to images/
  files_beyond_cap: int  # readable-or-not files never looked at because of the cap


def normalised_image_bytes(data: bytes) -> bytes:
  """Decodes an image fully and returns RGB JPEG/PNG bytes.

  RGB JPEG and PNG files keep their original bytes; anything else (webp, grayscale,
  CMYK, alpha, palette) is re-encoded losslessly as PNG so every reader sees 3 channels.
  Raises OSError or ValueError (from PIL) when the file is not a readable image.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # full decode: truncated files fail here, not at training time
    if image.format in ("JPEG", "PNG") and image.mode == "RGB":
      return data
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def scan_product(images_dir: epath.Path, folder: str, product_id: str,
                 max_views: int) -> ProductViews:
  """Reads up to `max_views` readable views of one product, skipping corrupt files."""
  product_dir = images_dir / folder / product_id
  if not product_dir.is_dir():
    return ProductViews(False, [], [], 0)
  files = sorted((p for p in product_dir.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                 key=lambda p: p.name)
  views, corrupt = [], []
  for index, path in enumerate(files):
    if len(views) == max_views:
      return ProductViews(True, views, corrupt, len(files) - index)
    try:
      views.append(normalised_image_bytes(path.read_bytes()))
    except (OSError, ValueError, Image.DecompressionBombError):
      corrupt.append(f"{folder}/{product_id}/{path.name}")
  return ProductViews(True, views, corrupt, 0)


def scan_products(images_dir: epath.Path, products: Iterable[tuple[str, str]],
                  max_views: int, chunk: int = 256) -> Iterator[ProductViews]:
  """`scan_product` over (folder, product id) pairs, in order, decoding in threads.

  PIL releases the GIL while decoding, so threads give real parallelism; chunks bound
  how many decoded products are held in memory at once.
  """
  products = list(products)
  workers = min(32, 2 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(products), chunk):
      batch = products[start:start + chunk]
      yield from pool.map(
          lambda p: scan_product(images_dir, p[0], p[1], max_views), batch)
