"""The fashionmv TFDS builder on dummy_data/, a tiny copy of the release layout.

dummy_data/ holds: a DeepFashion product id with slashes and 7 views (capped at 5, one
an RGBA PNG), a product whose second view is a truncated JPEG, a product whose only
image is corrupt (dropped), grayscale views, both FashionGen folders, and triplets
that point at a missing product and at the dropped one.
"""

import json
import pathlib
import shutil
import subprocess
import sys

from etils import epath
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfds_fashionmv
from tfds_fashionmv import fashionmv_dataset_builder

DUMMY = epath.Path(fashionmv_dataset_builder.__file__).parent / "dummy_data"


def _as_numpy(value):
  """A feature value as one comparable array: lists of views stack, bytes stay bytes."""
  if isinstance(value, (list, tuple)) and not value:
    return np.asarray(value, dtype=object)
  return np.asarray(value)


def _assert_same_example(from_tf_data, from_data_source, where, views_atol=0):
  assert sorted(from_tf_data) == sorted(from_data_source), where
  for name, value in from_tf_data.items():
    other = from_data_source[name]
    if isinstance(value, dict):  # extra_texts: {"name": [...], "text": [...]}
      _assert_same_example(value, other, f"{where}.{name}")
      continue
    a, b = _as_numpy(value), _as_numpy(other)
    assert a.shape == b.shape, (where, name, a.shape, b.shape)
    if name == "views" and views_atol:
      np.testing.assert_allclose(a.astype(int), b.astype(int), rtol=0,
                                 atol=views_atol, err_msg=f"{where}.{name}")
    else:
      np.testing.assert_array_equal(a, b, err_msg=f"{where}.{name}")


@tfds.decode.make_decoder()
def _decode_jpeg_accurate(serialized, feature):
  """JPEG with the accurate integer IDCT that OpenCV and PIL use (PNG decodes too)."""
  del feature
  return tf.io.decode_jpeg(serialized, channels=3, dct_method="INTEGER_ACCURATE")


def assert_tf_data_equals_data_source(name, data_dir, key, splits):
  """tfds.load (tf.data over TFRecord) and tfds.data_source (ArrayRecord) read the
  same build: same counts, the same examples in the same order, equal features.

  TF decodes JPEG with its fast integer IDCT by default, OpenCV/PIL (data_source)
  with the accurate one: default views differ by a few grey levels, views decoded
  with the accurate IDCT are equal.
  """
  has_views = "views" in tfds.builder(name, data_dir=data_dir).info.features
  for split, count in splits.items():
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    via_data_source = [source[i] for i in range(len(source))]
    variants = [(None, 0)]
    if has_views:  # default decoding on one split: its cost is in CI time
      variants = [({"views": _decode_jpeg_accurate()}, 0)]
      variants += [(None, 4)] if split == "train" else []
    for decoders, views_atol in variants:
      via_tf_data = list(tfds.as_numpy(tfds.load(
          name, split=split, data_dir=data_dir, download=False, decoders=decoders)))
      assert len(via_tf_data) == len(via_data_source) == count, split
      assert ([ex[key] for ex in via_tf_data]
              == [ex[key] for ex in via_data_source]), split
      for a, b in zip(via_tf_data, via_data_source):
        _assert_same_example(a, b, f"{name} {split} {a[key]!r}", views_atol)


class _BothFormats:
  """TFDS's conformance checks (they read through tf.data, `as_dataset`), then the
  same build read both ways: tf.data and random access."""

  DATASET_CLASS = fashionmv_dataset_builder.Builder
  KEY = ""

  def _download_and_prepare_as_dataset(self, builder):
    super()._download_and_prepare_as_dataset(builder)
    info = builder.info
    assert info.file_format.value == "tfrecord"
    assert [f.value for f in info.alternative_file_formats] == ["array_record"]
    with self._subTest("tf_data_equals_data_source"):
      assert_tf_data_equals_data_source(
          f"fashionmv/{builder.builder_config.name}", self.tmp_dir, self.KEY,
          self.SPLITS)
    if "views" in info.features:
      return  # the rest is the same code for either config; the cheaper one runs it
    with self._subTest("one_builder_both_ways"):
      # as_data_source switches the builder's info to array_record in place; a later
      # as_dataset on the same builder must still read the TFRecord copy.
      assert len(builder.as_data_source(split="train")) == self.SPLITS["train"]
      assert len(list(builder.as_dataset(split="train"))) == self.SPLITS["train"]
    with self._subTest("from_directory"):
      # Another project, without this package: TFDS's read-only builder reads the
      # TFRecord copy with tf.data (its ArrayRecord copy: see the products test).
      assert len(list(tfds.builder_from_directory(builder.data_dir).as_dataset(
          split="validation"))) == self.SPLITS["validation"]


class FashionMVProductsTest(_BothFormats, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ["products"]
  SPLITS = {"train": 4, "validation": 5}
  KEY = "product_id"


class FashionMVTripletsTest(_BothFormats, tfds.testing.DatasetBuilderTestCase):
  BUILDER_CONFIG_NAMES_TO_TEST = ["triplets"]
  SPLITS = {"train": 4, "validation": 3}  # every row, usable or not
  KEY = "row"


def _build(tmp_path, config, manual_dir=DUMMY):
  builder = tfds.builder(f"fashionmv/{config}", data_dir=tmp_path)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _by_id(source):
  return {ex["product_id"].decode(): ex
          for ex in (source[i] for i in range(len(source)))}


def test_products_views_captions_and_drops(tmp_path):
  builder = _build(tmp_path, "products")
  # TFRecord for tf.data, ArrayRecord beside it for random access.
  assert builder.info.file_format.value == "tfrecord"
  assert [f.value for f in builder.info.alternative_file_formats] == ["array_record"]
  shards = sorted(p.name for p in epath.Path(builder.data_dir).glob("fashionmv-*"))
  assert shards == [f"fashionmv-{split}.{kind}-00000-of-00001"
                    for split in ("train", "validation")
                    for kind in ("array_record", "tfrecord")]
  train = _by_id(tfds.data_source("fashionmv/products", split="train",
                                  data_dir=tmp_path))
  assert sorted(train) == ["100001", "MEN/Shirts/id_00000002/01",
                           "WOMEN/Dresses/id_00000001/01", "dresses/31000001"]
  dress = train["WOMEN/Dresses/id_00000001/01"]
  assert dress["num_views"] == 5 and len(dress["views"]) == 5
  assert all(v.shape == (24, 24, 3) and v.dtype == np.uint8 for v in dress["views"])
  assert [c.decode() for c in dress["view_captions"]] == ["front", "back"]
  assert dress["caption_short"] == b"short WOMEN/Dresses/id_00000001/01"
  shirt = train["MEN/Shirts/id_00000002/01"]
  assert shirt["num_views"] == 2  # the corrupt middle view is skipped
  assert dict(zip(shirt["extra_texts"]["name"], shirt["extra_texts"]["text"])) == {
      b"material": b"cotton shirt"}
  assert train["100001"]["source"] == b"fashiongen"
  assert train["dresses/31000001"]["caption_long"] == (
      b"A long caption of dresses/31000001.")
  val = _by_id(tfds.data_source("fashionmv/products", split="validation",
                                data_dir=tmp_path))
  assert val["WOMEN/Skirts/id_00500001/02"]["views"][1].shape == (24, 24, 3)  # was L

  report = builder.info.metadata["build_report"]
  assert report["train"]["products"] == 4
  assert report["train"]["products_dropped_no_folder"] == ["f200k/dresses/31000002"]
  assert report["train"]["products_dropped_no_readable_image"] == [
      "fashiongen_train/100002"]
  assert report["train"]["corrupt_image_files"] == [
      "deepfashion/MEN/Shirts/id_00000002/01/02_back.jpg",
      "fashiongen_train/100002/0.jpg"]
  assert report["train"]["files_beyond_view_cap"] == 2
  assert report["validation"]["products_dropped_no_folder"] == [
      "deepfashion/WOMEN/Skirts/id_00500003/02"]
  # The report is in the metadata a reader gets from disk, not only in memory.
  on_disk = json.loads((epath.Path(builder.data_dir) / "metadata.json").read_text())
  assert on_disk["build_report"] == report
  # Another project, with no fashionmv code, reads the built directory.
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert reloaded.info.metadata["build_report"]["train"]["products"] == 4
  assert len(reloaded.as_data_source(split="train")) == 4


def test_triplets_keep_every_row_and_flag_products_without_images(tmp_path):
  builder = _build(tmp_path, "triplets")
  train = tfds.data_source("fashionmv/triplets", split="train", data_dir=tmp_path)
  rows = {int(train[i]["row"]): train[i] for i in range(len(train))}
  assert sorted(rows) == [1, 2, 3, 4]
  flags = {r: (bool(ex["source_has_images"]), bool(ex["target_has_images"]))
           for r, ex in rows.items()}
  # Row 2's target has no folder, row 3's only image is corrupt.
  assert flags == {1: (True, True), 2: (True, False), 3: (True, False),
                   4: (True, True)}
  assert rows[4]["target_id"] == b"WOMEN/Dresses/id_00000001/01"
  assert rows[4]["modification_text_long"].startswith(b"Change ")
  assert dict(zip(rows[4]["extra_texts"]["name"], rows[4]["extra_texts"]["text"])) == {
      b"reasoning": b"a dress instead of a shirt"}
  report = builder.info.metadata["build_report"]
  assert (report["train"]["triplets"], report["train"]["triplets_usable"]) == (4, 2)
  assert [(d["row"], d["products_without_images"])
          for d in report["train"]["triplets_unusable"]] == [
              (2, ["dresses/31000002"]), (3, ["100002"])]
  assert [d["row"] for d in report["validation"]["triplets_unusable"]] == [3]
  assert report["validation"]["triplets_usable"] == 2


def test_array_record_only_builds_say_to_rebuild_for_tf_data(tmp_path):
  # A build asked for array_record alone: random access works, tf.data says what to do.
  builder = tfds.builder("fashionmv/triplets", data_dir=tmp_path,
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=DUMMY))
  assert builder.info.alternative_file_formats == []
  assert len(tfds.data_source("fashionmv/triplets", split="train",
                              data_dir=tmp_path)) == 4
  with pytest.raises(NotImplementedError,
                     match=r"stored only as \['array_record'\].*tfds\.data_source.*"
                           r"tfds build fashionmv --imports=tfds_fashionmv"):
    tfds.load("fashionmv/triplets", split="train", data_dir=tmp_path)

  # The same files as a 1.1.0 build (array_record was all that version wrote): asking
  # for the current version names the old one and the command that builds the new.
  old = tmp_path / "fashionmv" / "triplets" / "1.1.0"
  shutil.move(builder.data_dir, old)
  info = json.loads((old / "dataset_info.json").read_text())
  (old / "dataset_info.json").write_text(json.dumps({**info, "version": "1.1.0"}))
  with pytest.raises(AssertionError) as error:
    tfds.load("fashionmv/triplets", split="train", data_dir=tmp_path)
  message = str(error.value)
  assert "holds ['1.1.0'] but not 1.2.0" in message
  assert f"tfds build fashionmv --imports=tfds_fashionmv --manual_dir=<release> " \
         f"--data_dir={tmp_path}" in message
  # What that message says still reads the old build works.
  assert len(tfds.data_source("fashionmv/triplets:1.1.0", split="train",
                              data_dir=tmp_path)) == 4


def test_missing_manual_dir_says_what_to_download(tmp_path):
  with pytest.raises(AssertionError, match="data/train_triplets.jsonl"):
    _build(tmp_path / "data", "products", manual_dir=tmp_path / "nowhere")


def test_missing_annotation_file_is_named(tmp_path):
  release = tmp_path / "release"
  (release / "images").mkdir(parents=True)
  (release / "data").mkdir()
  (release / "data" / "train_triplets.jsonl").write_text("")
  with pytest.raises(FileNotFoundError) as error:
    _build(tmp_path / "data", "products", manual_dir=release)
  message = str(error.value)
  assert "data/val_triplets.jsonl" in message and "data/train_captions.jsonl" in message
  assert "images/deepfashion/<product_id>" in message  # says where things go


def test_unknown_caption_schema_names_the_keys_seen(tmp_path):
  release = tmp_path / "release"
  (release / "images" / "f200k" / "a").mkdir(parents=True)
  (release / "data").mkdir()
  for name in ("train_triplets", "val_triplets", "val_captions"):
    (release / "data" / f"{name}.jsonl").write_text("")
  (release / "data" / "train_captions.jsonl").write_text(
      json.dumps({"product_id": "a", "dataset": "f200k", "blurb": 3,
                  "text_en": ["x"]}) + "\n")
  with pytest.raises(tfds_fashionmv.ReleaseError) as error:
    _build(tmp_path / "data", "products", manual_dir=release)
  message = str(error.value)
  assert "train_captions.jsonl" in message
  assert "'blurb'" in message and "'text_en'" in message and "caption_long" in message


def test_bad_triplet_row_names_file_line_and_keys(tmp_path):
  path = tmp_path / "train_triplets.jsonl"
  path.write_text(json.dumps({"dataset": "f200k", "source_id": "a"}) + "\n")
  with pytest.raises(tfds_fashionmv.ReleaseError,
                     match=r"train_triplets.jsonl:1: .*lacks \['target_id', "):
    tfds_fashionmv.release.read_triplets(epath.Path(path))


def test_tfds_command_line_builds_both_configs(tmp_path):
  tfds_cli = pathlib.Path(sys.executable).parent / "tfds"
  result = subprocess.run(
      [str(tfds_cli), "build", "fashionmv", "--imports=tfds_fashionmv",
       f"--manual_dir={DUMMY}", f"--data_dir={tmp_path}"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(tfds.data_source("fashionmv/products", split="train",
                              data_dir=tmp_path)) == 4
  assert len(tfds.data_source("fashionmv/triplets", split="validation",
                              data_dir=tmp_path)) == 3
  assert len(list(tfds.load("fashionmv/triplets", split="validation",
                            data_dir=tmp_path, download=False))) == 3
