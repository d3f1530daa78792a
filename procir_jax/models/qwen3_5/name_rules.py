"""Hugging Face tensor names <-> NNX parameter paths: one table of rules.

Each rule pairs a checkpoint name template with an NNX parameter path template
and a layout transform; the same table drives loading and saving
(`params.py`). Nothing here touches files or devices.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np

from procir_jax.models.qwen3_5.config import Qwen3_5Config

# ---------------------------------------------------------------------------
# Layout transforms between torch tensors and NNX parameters.

Index = tuple  # of slices, one per axis, as jax.make_array_from_callback asks


@dataclasses.dataclass(frozen=True)
class Transform:
  """How a checkpoint tensor's layout becomes an NNX parameter's and back.

  Attributes:
    name: for messages.
    to_nnx: checkpoint array -> NNX array (a view where numpy allows).
    to_hf: NNX array -> checkpoint array.
    nnx_shape: checkpoint shape -> NNX shape, without reading data.
    source_index: an index into the NNX array -> (index into the checkpoint
      tensor, index applied after `to_nnx`), such that
      `to_nnx(hf[a])[b] == to_nnx(hf)[idx]` for `a, b = source_index(idx)`.
      Loading uses it to read only a device's slice of the file; None reads
      the whole tensor and indexes after `to_nnx`.
  """
  name: str
  to_nnx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray, Qwen3_5Config], np.ndarray]
  nnx_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
  source_index: Callable[[Index], tuple[Index, Index]] | None = None


def _patch_to_hf(x, cfg):
  v = cfg.vision
  return x.T.reshape(x.shape[1], v.in_channels, v.temporal_patch_size,
                     v.patch_size, v.patch_size)


_ALL = slice(None)

IDENTITY = Transform("identity", lambda x: x, lambda x, cfg: x, tuple,
                     lambda idx: (idx, ()))
# torch Linear weights are [out, in]; nnx kernels are [in, out].
LINEAR = Transform("linear", lambda x: x.T, lambda x, cfg: x.T,
                   lambda s: tuple(reversed(s)),
                   lambda idx: (tuple(reversed(idx)), ()))
# Depthwise Conv1d weight [channels, 1, kernel] -> [kernel, channels].
CONV1D = Transform("conv1d", lambda x: x[:, 0, :].T,
                   lambda x, cfg: x.T[:, None, :], lambda s: (s[2], s[0]),
                   lambda idx: ((idx[1], _ALL, idx[0]), ()))
# Conv3d weight [out, C, T, P, P], stride == kernel -> matmul [C*T*P*P, out].
# Rows of the NNX kernel mix four checkpoint axes: read whole output channels
# and pick the rows after reshaping.
PATCH = Transform("patch", lambda x: x.reshape(x.shape[0], -1).T, _patch_to_hf,
                  lambda s: (int(np.prod(s[1:])), s[0]),
                  lambda idx: ((idx[1],) + (_ALL,) * 4, (idx[0], _ALL)))

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
IGNORED = re.compile(r"^(model\.)?mtp\.")
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
