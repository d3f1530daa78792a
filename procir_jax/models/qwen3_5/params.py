"""Loading and saving Qwen3.5 as Hugging Face checkpoints: the public API.

Three modules share the work:
  name_rules.py      the table of checkpoint-name <-> NNX-path rules and the
                     layout transforms (one table drives loading and saving);
  safetensors_io.py  safetensors files and (sharded) checkpoint directories;
  params.py          this module: load_pretrained, from_state_dict,
                     save_pretrained and param_paths.

Loading first plans every tensor without reading data and raises one error
that lists every missing, unexpected and mis-shaped tensor; only then does it
read, one tensor at a time, each device reading only its own slice of the
file. Saving writes one tensor at a time from the devices.

The names that lived here before the split (the rules, the transforms, the
readers and the writer) are still importable from this module.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from procir_jax.models.qwen3_5.config import Qwen3_5Config
from procir_jax.models.qwen3_5.model import Qwen3_5Model
from procir_jax.models.qwen3_5.name_rules import (CONV1D, IDENTITY, IGNORED,
                                                  LINEAR, PATCH, RULES,
                                                  Transform, hf_to_nnx_name,
                                                  nnx_to_hf_name)
from procir_jax.models.qwen3_5.options import ModelOptions
from procir_jax.models.qwen3_5.safetensors_io import (DictReader,
                                                      SafetensorsReader,
                                                      write_safetensors,
                                                      write_sharded)

__all__ = [
    # This module's own API.
    "ShardingSpec", "from_state_dict", "load_pretrained", "param_paths",
    "save_pretrained",
    # Re-exported from name_rules and safetensors_io.
    "CONV1D", "IDENTITY", "LINEAR", "PATCH", "RULES", "Transform",
    "hf_to_nnx_name", "nnx_to_hf_name", "DictReader", "SafetensorsReader",
    "write_safetensors", "Qwen3_5Model",
]

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


def _place(reader, name: str, transform: Transform, dtype: np.dtype,
           sharding: jax.sharding.Sharding | None) -> jax.Array:
  """Reads checkpoint tensor `name` into an NNX-layout array on devices."""
  if sharding is None:
    return jnp.asarray(np.asarray(transform.to_nnx(reader.get(name)),
                                  dtype=dtype))

  def read(idx):
    # Each device reads only its own slice of the tensor.
    if transform.source_index is None:
      piece = transform.to_nnx(reader.get(name))[idx]
    else:
      src, post = transform.source_index(idx)
      piece = transform.to_nnx(reader.read(name, src))[post]
    return np.asarray(piece, dtype=dtype)

  shape = transform.nnx_shape(reader.shape(name))
  return jax.make_array_from_callback(shape, sharding, read)


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
  with SafetensorsReader.from_dir(hf_dir) as reader:
    return _load(cfg, reader, hf_dir, dtype=dtype, param_dtype=param_dtype,
                 shardings=shardings, options=options)


def from_state_dict(config: Qwen3_5Config, tensors: Mapping[str, Any],
                    dtype=jnp.float32, *, param_dtype=jnp.float32,
                    shardings: ShardingSpec = None,
                    options: ModelOptions | None = None) -> Qwen3_5Model:
  """Like load_pretrained, from in-memory tensors named as in a checkpoint."""
  return _load(config, DictReader(tensors), "the given tensors", dtype=dtype,
               param_dtype=param_dtype, shardings=shardings, options=options)


def _load(cfg, reader, source, *, dtype, param_dtype, shardings, options):
  names = reader.keys()
  ignored = [n for n in names if IGNORED.match(n)]
  if ignored:
    logging.info("Ignoring %d multi-token-prediction tensors (mtp.*) in %s.",
                 len(ignored), source)
  names = [n for n in names if not IGNORED.match(n)]

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
    sharding = None
    if callable(shardings):
      sharding = shardings(path, transform.nnx_shape(reader.shape(name)))
    elif shardings is not None:
      sharding = shardings.get(path)
    params[path].set_value(_place(reader, name, transform,
                                  np.dtype(param_dtype), sharding))
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
    out_dir: created if missing. Weight files of an earlier save there are
      replaced.
    dtype: storage dtype of the saved tensors; defaults to the params' own.
    max_shard_bytes: above this, tensors are split over several files with a
      model.safetensors.index.json, as transformers does.
  """
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.config
  entries = []  # (name, hf shape, dtype, produce)
  for path, var in sorted(param_paths(model).items()):
    name, transform = nnx_to_hf_name(path)
    value = var.get_value()
    shape = transform.to_hf(np.empty(value.shape, np.uint8), cfg).shape
    dt = np.dtype(dtype if dtype is not None else value.dtype)

    def produce(value=value, transform=transform, dt=dt):
      return transform.to_hf(
          np.asarray(jax.device_get(value)).astype(dt, copy=False), cfg)

    entries.append((name, shape, dt, produce))
  write_sharded(out_dir, entries, max_shard_bytes)

  d = cfg.to_hf_dict()
  saved = {e[2] for e in entries}
  if len(saved) == 1:
    d["dtype"] = _DTYPE_NAMES.get(saved.pop(), "float32")
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
