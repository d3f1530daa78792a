"""The device mesh, and the one place that maps parameters and activations to its axes.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (weights split within a layer). Batches, and so every
activation's batch axis, are split over BATCH_AXES = (data, fsdp); attention heads over
HEAD_AXIS when it divides them. Parameters follow `PARAM_RULES`: the first rule whose
pattern matches a parameter's path gives its PartitionSpec. Layers never mention
sharding; the few kernels XLA cannot partition (Pallas calls) run per shard through
`per_shard`, with specs made from these names.

Training, evaluation, the benchmarks and the planning tool all use this module.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"

# (path regex, spec). Paths look like
# "model/language_model/layers/3/mlp/up_proj/kernel".
# Kernels are (in, out): column-parallel layers split `out` over tensor, row-parallel
# ones split `in`; fsdp takes the other dimension.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"pos_embed/embedding$", P(None, "fsdp")),  # gathered by (interpolated) position
    (r"patch_embed/kernel$", P("fsdp", "tensor")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|in_proj_qkv|in_proj_z|qkv|fc1|"
     r"linear_fc1)/kernel$", P("fsdp", "tensor")),
    (r"(o_proj|down_proj|out_proj|proj|fc2|linear_fc2)/kernel$", P("tensor", "fsdp")),
    # Catch-alls: a test fails if a large parameter of the 0.8B model lands here.
    (r"kernel$", P("fsdp", None)),
    (r".*", P()),  # norms, biases, small vectors, the temperature: replicated
)
CATCH_ALL_RULES = 2  # the last rules above


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


def local_batch_shards(mesh: Mesh) -> int:
  """How many batch shards this process's devices hold (its local batch splits into
  this many pieces, one per device along `data` x `fsdp`)."""
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  return max(1, shards // jax.process_count())


def per_shard(fn: Callable[..., Any], *args, head_dims: Sequence[int | None]):
  """Runs `fn(*args)` on each shard of the jitting code's mesh (see `mesh_context`).

  For kernels XLA cannot partition (Pallas calls): each argument's axis 0 is the
  batch, split over BATCH_AXES; `head_dims[i]` names argument i's heads axis (or
  None), split over HEAD_AXIS when it divides every argument's heads. The result is
  laid out like the first argument. With no mesh context, `fn` runs on the whole
  arrays.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  batch = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  heads = HEAD_AXIS if HEAD_AXIS in mesh.shape and mesh.shape[HEAD_AXIS] > 1 else None
  if heads and any(d is not None and x.shape[d] % mesh.shape[heads]
                   for x, d in zip(args, head_dims)):
    heads = None

  def spec(x, head_dim):
    parts = [batch or None] + [None] * (x.ndim - 1)
    if head_dim is not None and heads:
      parts[head_dim] = heads
    return P(*parts)

  specs = tuple(spec(x, d) for x, d in zip(args, head_dims))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                       check_vma=False)(*args)


def mesh_context(mesh: Mesh):
  """Context for tracing a jitted step on `mesh`, so that `per_shard` sees it."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(x: Any) -> Any:
  """Keeps activations split over BATCH_AXES along their leading (batch) axis.

  Layers are called between such constraints (the residual stream at every layer
  boundary): without them XLA may choose to gather a whole global batch of
  activations onto every device for a weight gradient, rather than reduce the
  per-device partial gradients. A no-op outside a mesh context (`mesh_context`)
  and for leading axes the batch shards do not divide.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  batch = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  shards = int(np.prod([mesh.shape[a] for a in batch])) if batch else 1

  def one(leaf):
    if shards == 1 or leaf.ndim == 0 or leaf.shape[0] % shards:
      return leaf
    return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, P(batch)))

  return jax.tree.map(one, x)
