"""Every large parameter of the 0.8B model has a sharding rule of its own."""

import re

from flax import nnx
import jax
import numpy as np

from procir_jax import sharding
from procir_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5Model

LARGE = 2**20  # elements: 4 MiB in fp32


def test_no_large_parameter_falls_through_to_a_catch_all_rule():
  """A new projection must get a rule: the catch-alls would shard it over fsdp only,
  or replicate it on every device."""
  model = nnx.eval_shape(
      lambda: Qwen3_5Model(Qwen3_5Config.qwen3_5_0_8b(), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  named = len(sharding.PARAM_RULES) - sharding.CATCH_ALL_RULES
  caught, large = [], 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding.path_string(path)
    if int(np.prod(leaf.shape)) < LARGE:
      continue
    large += 1
    rule = next(i for i, (pattern, _) in enumerate(sharding.PARAM_RULES)
                if re.search(pattern, name))
    if rule >= named:
      caught.append(f"{name} {tuple(leaf.shape)}")
  assert large > 100  # every layer's projections, the embedding, the vision tower
  assert not caught, f"large parameters without a rule of their own: {caught}"
