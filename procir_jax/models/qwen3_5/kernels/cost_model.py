"""Shared arithmetic of the kernels' cost estimates (XLA cannot see inside a kernel)."""

from typing import Iterable


def count_runs(block_indices: Iterable) -> int:
  """DMAs for a grid's sequence of block indices: Pallas copies a block in again only
  when its index changes from one grid step to the next."""
  runs, prev = 0, None
  for index in block_indices:
    if index != prev:
      runs, prev = runs + 1, index
  return runs
