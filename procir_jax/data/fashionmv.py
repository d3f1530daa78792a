"""FashionMV on disk: the TFDS `products` and `triplets` configs, joined by product id.

Records are read with `tfds.data_source` as raw bytes and parsed with TFDS's NumPy
example parser, so views stay encoded until a worker decodes them, building the id
index never decodes an image, and no TensorFlow is imported at read time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser

import tfds_fashionmv  # noqa: F401  (registers the fashionmv builder)

ProductKey = tuple[str, str]  # (source, product_id)
KEY_FEATURES = ("source", "product_id")
_KEY_BATCH = 1024  # records per read when only keys are wanted


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Product:
  """One product with its views still encoded (JPEG/PNG bytes)."""

  product_id: str
  source: str
  views: tuple[bytes, ...]
  caption_long: str
  caption_short: str

  @property
  def key(self) -> ProductKey:
    return (self.source, self.product_id)


@dataclasses.dataclass(frozen=True)
class Triplet:
  source: str
  source_id: str
  target_id: str
  texts: dict[str, str]  # modification_text_short, modification_text_long, extras
  row: int
  # Whether each product has images (is in `fashionmv/products`). A row lacking
  # either is no query or training example, but feeds the evaluation gallery.
  source_has_images: bool = True
  target_has_images: bool = True

  @property
  def usable(self) -> bool:
    return self.source_has_images and self.target_has_images


class _RawSource:
  """A tfds data source of raw records plus the parser for them (picklable)."""

  def __init__(self, name: str, split: str, data_dir: str):
    self.name, self.split = name, split
    try:
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except Exception as e:  # tfds raises several types for a missing dataset
      raise FileNotFoundError(
          f"Cannot open {name} split {split!r} in {data_dir}: {e}. Build it first: "
          f"tfds build fashionmv --imports=tfds_fashionmv --manual_dir=<release> "
          f"--data_dir={data_dir}") from e
    info = tfds.builder(name, data_dir=data_dir).info
    features, self.version = info.features, info.version
    # What was built: the split's shard lengths and bytes, the build report.
    self.info_sha256 = hashlib.sha256(info.as_json.encode()).hexdigest()
    serialized = features.get_serialized_info()
    self._parser = example_parser.ExampleParserNp(serialized)
    self._key_parser = example_parser.ExampleParserNp(
        {k: serialized[k] for k in KEY_FEATURES if k in serialized})

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._parser.parse_example(self._source[index])

  def keys(self, start: int, stop: int) -> list[ProductKey]:
    """The (source, product_id) of records [start, stop), read in batches and
    parsed for those two features alone."""
    keys = []
    for first in range(start, stop, _KEY_BATCH):
      records = self._source.__getitems__(
          list(range(first, min(first + _KEY_BATCH, stop))))
      for record in records:
        parsed = self._key_parser.parse_example(record)
        keys.append((_text(parsed["source"]), _text(parsed["product_id"])))
    return keys


# The features a products dataset needs: `fashionmv/products`, or a catalogue packaged
# with the fashionmv builder or with a builder of its own.
PRODUCT_FEATURES = ("product_id", "source", "views", "caption_long", "caption_short")


def _check_products_dataset(dataset: str, data_dir: str, split: str) -> None:
  """Raises unless `dataset` is built in `data_dir` with the products features and
  `split`."""
  try:
    info = tfds.builder(dataset, data_dir=data_dir).info
  except Exception as e:  # tfds raises several types for a missing dataset
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(
        f"The dataset {dataset!r} is not in {data_dir} ({why}). Build it there (for "
        f"a catalogue in the FashionMV layout: tfds build fashionmv "
        f"--imports=tfds_fashionmv --manual_dir=<release> --data_dir=<dir>).") from e
  missing = [f for f in PRODUCT_FEATURES if f not in info.features]
  if missing:
    raise ValueError(f"{dataset} in {data_dir} lacks the features {missing} of "
                     f"fashionmv/products ({', '.join(PRODUCT_FEATURES)}): use a "
                     f"dataset built like fashionmv/products.")
  if split not in info.splits:
    raise ValueError(f"{dataset} in {data_dir} has no split {split!r} (it has "
                     f"{sorted(info.splits)}).")


class Products:
  """Random access to `fashionmv/products` by record index or by (source, id).

  `dataset` names another TFDS dataset with the same features (PRODUCT_FEATURES):
  a shop's catalogue packaged with the builder.
  """

  def __init__(self, data_dir: str, split: str,
               dataset: str = "fashionmv/products",
               keys: Callable[[_RawSource], Sequence[ProductKey]] | None = None):
    """`keys`, given the raw records, returns the key of every record in record
    order (`product_keys.shared_scan` spreads that read over the processes and
    keeps it for reruns); by default this process reads them all."""
    self.split, self.dataset = split, dataset
    if dataset != "fashionmv/products":
      _check_products_dataset(dataset, data_dir, split)
    self._raw = _RawSource(dataset, split, data_dir)
    self.version = self._raw.version
    start = time.perf_counter()
    record_keys = (keys(self._raw) if keys is not None
                   else self._raw.keys(0, len(self._raw)))
    if len(record_keys) != len(self._raw):
      raise ValueError(f"{len(record_keys)} keys for the {len(self._raw)} records "
                       f"of {dataset} {split} in {data_dir}.")
    self._index: dict[ProductKey, int] = {}
    for i, key in enumerate(record_keys):
      if self._index.setdefault(key, i) != i:
        raise ValueError(
            f"{dataset} {split} in {data_dir} holds product {key[1]!r} of {key[0]} "
            f"twice (records {self._index[key]} and {i}): rebuild it with one "
            f"example per product.")
    logging.info("Indexed %d %s products in %.1fs.", len(self._index), split,
                 time.perf_counter() - start)

  def __len__(self) -> int:
    return len(self._raw)

  def __repr__(self) -> str:  # stable: grain keeps it in iterator checkpoints
    return f"Products({self.split}, {len(self)})"

  def __contains__(self, key: ProductKey) -> bool:
    return key in self._index

  def keys(self) -> list[ProductKey]:
    return sorted(self._index)

  def index_of(self, key: ProductKey) -> int:
    try:
      return self._index[key]
    except KeyError:
      raise KeyError(f"Product {key[1]!r} of {key[0]} is not in fashionmv/products "
                     f"{self.split}.") from None

  def __getitem__(self, index: int) -> Product:
    record = self._raw[index]
    return Product(
        product_id=_text(record["product_id"]), source=_text(record["source"]),
        views=tuple(bytes(v) for v in record["views"]),
        caption_long=_text(record["caption_long"]),
        caption_short=_text(record["caption_short"]))

  def get(self, key: ProductKey) -> Product:
    return self[self.index_of(key)]

  def select(self, keys: Sequence[ProductKey]) -> "ProductSubset":
    """The given products, in that order, as a random-access source."""
    return ProductSubset(self, [self.index_of(k) for k in keys])


class ProductSubset:
  """Selected products of a `Products`, reusing its index."""

  def __init__(self, products: Products, indices: Sequence[int]):
    self._products, self._indices = products, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Product:
    return self._products[int(self._indices[index])]

  def __repr__(self) -> str:
    return f"ProductSubset({self._products!r}, {len(self)})"


class Triplets:
  """Random access to `fashionmv/triplets`, in file order: every row of the release,
  including those whose source or target has no images (see `Triplet.usable`)."""

  def __init__(self, data_dir: str, split: str):
    self._raw = _RawSource("fashionmv/triplets", split, data_dir)
    rows = [(int(self._raw[i]["row"]), i) for i in range(len(self._raw))]
    # Stored order follows TFDS's key hashing; file order is easier to reason about.
    self._order = [i for _, i in sorted(rows)]

  def __len__(self) -> int:
    return len(self._order)

  def __repr__(self) -> str:
    return f"Triplets({self._raw.split}, {len(self)})"

  def __getitem__(self, index: int) -> Triplet:
    record = self._raw[self._order[index]]
    texts = {k: _text(record[k]) for k in ("modification_text_short",
                                            "modification_text_long")}
    extra = record["extra_texts"]
    texts.update({_text(k): _text(v) for k, v in zip(extra["name"], extra["text"])})
    return Triplet(source=_text(record["source"]), source_id=_text(record["source_id"]),
                   target_id=_text(record["target_id"]), texts=texts,
                   row=int(record["row"]),
                   source_has_images=bool(record["source_has_images"]),
                   target_has_images=bool(record["target_has_images"]))

  @property
  def split(self) -> str:
    return self._raw.split


@dataclasses.dataclass(frozen=True)
class JoinedTriplet:
  triplet: Triplet
  source: Product
  target: Product


def _image_flag_mismatches(products: Products, t: Triplet) -> list[str]:
  """How a triplet's image flags disagree with `products` (empty when they agree).

  Both configs decide "has images" by the same scan, so a disagreement means they
  were built from different releases or builder versions.
  """
  return [f"row {t.row}: {t.source} product {pid!r} "
          + ("has images by fashionmv/triplets but is absent from fashionmv/products"
             if has else "has no images by fashionmv/triplets but is in "
                         "fashionmv/products")
          for pid, has in ((t.source_id, t.source_has_images),
                           (t.target_id, t.target_has_images))
          if has != ((t.source, pid) in products)]


def _mismatch_error(products: Products, triplets: Triplets,
                   mismatches: Sequence[str]) -> ValueError:
  shown = "; ".join(mismatches[:3])
  return ValueError(
      f"fashionmv/triplets {triplets.split} and fashionmv/products {products.split} "
      f"disagree about which products have images ({shown}; {len(mismatches)} in "
      f"all): the two configs were built from different releases or builder "
      f"versions. Rebuild both from the same release: tfds build fashionmv "
      f"--imports=tfds_fashionmv --manual_dir=<release> --data_dir=<data_dir> "
      f"--overwrite")


class JoinedTriplets:
  """Triplets with their source and target products: a grain random-access source.

  Holds the usable rows (both products have images); `unusable` counts the rows of
  the selected sources left out because a product has none.
  """

  def __init__(self, products: Products, triplets: Triplets,
               sources: Sequence[str] | None = None):
    self.products, self.triplets = products, triplets
    keep, mismatches, self.unusable = [], [], 0
    for i in range(len(triplets)):
      t = triplets[i]
      if sources is not None and t.source not in sources:
        continue
      mismatches.extend(_image_flag_mismatches(products, t))
      if t.usable:
        keep.append(i)
      else:
        self.unusable += 1
    if mismatches:
      raise _mismatch_error(products, triplets, mismatches)
    if self.unusable:
      logging.warning(
          "%d of %d %s triplets%s name a product without images and are left out "
          "(the build report lists them under triplets_unusable).", self.unusable,
          self.unusable + len(keep), triplets.split,
          f" of {', '.join(sources)}" if sources is not None else "")
    self._rows = np.asarray(keep, np.int64)

  def __len__(self) -> int:
    return len(self._rows)

  def __repr__(self) -> str:
    return f"JoinedTriplets({self.triplets!r}, {len(self)})"

  def __getitem__(self, index: int) -> JoinedTriplet:
    t = self.triplets[int(self._rows[index])]
    return JoinedTriplet(t, self.products.get((t.source, t.source_id)),
                         self.products.get((t.source, t.target_id)))
