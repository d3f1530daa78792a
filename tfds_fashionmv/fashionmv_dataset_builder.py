"""FashionMV: multi-view products and composed image retrieval triplets, for TFDS."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import writer as writer_lib

from tfds_fashionmv import release

_TFRECORD = file_adapters.FileFormat.TFRECORD
_ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD
_REBUILD_COMMAND = ("tfds build fashionmv --imports=tfds_fashionmv "
                    "--manual_dir=<release> --data_dir=<data_dir>")

# The description and citation live in README.md and CITATIONS.bib beside this
# file, where TFDS reads them.

_MANUAL_DOWNLOAD_INSTRUCTIONS = """
FashionMV cannot be downloaded automatically. Put the release in one directory and pass
it as `--manual_dir` (or `tfds.download.DownloadConfig(manual_dir=...)`):

  <manual_dir>/data/train_triplets.jsonl     from the FashionMV release
  <manual_dir>/data/val_triplets.jsonl
  <manual_dir>/data/train_captions.jsonl
  <manual_dir>/data/val_captions.jsonl
  <manual_dir>/images/deepfashion/<product_id>/*.jpg     DeepFashion In-shop images
  <manual_dir>/images/f200k/<product_id>/*.jpeg          Fashion200K images
  <manual_dir>/images/fashiongen_val/<product_id>/*.jpg  FashionGen validation products
  <manual_dir>/images/fashiongen_train/<product_id>/*.jpg  FashionGen training products

Product ids may contain slashes (e.g. WOMEN/Dresses/id_00004544/02): they are folder
paths. FashionGen ships images inside h5 files: extract them with
`python tools/prepare_fashiongen.py --h5=fashiongen_256_256_validation.h5
--out_dir=<manual_dir>/images/fashiongen_val` (and the same for the training file).
"""


@dataclasses.dataclass(eq=False)
class FashionMVConfig(tfds.core.BuilderConfig):
  """`kind` is `products` or `triplets`; `max_views` caps the views per product."""

  kind: str = "products"
  max_views: int = release.DEFAULT_MAX_VIEWS


def _text_pairs() -> tfds.features.Sequence:
  return tfds.features.Sequence({"name": tfds.features.Text(),
                                 "text": tfds.features.Text()})


class Builder(tfds.core.GeneratorBasedBuilder):
  """FashionMV products and triplets from a local copy of the release."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: products and triplets configs.",
      "1.1.0": "triplets keeps every row of the release and flags each product with "
               "`source_has_images` / `target_has_images`: the evaluation gallery "
               "holds the products of rows whose partner has no images. The build "
               "report's `triplets_dropped` becomes `triplets_unusable`.",
      "1.2.0": "Each split is stored twice from one build: TFRecord (primary, read by "
               "tf.data: tfds.load, as_dataset) and ArrayRecord (alternative file "
               "format, read by tfds.data_source and grain). Examples and features "
               "are unchanged.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      FashionMVConfig(name="products", kind="products",
                      description="One example per product: views and captions."),
      FashionMVConfig(name="triplets", kind="triplets",
                      description="One example per CIR triplet: ids, texts and "
                                  "whether each product has images."),
  ]
  DEFAULT_CONFIG_NAME = "products"

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    # tfds 4.9.10's DatasetInfo.read_from_directory restores dataset_info.json's
    # alternative_file_formats into the proto but not into the list that
    # available_file_formats() reads, so as_data_source (tfds.data_source) would not
    # see the array_record copy of a prepared dataset; copy them over. (TFDS's
    # ReadOnlyBuilder, builder_from_directory, reads them from the proto itself.)
    restored = self.info.alternative_file_formats
    for value in self.info.as_proto.alternative_file_formats:
      file_format = file_adapters.FileFormat.from_value(value)
      if file_format not in restored:
        restored.append(file_format)
    # A default build will write both (see _example_writer): say so before it runs,
    # so that tfds.data_source on a dataset not built yet says that, rather than
    # that tfrecord has no random access.
    if (not self.is_prepared() and self.info.file_format == _TFRECORD
        and _ARRAY_RECORD not in restored):
      self.info.add_alternative_file_format(_ARRAY_RECORD)
    # Whether the stored splits have a TFRecord copy for tf.data. Kept apart from
    # info.file_format, which as_data_source switches to array_record in place.
    self._has_tfrecord = _TFRECORD in self.info.available_file_formats()

  def _example_writer(self) -> writer_lib.ExampleWriter:
    """Writes every shard twice, as TFRecord and as ArrayRecord, from one serialisation.

    TFRecord (the primary format) is what tf.data reads: `tfds.load`, `as_dataset`.
    ArrayRecord, recorded in dataset_info.json as an alternative file format, is what
    `tfds.data_source` and grain pick for random access by index. Both come from
    TFDS's own `MultiOutputExampleWriter`, so examples are encoded and shuffled once
    and the two copies hold the same records in the same order (the second copy of a
    shard is written from memory, so a build holds up to one shard, at most 1 GiB,
    more). A build asked for one other format (`file_format=` or
    `tfds build --file_format=`) writes only that one.
    """
    self._has_tfrecord = self.info.file_format == _TFRECORD
    alternatives = self.info.alternative_file_formats
    if not self._has_tfrecord:
      if _ARRAY_RECORD in alternatives:  # declared in __init__; not written now
        alternatives.remove(_ARRAY_RECORD)
        self.info.as_proto.alternative_file_formats.remove(_ARRAY_RECORD.value)
      return super()._example_writer()
    if _ARRAY_RECORD not in alternatives:
      self.info.add_alternative_file_format(_ARRAY_RECORD)
    return writer_lib.MultiOutputExampleWriter([
        writer_lib.ExampleWriter(file_format=_TFRECORD),
        writer_lib.ExampleWriter(file_format=_ARRAY_RECORD)])

  def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """tf.data over the TFRecord copy, with a clear error when a build lacks one.

    `as_data_source` switches this builder's info to ArrayRecord (TFDS picks a random
    access format that way); a later `as_dataset` on the same builder switches it back
    here, as both copies hold the same records.
    """
    tf_data_formats = file_adapters.FileFormat.with_tf_data()
    requested = read_config.file_format if read_config else None
    current = self.info.file_format or _TFRECORD
    if not requested and current not in tf_data_formats:
      stored = self.info.available_file_formats()
      if self._has_tfrecord:
        self.info.set_file_format(_TFRECORD, override=True,
                                  override_if_initialized=True)
      elif not stored & tf_data_formats:
        raise NotImplementedError(
            f"{self.info.full_name} in {self.data_dir} is stored only as "
            f"{sorted(f.value for f in stored)} (built with that file_format), which "
            f"tf.data (tfds.load, as_dataset) cannot read. Read it by index with "
            f"tfds.data_source(...), or rebuild it without --file_format, which writes "
            f"tfrecord beside array_record: "
            f"{_REBUILD_COMMAND.replace('<data_dir>', str(self.data_dir_root))}")
    return super()._as_dataset(split=split, decoders=decoders,
                               read_config=read_config, shuffle_files=shuffle_files)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.kind == "products":
      features = {
          "product_id": tfds.features.Text(),
          "source": tfds.features.Text(),  # deepfashion | f200k | fashiongen
          "views": tfds.features.Sequence(
              tfds.features.Image(shape=(None, None, 3))),
          "num_views": tfds.features.Scalar(dtype=np.int32),
          "caption_long": tfds.features.Text(),
          "caption_short": tfds.features.Text(),
          "view_captions": tfds.features.Sequence(tfds.features.Text()),
          "extra_texts": _text_pairs(),
      }
    else:
      features = {
          "source_id": tfds.features.Text(),
          "target_id": tfds.features.Text(),
          "source": tfds.features.Text(),
          "modification_text_short": tfds.features.Text(),
          "modification_text_long": tfds.features.Text(),
          "extra_texts": _text_pairs(),
          "row": tfds.features.Scalar(dtype=np.int32),
          # False when the product has no readable image (it is then absent from
          # the products config): such a row is no query or training example, but
          # its other product still belongs to the evaluation gallery.
          "source_has_images": tfds.features.Scalar(dtype=np.bool_),
          "target_has_images": tfds.features.Scalar(dtype=np.bool_),
      }
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage="https://arxiv.org/abs/2604.10297",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = epath.Path(dl_manager.manual_dir)
    except AssertionError as e:  # no manual dir: say so about earlier builds too
      raise AssertionError(f"{e}{self._earlier_builds_note()}") from e
    missing = [f for files in release.SPLIT_FILES.values() for f in files
               if not (manual_dir / f).exists()]
    if missing:
      raise FileNotFoundError(
          f"FashionMV manual dir {manual_dir} lacks {missing}. Download the release "
          f"annotations and lay them out as follows:\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if not (manual_dir / "images").is_dir():
      raise FileNotFoundError(
          f"FashionMV manual dir {manual_dir} has no images/ folder. Download the "
          f"images as follows:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {split: self._generate_examples(manual_dir, split)
            for split in release.SPLIT_FILES}

  def _earlier_builds_note(self) -> str:
    """Names earlier versions built beside this one, e.g. a 1.1.0 left by older code."""
    config_dir = epath.Path(self.data_dir_root) / self.name / self.builder_config.name
    try:
      earlier = sorted(d.name for d in config_dir.iterdir()
                       if d.name != str(self.version)
                       and (d / "dataset_info.json").exists())
    except OSError:
      return ""
    if not earlier:
      return ""
    return (f"\n\n{config_dir} holds {earlier} but not {self.version}. Builds before "
            f"1.2.0 are array_record only: tfds.data_source reads them (name the "
            f"version, e.g. '{self.name}/{self.builder_config.name}:{earlier[-1]}'), "
            f"tf.data (tfds.load, as_dataset) does not. Build {self.version}, which "
            f"writes tfrecord for tf.data and array_record for random access: "
            f"{_REBUILD_COMMAND.replace('<data_dir>', str(self.data_dir_root))}")

  def _generate_examples(self, manual_dir: epath.Path, split: str):
    triplets_file, captions_file = release.SPLIT_FILES[split]
    triplets = release.read_triplets(manual_dir / triplets_file)
    captions, duplicate_caption_rows = release.read_captions(
        manual_dir / captions_file)
    # Every product a split mentions, in a deterministic order.
    products = sorted(set(captions)
                      | {(t.source, t.source_id) for t in triplets}
                      | {(t.source, t.target_id) for t in triplets})
    report: dict[str, Any] = {"max_views": self.builder_config.max_views,
                              "duplicate_caption_rows": duplicate_caption_rows}
    self.info.metadata.setdefault("build_report", {})[split] = report
    if self.builder_config.kind == "products":
      yield from self._products(manual_dir, split, products, captions, report)
    else:
      yield from self._triplets(manual_dir, split, products, triplets, report)
    _log_report(self.builder_config.name, split, report)

  def _scan(self, manual_dir, split, products, report, full: bool
            ) -> Iterator[tuple[tuple[str, str], release.ProductViews]]:
    """Scans product folders, records those without a readable image, yields the others.

    A full scan reads up to `max_views` views and reports corrupt files; otherwise one
    readable view is enough to know that a product has images.
    """
    max_views = self.builder_config.max_views if full else 1
    no_folder, unreadable, corrupt, beyond_cap = [], [], [], 0
    report.update(products_dropped_no_folder=no_folder,
                  products_dropped_no_readable_image=unreadable)
    if full:
      report["corrupt_image_files"] = corrupt
    folders = [(release.image_folder(source, split), product_id)
               for source, product_id in products]
    scans = release.scan_products(manual_dir / "images", folders, max_views)
    for product, (folder, _), scan in zip(products, folders, scans):
      corrupt.extend(scan.corrupt_files)
      beyond_cap += scan.files_beyond_cap
      if not scan.views:
        (unreadable if scan.folder_exists else no_folder).append(
            f"{folder}/{product[1]}")
        continue
      yield product, scan
    if full:
      report["files_beyond_view_cap"] = beyond_cap

  def _products(self, manual_dir, split, products, captions, report):
    kept = 0
    for (source, product_id), scan in self._scan(
        manual_dir, split, products, report, full=True):
      caption = captions.get((source, product_id), release.Captions())
      kept += 1
      yield f"{source}/{product_id}", {
          "product_id": product_id,
          "source": source,
          "views": scan.views,
          "num_views": len(scan.views),
          "caption_long": caption.long,
          "caption_short": caption.short,
          "view_captions": list(caption.per_view),
          "extra_texts": [{"name": k, "text": v} for k, v in caption.extra_texts],
      }
    report["products"] = kept

  def _triplets(self, manual_dir, split, products, triplets, report):
    with_images = {product for product, _ in self._scan(
        manual_dir, split, products, report, full=False)}
    # Every row is kept, as the release's evaluation reads them all to build its
    # gallery; rows with an imageless product are listed here because they can be
    # neither queries nor training examples.
    unusable = []
    report["triplets_unusable"] = unusable
    for t in triplets:
      has_images = [(t.source, pid) in with_images
                    for pid in (t.source_id, t.target_id)]
      if not all(has_images):
        unusable.append({
            "row": t.row, "source_id": t.source_id, "target_id": t.target_id,
            "products_without_images": [
                pid for pid, has in zip((t.source_id, t.target_id), has_images)
                if not has]})
      yield f"{split}/{t.row:09d}", {
          "source_id": t.source_id,
          "target_id": t.target_id,
          "source": t.source,
          "modification_text_short": t.modification_text_short,
          "modification_text_long": t.modification_text_long,
          "extra_texts": [{"name": k, "text": v} for k, v in t.extra_texts],
          "row": t.row,
          "source_has_images": has_images[0],
          "target_has_images": has_images[1],
      }
    report["triplets"] = len(triplets)
    report["triplets_usable"] = len(triplets) - len(unusable)


def _log_report(config: str, split: str, report: dict[str, Any]) -> None:
  """One summary line per split, with the counts of everything dropped or unusable."""
  counts = {k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}
  logging.info("fashionmv/%s %s build report: %s", config, split, counts)
  if any(counts.get(k) for k in ("products_dropped_no_folder",
                                 "products_dropped_no_readable_image",
                                 "corrupt_image_files")):
    logging.warning(
        "fashionmv/%s %s: some products have no readable image or some image files "
        "are corrupt; the full lists are in the dataset's metadata.json under "
        "build_report.%s.", config, split, split)
  if counts.get("triplets_unusable"):
    logging.warning(
        "fashionmv/%s %s: %d triplets name a product without images; they are kept "
        "(flagged by source_has_images/target_has_images) for the evaluation "
        "gallery but are no queries or training examples. The list is in the "
        "dataset's metadata.json under build_report.%s.triplets_unusable.",
        config, split, counts["triplets_unusable"], split)
