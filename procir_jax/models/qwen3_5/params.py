"""Hugging Face safetensors <-> NNX parameters, through one table of rules.

Each rule pairs a checkpoint name template with an NNX parameter path template
and a layout transform; the same table drives loading and saving. Loading
first plans every tensor without reading data and raises one error that lists
every missing, unexpected and mis-shaped tensor; only then does it read, one
tensor at a time, straight from memory-mapped files onto the target devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from procir_jax.models.qwen3_5.config import Qwen3_5Config
from procir_jax.models.qwen3_5.model import Qwen3_5Model
from procir_jax.models.qwen3_5.options import ModelOptions

# ---------------------------------------------------------------------------
# Layout transforms between torch tensors and NNX parameters.


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_nnx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray, Qwen3_5Config], np.ndarray]
  nnx_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _patch_to_hf(x, cfg):
  v = cfg.vision
  return x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size,
                     v.patch_size, v.patch_size)


IDENTITY = Transform("identity", lambda x: x, lambda x, cfg: x, tuple)
# torch Linear weights are [out, in]; nnx kernels are [in, out].
LINEAR = Transform("linear", lambda x: x.T, lambda x, cfg: x.T,
                   lambda s: tuple(reversed(s)))
# Depthwise Conv1d weight [channels, 1, kernel] -> [kernel, channels].
CONV1D = Transform("conv1d", lambda x: x[:, 0, :].T,
                   lambda x, cfg: x.T[:, None, :], lambda s: (s[2], s[0]))
# Conv3d weight [out, C, T, P, P], stride == kernel -> matmul [C*T*P*P, out].
PATCH = Transform("patch", lambda x: x.reshape(x.shape[0], -1).T, _patch_to_hf,
                  lambda s: (int(np.prod(s[1:])), s[0]))

# ---------------------------------------------------------------------------
# The table. `{name:alternatives}` captures a path component; `{i}` a number.
# Checkpoint names are matched after dropping a leading "model." (the
# Qwen3_5ForConditionalGeneration prefix); bare Qwen3_5Model checkpoints
# have none.

_LM = "language_model.layers.{i}"
_LMP = "language_model/layers/{i}"
_VB = "visual.blocks.{i}"
_VBP = "visual/blocks/{i}"

RULES: tuple[tuple[str, str, Transform], ...] = (
    ("language_model.embed_tokens.weight",
     "language_model/embed_tokens/embedding", IDENTITY),
    ("language_model.norm.weight", "language_model/norm/scale", IDENTITY),
    (_LM + ".{norm:input_layernorm|post_attention_layernorm}.weight",
     _LMP + "/{norm}/scale", IDENTITY),
    (_LM + ".mlp.{proj:gate_proj|up_proj|down_proj}.weight",
     _LMP + "/mlp/{proj}/kernel", LINEAR),
    (_LM + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj}.weight",
     _LMP + "/self_attn/{proj}/kernel", LINEAR),
    (_LM + ".self_attn.{proj:q_proj|k_proj|v_proj|o_proj}.bias",
     _LMP + "/self_attn/{proj}/bias", IDENTITY),
    (_LM + ".self_attn.{norm:q_norm|k_norm}.weight",
     _LMP + "/self_attn/{norm}/scale", IDENTITY),
    (_LM + ".linear_attn.{proj:in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|"
     "out_proj}.weight", _LMP + "/linear_attn/{proj}/kernel", LINEAR),
    (_LM + ".linear_attn.conv1d.weight", _LMP + "/linear_attn/conv1d/kernel",
     CONV1D),
    (_LM + ".linear_attn.{p:dt_bias|A_log}", _LMP + "/linear_attn/{p}",
     IDENTITY),
    (_LM + ".linear_attn.norm.weight", _LMP + "/linear_attn/norm/scale",
     IDENTITY),
    ("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", PATCH),
    ("visual.patch_embed.proj.bias", "visual/patch_embed/bias", IDENTITY),
    ("visual.pos_embed.weight", "visual/pos_embed/embedding", IDENTITY),
    (_VB + ".{norm:norm1|norm2}.weight", _VBP + "/{norm}/scale", IDENTITY),
    (_VB + ".{norm:norm1|norm2}.bias", _VBP + "/{norm}/bias", IDENTITY),
    (_VB + ".{m:attn.qkv|attn.proj|mlp.linear_fc1|mlp.linear_fc2}.weight",
     _VBP + "/{m}/kernel", LINEAR),
    (_VB + ".{m:attn.qkv|attn.proj|mlp.linear_fc1|mlp.linear_fc2}.bias",
     _VBP + "/{m}/bias", IDENTITY),
    ("visual.merger.norm.weight", "visual/merger/norm/scale", IDENTITY),
    ("visual.merger.norm.bias", "visual/merger/norm/bias", IDENTITY),
    ("visual.merger.{fc:linear_fc1|linear_fc2}.weight",
     "visual/merger/{fc}/kernel", LINEAR),
    ("visual.merger.{fc:linear_fc1|linear_fc2}.bias",
     "visual/merger/{fc}/bias", IDENTITY),
    ("lm_head.weight", "lm_head/kernel", LINEAR),
)

# Multi-token-prediction heads are not part of this model.
_IGNORED = re.compile(r"^(model\.)?mtp\.")
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def _compile(template: str, sep: str, alts: Mapping[str, str]) -> re.Pattern:
  """Template -> regex; alternatives are written with "." and use `sep`."""
  out, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    choices = m.group(2) or alts.get(m.group(1))
    if choices:
      pattern = "|".join(re.escape(a.replace(".", sep))
                         for a in choices.split("|"))
    else:
      pattern = r"\d+"
    out.append(f"(?P<{m.group(1)}>{pattern})")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("^" + "".join(out) + "$")


def _fill(template: str, groups: Mapping[str, str], sep: str) -> str:
  other = "." if sep == "/" else "/"
  return _PLACEHOLDER.sub(lambda m: groups[m.group(1)].replace(other, sep),
                          template)


def _rule(hf: str, nnx_path: str, transform: Transform):
  # Alternatives are spelled once, in the checkpoint template.
  alts = {m.group(1): m.group(2) for m in _PLACEHOLDER.finditer(hf)
          if m.group(2)}
  return (_compile(hf, ".", alts), _compile(nnx_path, "/", alts), hf,
          nnx_path, transform)


_COMPILED = tuple(_rule(*r) for r in RULES)


def hf_to_nnx_name(hf_name: str) -> tuple[str, Transform] | None:
  """Maps a checkpoint tensor name to (nnx path, transform), or None."""
  name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
  for hf_re, _, _, nnx_t, transform in _COMPILED:
    m = hf_re.match(name)
    if m:
      return _fill(nnx_t, m.groupdict(), "/"), transform
  return None


def nnx_to_hf_name(path: str) -> tuple[str, Transform]:
  """Maps an NNX parameter path to its Qwen3_5ForConditionalGeneration name."""
  for _, nnx_re, hf_t, _, transform in _COMPILED:
    m = nnx_re.match(path)
    if m:
      name = _fill(hf_t, m.groupdict(), ".")
      if not name.startswith("lm_head"):
        name = "model." + name
      return name, transform
  raise KeyError(f"No checkpoint name rule for parameter {path!r}.")


# ---------------------------------------------------------------------------
# safetensors files, read through memory maps (bf16 included).

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass
class _TensorRef:
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


class SafetensorsReader:
  """Tensors of one or more safetensors files, read lazily by name."""

  def __init__(self, files: list[str]):
    self._refs: dict[str, _TensorRef] = {}
    self._maps: dict[str, np.memmap] = {}
    for path in files:
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint's safetensors index names it.")
      with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
      base = 8 + n
      for name, meta in header.items():
        if name == "__metadata__":
          continue
        if meta["dtype"] not in _ST_DTYPES:
          raise ValueError(f"{path}: tensor {name} has unsupported dtype "
                           f"{meta['dtype']}.")
        start, end = meta["data_offsets"]
        self._refs[name] = _TensorRef(path, _ST_DTYPES[meta["dtype"]],
                                      tuple(meta["shape"]), base + start,
                                      base + end)

  @classmethod
  def from_dir(cls, hf_dir: str) -> "SafetensorsReader":
    if not os.path.isdir(hf_dir):
      raise FileNotFoundError(
          f"{hf_dir} is not a directory: pass a checkpoint directory holding "
          "config.json and model.safetensors.")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      return cls([os.path.join(hf_dir, f) for f in files])
    if os.path.exists(single):
      return cls([single])
    raise FileNotFoundError(
        f"No weights in {hf_dir}: expected model.safetensors, or "
        "model.safetensors.index.json with its shards, as save_pretrained "
        "writes them.")

  def keys(self) -> list[str]:
    return list(self._refs)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._refs[name].shape

  def get(self, name: str) -> np.ndarray:
    """A read-only view of the tensor; pages are read only when touched."""
    ref = self._refs[name]
    if ref.path not in self._maps:
      self._maps[ref.path] = np.memmap(ref.path, dtype=np.uint8, mode="r")
    buf = self._maps[ref.path][ref.start:ref.end]
    return buf.view(ref.dtype).reshape(ref.shape)


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


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...],
                                                     np.dtype, Callable]],
                      metadata: Mapping[str, str] | None = None):
  """Writes tensors one at a time.

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
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * ((-len(blob)) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, shape, dt, produce in entries:
      x = np.ascontiguousarray(produce(), dtype=np.dtype(dt))
      if x.shape != tuple(shape):
        raise ValueError(f"{name}: produced {x.shape}, header says {shape}.")
      f.write(x.tobytes())


# ---------------------------------------------------------------------------
# Loading.

ShardingSpec = (Mapping[str, jax.sharding.Sharding] |
                Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None] |
                None)


def param_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Every nnx.Param of the model, keyed by its "/"-joined path."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      out["/".join(str(p) for p in path)] = node
  return out


def _place(view: np.ndarray, dtype, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(np.asarray(view, dtype=dtype))
  # Each device reads only its own slice of the (memory-mapped) tensor.
  return jax.make_array_from_callback(
      view.shape, sharding, lambda idx: np.asarray(view[idx], dtype=dtype))


def load_pretrained(hf_dir: str, dtype=jnp.float32, *,
                    param_dtype=jnp.float32,
                    shardings: ShardingSpec = None,
                    config: Qwen3_5Config | None = None,
                    options: ModelOptions | None = None) -> Qwen3_5Model:
  """Loads a Hugging Face Qwen3.5 checkpoint directory into Qwen3_5Model.

  Args:
    hf_dir: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json), from Qwen3_5ForConditionalGeneration or a
      bare Qwen3_5Model.
    dtype: compute dtype (e.g. jnp.bfloat16).
    param_dtype: storage dtype of the parameters; fp32 unless asked.
    shardings: where to put each parameter: a mapping from NNX path (such as
      "language_model/layers/0/mlp/up_proj/kernel") to a jax Sharding, or a
      function (path, shape) -> Sharding or None. Parameters without one go
      to the default device. Each device reads only its slice of each tensor,
      so no full host copy of the model is ever made.
    config: overrides the directory's config.json.
    options: how the model runs (attention kernel, remat, layer scan).

  Returns:
    The model with the checkpoint's weights.

  Raises:
    FileNotFoundError: the directory lacks config.json or the weights.
    ValueError: listing every missing, unexpected and mis-shaped tensor.
  """
  cfg = config or Qwen3_5Config.from_pretrained(hf_dir)
  return _load(cfg, SafetensorsReader.from_dir(hf_dir), hf_dir, dtype=dtype,
               param_dtype=param_dtype, shardings=shardings, options=options)


def from_state_dict(config: Qwen3_5Config, tensors: Mapping[str, Any],
                    dtype=jnp.float32, *, param_dtype=jnp.float32,
                    shardings: ShardingSpec = None,
                    options: ModelOptions | None = None) -> Qwen3_5Model:
  """Like load_pretrained, from in-memory tensors named as in a checkpoint."""
  return _load(config, DictReader(tensors), "the given tensors", dtype=dtype,
               param_dtype=param_dtype, shardings=shardings, options=options)


def _load(cfg, reader, source, *, dtype, param_dtype, shardings, options):
  names = reader.keys()
  ignored = [n for n in names if _IGNORED.match(n)]
  if ignored:
    logging.info("Ignoring %d multi-token-prediction tensors (mtp.*) in %s.",
                 len(ignored), source)
  names = [n for n in names if not _IGNORED.match(n)]

  head = [n for n in names if n in ("lm_head.weight", "model.lm_head.weight")]
  if cfg.tie_word_embeddings and head:
    embed = next((n for n in names
                  if n.endswith("language_model.embed_tokens.weight")), None)
    if embed is not None and np.array_equal(reader.get(head[0]),
                                            reader.get(embed)):
      logging.info("Embeddings are tied: skipping the duplicate %s.", head[0])
      names = [n for n in names if n not in head]
    else:
      # transformers unties in this case too: the head is a weight of its own.
      logging.warning("tie_word_embeddings is set but %s differs from the "
                      "embeddings: loading it as an untied head.", head[0])
      cfg = cfg.replace(tie_word_embeddings=False)

  model = nnx.eval_shape(lambda: Qwen3_5Model(
      cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
      options=options))
  params = param_paths(model)

  plan, unexpected, mismatched, seen = [], [], [], {}
  for name in names:
    hit = hf_to_nnx_name(name)
    if hit is None or hit[0] not in params:
      unexpected.append(name)
      continue
    path, transform = hit
    if path in seen:
      unexpected.append(f"{name} (same parameter as {seen[path]})")
      continue
    seen[path] = name
    want = tuple(params[path].get_value().shape)
    got = transform.nnx_shape(reader.shape(name))
    if got != want:
      mismatched.append(f"{name}: {reader.shape(name)} in the checkpoint, "
                        f"model expects {want} at {path} (as {got})")
      continue
    plan.append((name, path, transform))
  missing = sorted(set(params) - set(seen))
  if missing or unexpected or mismatched:
    lines = [f"Weights in {source} do not match the model built from its "
             "config:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", mismatched)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines += [f"    {x}" for x in items]
    raise ValueError("\n".join(lines))

  for name, path, transform in plan:
    view = transform.to_nnx(reader.get(name))
    sharding = None
    if callable(shardings):
      sharding = shardings(path, tuple(view.shape))
    elif shardings is not None:
      sharding = shardings.get(path)
    params[path].set_value(_place(view, np.dtype(param_dtype), sharding))
  return model


# ---------------------------------------------------------------------------
# Saving.

_DTYPE_NAMES = {np.dtype(np.float32): "float32",
                np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}


def save_pretrained(model: Qwen3_5Model, out_dir: str, *, dtype=None,
                    max_shard_bytes: int = 5 * 2**30):
  """Writes config.json and safetensors that transformers loads as Qwen3.5.

  Tensors are named as in Qwen3_5ForConditionalGeneration and written one at a
  time from the devices, so the host never holds the whole model.

  Args:
    model: the model to save.
    out_dir: created if missing.
    dtype: storage dtype of the saved tensors; defaults to the params' own.
    max_shard_bytes: above this, tensors are split over several files with a
      model.safetensors.index.json, as transformers does.
  """
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.config
  entries = []  # (name, hf shape, dtype, produce, nbytes)
  for path, var in sorted(param_paths(model).items()):
    name, transform = nnx_to_hf_name(path)
    value = var.get_value()
    shape = transform.to_hf(np.empty(value.shape, np.uint8), cfg).shape
    dt = np.dtype(dtype if dtype is not None else value.dtype)

    def produce(value=value, transform=transform, dt=dt):
      return transform.to_hf(np.asarray(jax.device_get(value)).astype(dt), cfg)

    entries.append((name, shape, dt, produce,
                    int(np.prod(shape, dtype=np.int64)) * dt.itemsize))
  shards, cur, size = [], [], 0
  for e in entries:
    if cur and size + e[4] > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += e[4]
  shards.append(cur)

  weight_map = {}
  for i, shard in enumerate(shards):
    fname = ("model.safetensors" if len(shards) == 1 else
             f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    write_safetensors(os.path.join(out_dir, fname), [e[:4] for e in shard])
    weight_map.update({e[0]: fname for e in shard})
  if len(shards) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(e[4] for e in entries)},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)

  d = cfg.to_hf_dict()
  saved = {e[2] for e in entries}
  if len(saved) == 1:
    d["dtype"] = _DTYPE_NAMES.get(saved.pop(), "float32")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
