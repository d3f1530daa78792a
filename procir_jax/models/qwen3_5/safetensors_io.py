"""safetensors files and checkpoint directories, one tensor at a time.

Reading goes through the `safetensors` library (`safe_open`, NumPy
framework): opening parses the headers only, and each tensor, or one device's
slice of it, is read when asked. bf16 tensors come back as
`ml_dtypes.bfloat16` arrays (safetensors >= 0.6).

Writing keeps a small streaming writer instead of `safetensors.numpy.save_file`,
for a measured reason. `save_file` takes a dict of host arrays, so it holds a
whole file (up to `max_shard_bytes`, 5 GiB by default: all of Qwen3.5-0.8B in
fp32) in host memory at once, and it was not faster. Writing a 612 MiB fp32
model (160M parameters) on the project's 2-core CPU test machine:
save_file (5 runs) 2.8-7.9 s and 437-445 MiB of extra host memory (below the
file's size only because tensors saved in their own layout alias CPU device
buffers; from an accelerator every tensor is a host copy); this writer
(3 runs) 1.6-4.8 s and 42-64 MiB, since it asks for each tensor only when it
reaches it and writes it without another copy.
Files it writes are read back through `safe_open` (and transformers) in the
tests.

A checkpoint directory holds `model.safetensors`, or shards named
`model-00001-of-0000N.safetensors` with `model.safetensors.index.json`, as
transformers writes them.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np
import safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_GLOB = "model-*-of-*.safetensors"

# The dtypes read and written. Others (FP8 with separate scales, say) are
# refused rather than read as plain numbers.
_ST_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}

# (name, shape, dtype, produce): produce() returns the array, and is called
# only when the writer reaches that tensor.
Entry = tuple[str, Sequence[int], Any, Callable[[], np.ndarray]]


def _nbytes(shape: Sequence[int], dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------
# Reading.


class SafetensorsReader:
  """Tensors of one or more safetensors files, read lazily by name."""

  def __init__(self, files: list[str]):
    # name -> (file, open handle, shape, safetensors dtype)
    self._tensors: dict[str, tuple[str, Any, tuple[int, ...], str]] = {}
    self._handles = []
    for path in files:
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint's safetensors index names it.")
      try:
        handle = safetensors.safe_open(path, framework="numpy")
      except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); "
                         "it may be truncated or still being written.") from e
      self._handles.append(handle)
      for name in handle.keys():
        info = handle.get_slice(name)
        if info.get_dtype() not in _ST_DTYPES:
          raise ValueError(f"{path}: tensor {name} has unsupported dtype "
                           f"{info.get_dtype()}.")
        self._tensors[name] = (path, handle, tuple(info.get_shape()),
                               info.get_dtype())

  @classmethod
  def from_dir(cls, hf_dir: str) -> "SafetensorsReader":
    return cls(checkpoint_files(hf_dir))

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._tensors[name][2]

  def get(self, name: str) -> np.ndarray:
    """The whole tensor, read from its file now."""
    _, handle, _, _ = self._tensors[name]
    try:
      return handle.get_tensor(name)
    except Exception as e:  # name the file and the tensor
      raise self._read_error(name, e) from e

  def read(self, name: str, index: tuple) -> np.ndarray:
    """`get(name)[index]` for a tuple of slices, reading only that slice."""
    _, handle, shape, _ = self._tensors[name]
    if 0 in shape:  # safetensors cannot slice empty tensors
      return self.get(name)[index]
    try:
      return handle.get_slice(name)[index]
    except Exception as e:  # name the file and the tensor
      raise self._read_error(name, e) from e

  def _read_error(self, name: str, e: Exception) -> Exception:
    path, _, _, dtype = self._tensors[name]
    hint = (" Reading bf16 as NumPy needs safetensors >= 0.6."
            if dtype == "BF16" else "")
    return ValueError(f"{path}: cannot read tensor {name} ({e}).{hint}")

  def close(self):
    for handle in self._handles:
      handle.__exit__(None, None, None)
    self._handles = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class DictReader:
  """In-memory tensors (name -> numpy-convertible array) as a reader."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._tensors = tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self._tensors[name])

  def read(self, name: str, index: tuple) -> np.ndarray:
    return np.asarray(self._tensors[name][index])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def checkpoint_files(hf_dir: str) -> list[str]:
  """The safetensors files of a checkpoint directory, sharded or not."""
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(
        f"{hf_dir} is not a directory: pass a checkpoint directory holding "
        "config.json and model.safetensors.")
  index = os.path.join(hf_dir, INDEX_FILE)
  single = os.path.join(hf_dir, SINGLE_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(
          f"{index} is not a safetensors index: expected JSON with a "
          f"\"weight_map\" from tensor names to file names ({e!r}).") from e
    return [os.path.join(hf_dir, f) for f in files]
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(
      f"No weights in {hf_dir}: expected {SINGLE_FILE}, or {INDEX_FILE} with "
      "its shards, as save_pretrained writes them.")


# ---------------------------------------------------------------------------
# Writing.


def write_safetensors(path: str, entries: Sequence[Entry],
                      metadata: Mapping[str, str] | None = None):
  """Writes tensors to one file, one at a time (see the module docstring).

  The file appears under its name only once complete.

  Args:
    path: output file.
    entries: (name, shape, dtype, produce) where produce() returns the array;
      it is called only when the writer reaches that tensor.
    metadata: header metadata; transformers expects {"format": "pt"}.
  """
  header, offset = {}, 0
  for name, shape, dt, _ in entries:
    dt = np.dtype(dt)
    if dt not in _ST_NAMES:
      raise ValueError(f"Cannot save {name} of dtype {dt} to safetensors.")
    nbytes = _nbytes(shape, dt)
    header[name] = {"dtype": _ST_NAMES[dt], "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((-len(blob)) % 8)
  tmp = path + ".partial"
  try:
    with open(tmp, "wb") as f:
      f.write(len(blob).to_bytes(8, "little"))
      f.write(blob)
      for name, shape, dt, produce in entries:
        x = np.ascontiguousarray(produce(), dtype=np.dtype(dt))
        if x.shape != tuple(shape):
          raise ValueError(f"{name}: produced {x.shape}, header says "
                           f"{tuple(shape)}.")
        f.write(x.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_sharded(out_dir: str, entries: Sequence[Entry],
                  max_shard_bytes: int) -> list[str]:
  """Writes `model.safetensors`, or shards and their index above the limit.

  Shards are filled in order up to `max_shard_bytes` (a tensor larger than
  the limit gets a shard of its own), as transformers does. Weight files of
  an earlier save in `out_dir` that this one does not overwrite are removed,
  so that a stale index or shard is never loaded with the new ones.

  Returns:
    The file names written, in order.
  """
  shards, cur, size = [], [], 0
  for e in entries:
    n = _nbytes(e[1], e[2])
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += n
  shards.append(cur)

  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for i in range(len(shards))])
  stale = {os.path.basename(p)
           for p in glob.glob(os.path.join(out_dir, _SHARD_GLOB))}
  stale |= {f for f in (SINGLE_FILE, INDEX_FILE)
            if os.path.exists(os.path.join(out_dir, f))}
  for f in sorted(stale - set(names)):
    os.remove(os.path.join(out_dir, f))

  weight_map = {}
  for fname, shard in zip(names, shards):
    write_safetensors(os.path.join(out_dir, fname), shard)
    weight_map.update({e[0]: fname for e in shard})
  if len(shards) > 1:
    total = sum(_nbytes(e[1], e[2]) for e in entries)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  return names
