"""The device mesh and the one table that maps parameters to mesh axes.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (weights split within a layer). Batches are split over
(data, fsdp). Parameters follow `PARAM_RULES`: the first rule whose pattern matches a
parameter's path gives its PartitionSpec; layers never mention sharding.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (path regex, spec). Paths look like "model/language_model/layers/3/mlp/up_proj/kernel".
# Kernels are (in, out): column-parallel layers split `out` over tensor, row-parallel
# ones split `in`; fsdp takes the other dimension.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|in_proj_qkv|in_proj_z|qkv|fc1|"
     r"linear_fc1)/kernel$", P("fsdp", "tensor")),
    (r"(o_proj|down_proj|out_proj|proj|fc2|linear_fc2)/kernel$", P("tensor", "fsdp")),
    (r"kernel$", P("fsdp", None)),
    (r".*", P()),  # norms, biases, small vectors, the temperature: replicated
)


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
  """A mesh with AXES; one size may be -1 to take the remaining devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(shape)}.")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = devices.size // known
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"Mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices; {devices.size} are available. Set config.mesh so the "
                     f"sizes multiply to the device count (-1 fills one axis).")
  return Mesh(devices.reshape(sizes), AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops axes that do not divide a dimension (small or odd-sized parameters)."""
  parts = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, axis in zip(shape, parts[:len(shape)]):
    size = 1 if axis is None else mesh.shape[axis]
    fitted.append(axis if axis is not None and dim % size == 0 else None)
  return P(*fitted)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  for pattern, spec in PARAM_RULES:
    if re.search(pattern, path):
      return _fit(spec, shape, mesh)
  raise AssertionError("PARAM_RULES ends with a catch-all rule.")


def path_string(path) -> str:
  """"a/b/0/kernel" from a pytree key path (nnx's trailing `.value` dropped)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
           for k in path]
  return "/".join(p for p in parts if p not in ("value", ".value"))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every array leaf of a parameter (or optimizer state) tree.

  Optimizer moments mirror the parameter paths, so the same rules shard them.
  """
  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(path_string(path), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh):
  """`sharding_for(ndim)`: batch axis over (data, fsdp), the rest replicated."""
  def sharding_for(ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))
  return sharding_for
