"""Optax: AdamW with warmup + cosine decay, clipping, accumulation and freezing."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from procir_jax.sharding import path_string

FROZEN_PATTERNS = {
    "vision": r"(^|/)visual/",
    "embeddings": r"embed_tokens/",
}


def learning_rate(cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * final_lr_fraction`."""
  warmup = max(int(cfg.warmup_steps), 0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(int(cfg.steps), warmup + 1),
      end_value=cfg.lr * cfg.final_lr_fraction)


def frozen_labels(params: Any, freeze: tuple[str, ...]) -> Any:
  """"frozen" or "trained" for every parameter, by FROZEN_PATTERNS."""
  unknown = set(freeze) - set(FROZEN_PATTERNS)
  if unknown:
    raise ValueError(f"Unknown train.freeze entries {sorted(unknown)}; choose from "
                     f"{sorted(FROZEN_PATTERNS)}.")
  patterns = [FROZEN_PATTERNS[f] for f in freeze]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(re.search(p, path_string(path))
                                      for p in patterns) else "trained", params)


def make_optimizer(cfg, params: Any) -> optax.GradientTransformation:
  """`cfg`: the config's `train` section (lr, warmup_steps, steps, weight_decay,
  clip_norm, grad_accum, freeze, ...)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
      optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay),
  )
  if cfg.freeze:
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               frozen_labels(params, tuple(cfg.freeze)))
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx
