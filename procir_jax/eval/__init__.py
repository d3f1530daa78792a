"""Retrieval evaluation: search backends, the FashionMV protocol, reports."""

from procir_jax.eval.search import ExactSearch
from procir_jax.eval.search import ScannSearch
from procir_jax.eval.search import ScannSettings
from procir_jax.eval.search import SearchIndex
from procir_jax.eval.search import build_index
from procir_jax.eval.search import l2_normalize
from procir_jax.eval.search import load_index

__all__ = ["ExactSearch", "ScannSearch", "ScannSettings", "SearchIndex", "build_index",
           "l2_normalize", "load_index"]
