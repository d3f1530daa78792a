"""Product keys read in blocks shared by the processes and kept for reruns."""

import json
import os

import jax
from jax.experimental import multihost_utils
import pytest

from procir_jax.data import fashionmv, product_keys


@pytest.fixture
def as_process(monkeypatch):
  """Makes this process act as process `index` of `count` (the barrier passes)."""
  def act(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  return act


def _raw(data_dir):
  return fashionmv._RawSource("fashionmv/products", "validation", str(data_dir))


def _mtimes(directory):
  return {p.name: os.stat(p).st_mtime_ns for p in sorted(directory.glob("keys-*"))}


def test_keys_read_alone_match_the_full_records(fashionmv_data_dir):
  raw = _raw(fashionmv_data_dir)
  keys = raw.keys(0, len(raw))
  assert len(keys) == len(raw) > 40  # three blocks of 20 below
  assert keys == [(r["source"].decode(), r["product_id"].decode())
                  for r in (raw[i] for i in range(len(raw)))]
  assert raw.keys(3, 7) == keys[3:7]


def test_blocks_are_shared_by_processes_and_kept(fashionmv_data_dir, tmp_path,
                                                 as_process):
  raw = _raw(fashionmv_data_dir)
  expected = raw.keys(0, len(raw))
  directory = tmp_path / "keys"
  blocks = -(-len(raw) // 20)
  names = [product_keys.block_name(n, blocks) for n in range(blocks)]

  # Process 1 of 2 reads only the odd blocks; the even ones are process 0's.
  as_process(1, 2)
  with pytest.raises(product_keys.ProductKeysError,
                     match=f"{names[0]} is missing .* records 0-20 .* rerun"):
    product_keys.shared_scan(raw, directory, block_records=20)
  assert sorted(p.name for p in directory.iterdir()) == names[1::2]
  as_process(0, 2)
  assert product_keys.shared_scan(raw, directory, block_records=20) == expected
  assert sorted(p.name for p in directory.iterdir()) == names

  # A rerun with another process count reads no record again.
  kept = _mtimes(directory)
  as_process(0, 1)
  assert product_keys.shared_scan(raw, directory, block_records=20) == expected
  assert _mtimes(directory) == kept

  # A block cut short, or read from another build of the dataset, is read again.
  first, second = directory / names[0], directory / names[1]
  first.write_text("\n".join(first.read_text().splitlines()[:-1]) + "\n")
  head, *rows = second.read_text().splitlines()
  second.write_text("\n".join([json.dumps({**json.loads(head),
                                           "info_sha256": "another"}), *rows]))
  assert product_keys.shared_scan(raw, directory, block_records=20) == expected
  changed = {n for n, t in _mtimes(directory).items() if kept[n] != t}
  assert changed == {names[0], names[1]}


def test_products_indexed_from_given_keys(fashionmv_data_dir, tmp_path):
  default = fashionmv.Products(str(fashionmv_data_dir), "validation")
  shared = fashionmv.Products(
      str(fashionmv_data_dir), "validation", keys=lambda raw:
      product_keys.shared_scan(raw, tmp_path, block_records=1000))
  assert shared.keys() == default.keys()
  key = default.keys()[5]
  assert shared.get(key) == default.get(key)

  with pytest.raises(ValueError, match=r"holds product .* twice \(records 0 and 1\)"):
    fashionmv.Products(str(fashionmv_data_dir), "validation",
                       keys=lambda raw: [("a", "b")] * len(raw))
  with pytest.raises(ValueError, match="3 keys for the"):
    fashionmv.Products(str(fashionmv_data_dir), "validation",
                       keys=lambda raw: [("a", "b")] * 3)
