"""Which record of a products dataset holds each product, read once for all
processes and kept on disk for reruns.

Indexing a catalogue by (source, product_id) means reading every record, images
included (a record is read whole). Each process reading all of them would read the
catalogue once per host before embedding a product. Here the records are cut into
blocks of `block_records`; each process reads its blocks (round robin), writes their
keys to `<directory>/keys-NNNNN-of-MMMMM.jsonl`, and after a barrier every process
reads every block's keys. A block file is written atomically and names the dataset
it was read from (its `dataset_info.json` digest), so a rerun, with any number of
processes, reads only the blocks that are missing or were read from another build.

Block file: a header line {"dataset", "split", "info_sha256", "start", "stop"},
then one JSON [source, product_id] per record, in record order.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import logging
import jax
from jax.experimental import multihost_utils

from procir_jax import files
from procir_jax import progress as progress_lib
from procir_jax.data import fashionmv



class ProductKeysError(RuntimeError):
  """A key block is missing or unreadable after every process has read its own."""


def block_name(number: int, count: int) -> str:
  return f"keys-{number:05d}-of-{count:05d}.jsonl"


def _header(raw, start: int, stop: int) -> dict:
  return dict(dataset=raw.name, split=raw.split, info_sha256=raw.info_sha256,
              start=start, stop=stop)


def _read_block(path: pathlib.Path, header: dict) -> list[fashionmv.ProductKey] | None:
  """The block's keys, or None when it is absent or was read from other records."""
  try:
    with open(path, encoding="utf-8") as f:
      if json.loads(f.readline()) != header:
        return None
      keys = [tuple(json.loads(line)) for line in f]
  except (OSError, ValueError):
    return None
  return keys if len(keys) == header["stop"] - header["start"] else None


def shared_scan(raw, directory: str | os.PathLike,
                block_records: int) -> list[fashionmv.ProductKey]:
  """Every record's key, in record order; `raw` is a `fashionmv` raw source.

  Every process of the run calls this with the same arguments; `directory` must be
  on a filesystem they all see (as the workdir is).
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  count = len(raw)
  blocks = [(start, min(start + block_records, count))
            for start in range(0, count, block_records)]
  paths = [directory / block_name(n, len(blocks)) for n in range(len(blocks))]
  process, processes = jax.process_index(), jax.process_count()
  mine = [n for n in range(process, len(blocks), processes)
          if _read_block(paths[n], _header(raw, *blocks[n])) is None]
  progress = progress_lib.Progress(
      f"Reading the product keys of {raw.name} {raw.split}", "records",
      sum(blocks[n][1] - blocks[n][0] for n in mine))
  for n in mine:
    start, stop = blocks[n]
    lines = [json.dumps(_header(raw, start, stop))]
    lines += [json.dumps(list(key)) for key in raw.keys(start, stop)]
    files.write_atomically(paths[n], lambda f: f.write(
        ("\n".join(lines) + "\n").encode()))
    progress.done += stop - start
    progress.log(f"; wrote {paths[n].name}", force=True)
  if len(blocks) > len(mine) and process == 0:
    logging.info("Product keys of %s %s: %d of %d blocks read by this process, the "
                 "rest by other processes or an earlier run (%s).", raw.name,
                 raw.split, len(mine), len(blocks), directory)
  if processes > 1:
    multihost_utils.sync_global_devices(f"product_keys_{directory.name}")
  keys = []
  for n, path in enumerate(paths):
    block = _read_block(path, _header(raw, *blocks[n]))
    if block is None:
      raise ProductKeysError(
          f"{path} is missing or does not hold the keys of records "
          f"{blocks[n][0]}-{blocks[n][1]} of {raw.name} {raw.split} after every "
          f"process read its blocks. A process may have stopped (see its log); "
          f"rerun to read the missing blocks.")
    keys += block
  return keys
