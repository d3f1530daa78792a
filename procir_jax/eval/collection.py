"""Sharded embedding collections: what `--config.mode=embed` writes, and their reader.

A collection is one directory:

    manifest.json                   what it holds, and what made it (see below)
    shard-00000-of-00004.npy        [rows, dim] embeddings (float32 or float16)
    shard-00000-of-00004.ids.jsonl  a header line, then that shard's ids in row order
    ...

Ids are "<source>/<product_id>" (`id.split("/", 1)` gives both back), in the order of
the sorted (source, product id) keys; shard n holds rows [n * shard_size,
(n + 1) * shard_size) of that order, whatever the number of processes that wrote it.
`manifest.json` holds the layout (count, shard size, each shard's rows and first and
last id, a hash of every id), the dimension, the storage dtype, the collection (which
dataset, split and sources) and a fingerprint of the model and config the embeddings
come from.

Writing (`write_collection`): every process of a run encodes the shards given to it
(round robin over the shards not yet written) and writes them itself; no process
receives another's embeddings. A shard is written to temporary files and renamed into
place, its ids file last, so a shard is either complete or absent: a rerun skips the
complete shards (never encoding them again) and redoes the others, with any number of
processes. A rerun whose model, config or product list differs from the manifest's is
refused, naming the differences.

Reading (`open_collection`) uses NumPy alone (no model, no devices) and memory-maps
the shards.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from procir_jax import progress as progress_lib

FORMAT = "procir-embedding-collection/1"
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")
IDS_SUFFIX = ".ids.jsonl"
_TMP = ".tmp"


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}"


def product_id(key: tuple[str, str]) -> str:
  """The collection id of a (source, product id) key: "<source>/<product_id>"."""
  return f"{key[0]}/{key[1]}"


def _canonical(value: Any) -> str:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _differences(ours: Any, theirs: Any, prefix: str = "") -> list[str]:
  """"key: old -> new" for each leaf that differs (dicts compared key by key)."""
  if isinstance(ours, dict) and isinstance(theirs, dict):
    out = []
    for key in sorted(set(ours) | set(theirs)):
      name = f"{prefix}.{key}" if prefix else str(key)
      if key not in theirs:
        out.append(f"{name}: {_short(ours[key])} -> (absent)")
      elif key not in ours:
        out.append(f"{name}: (absent) -> {_short(theirs[key])}")
      else:
        out.extend(_differences(ours[key], theirs[key], name))
    return out
  if _canonical(ours) != _canonical(theirs):
    return [f"{prefix or 'value'}: {_short(ours)} -> {_short(theirs)}"]
  return []


def _short(value: Any) -> str:
  text = _canonical(value)
  return text if len(text) <= 120 else text[:117] + "..."


# --- reading ------------------------------------------------------------------------


class CollectionError(ValueError):
  """A collection that is incomplete, damaged or not the one expected."""


@dataclasses.dataclass(frozen=True)
class _Shard:
  name: str
  planned: int  # rows planned: embedded plus skipped
  rows: int  # rows embedded (the .npy file's)
  skipped: tuple[dict[str, str], ...]  # planned rows left out as bad examples


class Collection:
  """A whole sharded collection as one object (see `open_collection`).

  Attributes:
    directory: the collection's directory.
    manifest: manifest.json, as a dict.
    dim: the embedding dimension.
    dtype: the storage dtype (numpy float32 or float16).
    fingerprint: the model and config the embeddings come from (a dict).
    num_shards: how many shard files hold the embeddings.
  """

  def __init__(self, directory: pathlib.Path, manifest: dict, shards: list[_Shard]):
    self.directory = directory
    self.manifest = manifest
    self.dim = int(manifest["dim"])
    self.dtype = np.dtype(manifest["dtype"])
    self.fingerprint = manifest["fingerprint"]
    self.num_shards = len(shards)
    self._shards = shards
    self._ids: list[list[str] | None] = [None] * len(shards)

  def __len__(self) -> int:
    return sum(s.rows for s in self._shards)

  def __repr__(self) -> str:
    return (f"Collection({str(self.directory)!r}, {len(self)} x {self.dim} "
            f"{self.dtype.name}, {self.num_shards} shards)")

  @functools.cached_property
  def ids(self) -> list[str]:
    """Every id, in row order (that of `load()` and of `iter_shards()`)."""
    return [i for n in range(self.num_shards) for i in self._shard_ids(n)]

  @property
  def skipped(self) -> list[dict[str, str]]:
    """Products left out as bad examples ({"id", "error"}; data.skip_bad_examples)."""
    return [s for shard in self._shards for s in shard.skipped]

  def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, embeddings) per shard, in order; the embeddings are read-only memory
    maps of the shard files, so only what is touched is read."""
    for n in range(self.num_shards):
      yield self._shard_ids(n), self._embeddings(n)

  def iter_blocks(self, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 embeddings) in blocks of `rows` rows (the last may be shorter),
    across shard boundaries: what an index built in parts of a chosen size reads,
    holding one block in memory at a time."""
    if rows < 1:
      raise ValueError(f"Blocks of {rows} rows: give at least 1.")
    ids, parts, held = [], [], 0
    for shard_ids, emb in self.iter_shards():
      start = 0
      while start < len(shard_ids):
        take = min(rows - held, len(shard_ids) - start)
        ids += shard_ids[start:start + take]
        parts.append(np.asarray(emb[start:start + take], np.float32))
        held, start = held + take, start + take
        if held == rows:
          yield ids, _joined(parts)
          ids, held = [], 0
    if held:
      yield ids, _joined(parts)

  def rows(self, indices) -> np.ndarray:
    """float32 [len(indices), dim]: the rows at these positions (in `ids` order),
    read from the memory-mapped shards (only their pages are touched), in the
    order given."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"rows {indices.min()} to {indices.max()} asked of a "
                       f"collection of {len(self)} rows ({self.directory})")
    out = np.empty((len(indices), self.dim), np.float32)
    start = 0
    for n in range(self.num_shards):
      stop = start + self._shards[n].rows
      inside = np.flatnonzero((indices >= start) & (indices < stop))
      if len(inside):
        out[inside] = self._embeddings(n)[np.sort(indices[inside]) - start][
            np.argsort(np.argsort(indices[inside]))]
      start = stop
    return out

  def load(self) -> np.ndarray:
    """Every embedding as one [len, dim] array in memory, in `ids` order."""
    out = np.empty((len(self), self.dim), self.dtype)
    row = 0
    for _, emb in self.iter_shards():
      out[row:row + len(emb)] = emb
      row += len(emb)
    return out

  def _path(self, n: int, suffix: str) -> pathlib.Path:
    return self.directory / (self._shards[n].name + suffix)

  def _embeddings(self, n: int) -> np.ndarray:
    return np.load(self._path(n, ".npy"), mmap_mode="r", allow_pickle=False)

  def _shard_ids(self, n: int) -> list[str]:
    if self._ids[n] is None:
      shard = self._shards[n]
      path = self._path(n, IDS_SUFFIX)
      with open(path, encoding="utf-8") as f:
        f.readline()  # the header, read by open_collection
        ids = [json.loads(line) for line in f]
      if len(ids) != shard.rows:
        raise CollectionError(
            f"{path} lists {len(ids)} ids for the {shard.rows} rows of its .npy file: "
            f"the shard is damaged. Delete {shard.name}.* and rerun the embed mode "
            f"with the same config to write it again.")
      self._ids[n] = ids
    return self._ids[n]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
  """The parts as one array; empties the list, so that a generator yielding the
  result keeps no copy of its rows while the consumer holds them."""
  out = np.concatenate(parts)
  parts.clear()
  return out


def open_collection(directory: str | os.PathLike,
                    fingerprint: Mapping[str, Any] | None = None) -> Collection:
  """Opens a collection that `--config.mode=embed` wrote, as one object.

  Every shard is checked to be there and to belong to this manifest; the embeddings
  themselves are only read when used (memory-mapped), so a 10M x 1024 collection can
  be streamed shard by shard on a small machine.

  Example:

    from procir_jax.eval.collection import open_collection

    c = open_collection("workdir/base/embeddings/validation")
    print(len(c), c.dim, c.dtype, c.fingerprint["checkpoint"])
    for ids, emb in c.iter_shards():  # emb: read-only [rows, dim] memory map
      index.add(ids, emb)             # ids: ["deepfashion/123", ...]
    everything = c.load()             # or all of it as one array, rows in c.ids order

  Args:
    directory: the collection's directory (<workdir>/embeddings/<name>).
    fingerprint: when given, the model and config the caller expects; a collection
      made by anything else is refused, naming the differences.

  Returns:
    The `Collection`.

  Raises:
    FileNotFoundError: no manifest.json in `directory`.
    CollectionError: a shard missing, partial or from another run, or a fingerprint
      other than the one expected.
  """
  directory = pathlib.Path(directory)
  manifest_path = directory / MANIFEST
  if not manifest_path.exists():
    raise FileNotFoundError(
        f"{directory} holds no {MANIFEST}: not an embedding collection, or its embed "
        f"run stopped before starting. Write it with python -m procir_jax.main "
        f"--config=... --workdir=... --config.mode=embed.")
  manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
  if manifest.get("format") != FORMAT:
    raise CollectionError(f"{manifest_path} is format {manifest.get('format')!r}; "
                          f"this reader reads {FORMAT!r}.")
  if fingerprint is not None:
    diff = _differences(manifest["fingerprint"],
                        json.loads(_canonical(dict(fingerprint))))
    if diff:
      raise CollectionError(
          f"{directory} holds embeddings of another model or config than expected "
          f"(collection -> expected): {'; '.join(diff)}. Embed with this model and "
          f"config into a new directory, or open the one that matches.")
  digest = manifest["shards_sha256"]
  shards, missing = [], []
  for entry in manifest["layout"]["shards"]:
    name = entry["name"]
    npy, ids = directory / f"{name}.npy", directory / f"{name}{IDS_SUFFIX}"
    if not (npy.exists() and ids.exists()):
      partial = any(directory.glob(f"{name}.*{_TMP}"))
      missing.append(name + (" (partly written when its run stopped)" if partial
                             else ""))
      continue
    try:
      emb = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise CollectionError(
          f"Shard {npy} cannot be read ({e}): delete {name}.* and rerun the embed "
          f"mode with the same config to write it again.") from e
    head = _header(ids) or {}
    skipped = tuple(head.get("skipped", ()))
    problem = None
    if head.get("manifest_sha256") != digest:
      problem = ("was written for another model, config or product list than "
                 f"{MANIFEST} describes (the directory mixes two runs)")
    elif emb.ndim != 2 or emb.shape[1] != manifest["dim"] or \
        emb.dtype != np.dtype(manifest["dtype"]) or \
        emb.shape[0] + len(skipped) != entry["rows"]:
      problem = (f"holds a {emb.dtype.name} array of shape {emb.shape} and "
                 f"{len(skipped)} skipped products, not {entry['rows']} rows of "
                 f"{manifest['dim']} {manifest['dtype']} in all")
    if problem:
      raise CollectionError(
          f"Shard {name} in {directory} {problem}. Delete the directory and embed "
          f"again, or delete that shard's files and rerun the embed mode with the "
          f"config of {MANIFEST}.")
    shards.append(_Shard(name, entry["rows"], emb.shape[0], skipped))
  if missing:
    raise CollectionError(
        f"{directory} is incomplete: {len(missing)} of "
        f"{len(manifest['layout']['shards'])} shards missing: "
        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. Rerun the "
        f"embed mode with the same config (--config.mode=embed, same workdir and "
        f"embed.* settings): it writes only the missing shards.")
  return Collection(directory, manifest, shards)


# --- writing ------------------------------------------------------------------------


def plan(ids: Sequence[str], shard_size: int) -> list[dict[str, Any]]:
  """The shards of a collection of `ids` (already in collection order)."""
  if shard_size < 1:
    raise ValueError(f"config.embed.shard_size must be >= 1, got {shard_size}.")
  count = -(-len(ids) // shard_size)
  return [dict(name=shard_name(n, count), start=start,
               rows=min(shard_size, len(ids) - start), first_id=ids[start],
               last_id=ids[min(start + shard_size, len(ids)) - 1])
          for n, start in enumerate(range(0, len(ids), shard_size))]


def make_manifest(ids: Sequence[str], *, name: str, dim: int, dtype: str,
                  shard_size: int, collection: Mapping[str, Any],
                  fingerprint: Mapping[str, Any]) -> dict[str, Any]:
  """The manifest of a collection (JSON-ready)."""
  if dtype not in DTYPES:
    raise ValueError(f"config.embed.dtype must be one of {DTYPES}, got {dtype!r}.")
  manifest = json.loads(_canonical(dict(
      format=FORMAT, name=name, dim=int(dim), dtype=dtype,
      collection=dict(collection), fingerprint=dict(fingerprint),
      layout=dict(count=len(ids), shard_size=shard_size,
                  ids_sha256=_sha256("\n".join(ids)), shards=plan(ids, shard_size)))))
  # What every shard file records, so a shard from another run is recognised.
  manifest["shards_sha256"] = _sha256(_canonical(manifest))
  return manifest


class _Rounds:
  """The loader's records: each round, every process encodes one shard.

  Process p reads records [p * T, (p + 1) * T) (grain's ShardByJaxProcess), where T
  is the sum of the rounds' lengths; round k gives it rows [offset_k, offset_k +
  length_k) of that range, holding its shard of the round and then padding (None).
  Every process has the same round lengths, so all run the same global batches.
  """

  def __init__(self, records, rounds: list[list[tuple[int, int] | None]],
               lengths: list[int]):
    self._records, self._rounds = records, rounds
    self.offsets = [0]
    for length in lengths:
      self.offsets.append(self.offsets[-1] + length)
    self.per_process = self.offsets[-1]

  def __len__(self) -> int:
    return self.per_process * len(self._rounds[0]) if self._rounds else 0

  def __repr__(self) -> str:
    return f"EmbedRounds({self._records!r}, {len(self)})"

  def __getitem__(self, index: int):
    process, offset = divmod(int(index), self.per_process)
    k = bisect.bisect_right(self.offsets, offset) - 1
    span = self._rounds[k][process]
    row = offset - self.offsets[k]
    if span is None or span[0] + row >= span[1]:
      return None
    return self._records[span[0] + row]


def _write_atomically(path: pathlib.Path, write) -> None:
  tmp = path.with_name(path.name + _TMP)
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  _publish(tmp, path)


def _publish(tmp: pathlib.Path, path: pathlib.Path) -> None:
  os.replace(tmp, path)


def _header(path: pathlib.Path) -> dict | None:
  """The first line of an ids file, or None when it cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      head = json.loads(f.readline())
    return head if isinstance(head, dict) else None
  except (ValueError, OSError):
    return None


def _complete(directory: pathlib.Path, name: str, digest: str) -> bool:
  """Whether a shard is in place: its ids file (renamed last) names this manifest."""
  ids = directory / f"{name}{IDS_SUFFIX}"
  if not (ids.exists() and (directory / f"{name}.npy").exists()):
    return False
  return (_header(ids) or {}).get("manifest_sha256") == digest


def _agree(ok: bool, what: str) -> None:
  """Raises on every process when any process found a problem (else the others
  would wait for it in a collective)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32)))
  bad = [int(i) for i in np.flatnonzero(flags.reshape(-1) == 0)]
  if bad and ok:
    raise CollectionError(f"Process(es) {bad} stopped: {what} (see their log).")


def _check_existing(directory: pathlib.Path, manifest: dict) -> str | None:
  """Why the directory cannot take this collection, or None."""
  path = directory / MANIFEST
  if not path.exists():
    stray = sorted(p.name for p in directory.glob("shard-*")) if \
        directory.exists() else []
    if stray:
      return (f"{directory} holds shard files ({', '.join(stray[:3])}, ...) but no "
              f"{MANIFEST}, so nothing says what made them. Delete the directory or "
              f"embed into a new one (--config.embed.name=...).")
    return None
  try:
    existing = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    return (f"{path} cannot be read ({e}). Delete {directory} or embed into a new "
            f"directory (--config.embed.name=...).")
  ours = {k: v for k, v in manifest.items() if k != "shards_sha256"}
  theirs = {k: v for k, v in existing.items() if k != "shards_sha256"}
  diff = _differences(theirs, ours)
  if diff:
    return (f"{directory} already holds a collection of another model, config or "
            f"product list (written -> now): {'; '.join(diff[:8])}"
            f"{'; ...' if len(diff) > 8 else ''}. Embed into a new directory "
            f"(--config.embed.name=...) or delete {directory} to start again.")
  return None


def _write_shard(directory: pathlib.Path, entry: Mapping[str, Any], emb: np.ndarray,
                 ids: Sequence[str], skipped: list[dict[str, str]], *, digest: str,
                 number: int, process: int, processes: int) -> None:
  """Writes one shard: its embeddings, then its ids file, each atomically."""
  _write_atomically(directory / f"{entry['name']}.npy",
                    lambda f: np.save(f, emb, allow_pickle=False))
  text = "\n".join([json.dumps(dict(
      manifest_sha256=digest, shard=number, rows=len(ids), skipped=skipped,
      process=process, processes=processes))] + [json.dumps(i) for i in ids])
  # Renamed last: its presence marks the shard complete.
  _write_atomically(directory / f"{entry['name']}{IDS_SUFFIX}",
                    lambda f: f.write(text.encode() + b"\n"))


def _skipped(batch) -> dict[str, str]:
  """{id: error} of the bad examples a batch left out (data.skip_bad_examples): the
  rows with ids but no index, in the order of the batch's error messages."""
  meta = batch["meta"]
  rows = [ids for ids, i in zip(meta["ids"], batch["index"]) if ids and i < 0]
  return {product_id((ids["source"], ids["product_id"])): error
          for ids, error in zip(rows, meta["skipped"])}


def _plan_writing(directory: pathlib.Path, ids: Sequence[str], empty: str,
                  **manifest_fields) -> tuple[dict, str | None]:
  """The manifest of a collection about to be written, and why the directory
  cannot take it (None if it can)."""
  if not ids:
    raise ValueError(f"Nothing to write into {directory}: {empty}")
  if len(set(ids)) != len(ids):
    raise ValueError(f"The ids of {directory} are not unique.")
  manifest = make_manifest(ids, name=directory.name, **manifest_fields)
  return manifest, _check_existing(directory, manifest)


def write_collection(directory: str | os.PathLike, ids: Sequence[str], records, *,
                     encoder, params, data_cfg, dim: int, fingerprint: Mapping,
                     collection: Mapping, dtype: str = "float32",
                     shard_size: int = 10000) -> dict[str, int]:
  """Embeds `records` (a "gallery" record per id) into a sharded collection.

  Every process calls this with the same arguments (the processes of one run); each
  encodes and writes only the shards given to it. Shards already complete are kept
  as they are, and a rerun with a different number of processes finishes the rest.

  Args:
    directory: the collection's directory, on a filesystem every process sees.
    ids: the collection's ids in collection order (`product_id` of sorted keys).
    records: random access to the products, `records[i]` the product of `ids[i]`.
    encoder: an `encode.Encoder` on the run's mesh.
    params: the model parameters.
    data_cfg: the pipeline's settings (`factories.eval_data_config`).
    dim: the embedding dimension.
    fingerprint: the model and config the embeddings come from (JSON-ready dict).
    collection: what is embedded (dataset, split, sources; JSON-ready dict).
    dtype: "float32" or "float16", the storage dtype.
    shard_size: rows per shard.

  Returns:
    {"shards", "written" (shards written by this process), "kept" (complete before
    this run), "rows" (products this process encoded)}.
  """
  import jax
  from jax.experimental import multihost_utils

  from procir_jax.data import pipeline

  directory = pathlib.Path(directory)
  manifest, problem = _plan_writing(
      directory, ids, f"the collection {dict(collection)} holds no products. Check "
      "config.embed's split, sources and data_dir.", dim=dim, dtype=dtype,
      shard_size=shard_size, collection=collection, fingerprint=fingerprint)
  _agree(problem is None, f"checking {directory}")
  if problem:
    raise CollectionError(problem)
  process, processes = jax.process_index(), jax.process_count()
  if process == 0 and not (directory / MANIFEST).exists():
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1)
    _write_atomically(directory / MANIFEST, lambda f: f.write(text.encode()))
  if processes > 1:
    multihost_utils.sync_global_devices(f"embed_manifest_{directory.name}")
  shards = manifest["layout"]["shards"]
  digest = manifest["shards_sha256"]
  done = np.asarray([_complete(directory, s["name"], digest) for s in shards],
                    np.int32)
  if processes > 1:  # a shard any process sees complete is complete
    done = np.asarray(multihost_utils.process_allgather(done)).reshape(
        processes, -1).any(axis=0)
  todo = [n for n in range(len(shards)) if not done[n]]
  kept = len(shards) - len(todo)
  if kept:
    logging.info("Embedding %s: %d of %d shards are complete from an earlier run; "
                 "%d to write.", directory, kept, len(shards), len(todo))
  stats = dict(shards=len(shards), written=0, kept=kept, rows=0)
  if not todo:
    return stats

  local_batch = data_cfg.global_batch_size // processes
  rounds = [[todo[i] if i < len(todo) else None
             for i in range(k, k + processes)]
            for k in range(0, len(todo), processes)]
  lengths = [-(-max(shards[n]["rows"] for n in r if n is not None) // local_batch)
             * local_batch for r in rounds]
  source = _Rounds(records, [[None if n is None else
                              (shards[n]["start"], shards[n]["start"]
                               + shards[n]["rows"]) for n in r] for r in rounds],
                   lengths)
  loader = pipeline.make_loader("gallery", data_cfg, source, train=False)
  mine = [r[process] for r in rounds]
  progress = progress_lib.Progress(
      f"Embedding {directory.name}", "products",
      sum(shards[n]["rows"] for n in mine if n is not None))
  batches = iter(loader)
  base = process * source.per_process
  for k, n in enumerate(mine):
    entry = shards[n] if n is not None else None
    rows = entry["rows"] if entry else 0
    out = np.zeros((rows, dim), np.float32)
    filled = np.zeros(rows, bool)
    errors: dict[str, str] = {}
    for _ in range(lengths[k] // local_batch):
      batch = next(batches)
      index, emb = encoder.embed_local(params, batch)
      errors.update(_skipped(batch))
      for i, e in zip(index, emb):
        if i < 0:
          continue
        row = int(i) - base - source.offsets[k]
        if not 0 <= row < rows:
          raise AssertionError(f"Record {i} is not in round {k} of process "
                               f"{process}.")
        out[row], filled[row] = e[0], True
      progress.done += int(np.sum(index >= 0))
      progress.log()
    if entry is None:
      continue
    names = ids[entry["start"]:entry["start"] + rows]
    kept_ids = [i for i, f in zip(names, filled) if f]
    skipped = [dict(id=i, error=errors.get(i, "not encoded"))
               for i, f in zip(names, filled) if not f]
    for s in skipped:
      logging.warning("Embedding %s: left out %s: %s", directory.name, s["id"],
                      s["error"])
    _write_shard(directory, entry, out[filled].astype(dtype), kept_ids, skipped,
                 digest=digest, number=n, process=process, processes=processes)
    stats["written"] += 1
    stats["rows"] += int(filled.sum())
    progress.log(f"; wrote {entry['name']}", force=True)
  if processes > 1:
    multihost_utils.sync_global_devices(f"embed_done_{directory.name}")
  return stats


def write_arrays(directory: str | os.PathLike, ids: Sequence[str],
                 blocks: Iterable[np.ndarray], *, dim: int, fingerprint: Mapping,
                 collection: Mapping, dtype: str = "float16",
                 shard_size: int = 10000) -> dict[str, int]:
  """Writes embeddings made elsewhere as a collection, from one process.

  For catalogues embedded outside `--config.mode=embed`, or synthetic ones (the
  catalogue benchmark's): the result reads as any collection does, so the index
  tools take it. As with `write_collection`, complete shards are kept on a rerun
  (their rows are still read from `blocks`, and dropped) and a rerun whose ids or
  fingerprint differ is refused.

  Args:
    directory: the collection's directory.
    ids: the ids of the rows, in order; unique.
    blocks: float arrays [rows_i, dim] holding the rows of `ids` in order, in
      blocks of any sizes.
    dim: the embedding dimension.
    fingerprint: what made the embeddings (JSON-ready dict).
    collection: what they are of (JSON-ready dict).
    dtype: "float32" or "float16", the storage dtype.
    shard_size: rows per shard.

  Returns:
    {"shards", "written", "kept", "rows" (rows written)}.
  """
  directory = pathlib.Path(directory)
  manifest, problem = _plan_writing(
      directory, ids, "no ids were given.", dim=dim, dtype=dtype,
      shard_size=shard_size, collection=collection, fingerprint=fingerprint)
  if problem:
    raise CollectionError(problem)
  directory.mkdir(parents=True, exist_ok=True)
  if not (directory / MANIFEST).exists():
    text = json.dumps(manifest, indent=1)
    _write_atomically(directory / MANIFEST, lambda f: f.write(text.encode()))
  shards = manifest["layout"]["shards"]
  digest = manifest["shards_sha256"]
  stats = dict(shards=len(shards), written=0, kept=0, rows=0)
  stream = _Rows(blocks, dim, directory)
  for n, entry in enumerate(shards):
    emb = stream.take(entry["rows"])
    if _complete(directory, entry["name"], digest):
      stats["kept"] += 1
      continue
    _write_shard(directory, entry, emb.astype(dtype),
                 ids[entry["start"]:entry["start"] + entry["rows"]], [],
                 digest=digest, number=n, process=0, processes=1)
    stats["written"] += 1
    stats["rows"] += entry["rows"]
    logging.info("Wrote %s of %s (%d rows).", entry["name"], directory, entry["rows"])
  stream.finish(len(ids))
  return stats


class _Rows:
  """Rows taken in counts of our choosing from blocks of any sizes, checked."""

  def __init__(self, blocks: Iterable[np.ndarray], dim: int, directory: pathlib.Path):
    self._blocks = iter(blocks)
    self._dim, self._directory = dim, directory
    self._pending: list[np.ndarray] = []
    self._held = 0
    self.read = 0  # rows taken from the blocks so far

  def _next_block(self) -> bool:
    try:
      block = np.asarray(next(self._blocks))
    except StopIteration:
      return False
    if block.ndim != 2 or block.shape[1] != self._dim:
      raise ValueError(f"Writing {self._directory}: a block of rows "
                       f"{self.read + self._held} on has shape {block.shape}, not "
                       f"[rows, {self._dim}].")
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    if bad.size:
      raise ValueError(f"Writing {self._directory}: row "
                       f"{self.read + self._held + int(bad[0])} ({bad.size} in its "
                       "block) is not finite; fix the embeddings before writing.")
    self._pending.append(block)
    self._held += len(block)
    return True

  def take(self, rows: int) -> np.ndarray:
    while self._held < rows:
      if not self._next_block():
        raise ValueError(f"Writing {self._directory}: the blocks hold "
                         f"{self.read + self._held} rows, fewer than the ids.")
    joined = (self._pending[0] if len(self._pending) == 1
              else np.concatenate(self._pending))
    self._pending = [joined[rows:]] if len(joined) > rows else []
    self._held -= rows
    self.read += rows
    return joined[:rows]

  def finish(self, count: int) -> None:
    if self._held or self._next_block():
      raise ValueError(f"Writing {self._directory}: the blocks hold more rows than "
                       f"the {count} ids.")
