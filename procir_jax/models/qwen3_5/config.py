"""Qwen3.5 configuration, read from and written to Hugging Face `config.json`.

The shapes always come from the checkpoint's `config.json`; the defaults below
only matter for configs built by hand (tests, benchmarks).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Mapping

_TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "attention_bias", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "initializer_range",
)
_VISION_FIELDS = (
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads",
    "in_channels", "patch_size", "spatial_merge_size", "temporal_patch_size",
    "out_hidden_size", "num_position_embeddings", "initializer_range",
)
_TOP_FIELDS = (
    "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "tie_word_embeddings",
)


@dataclasses.dataclass(frozen=True)
class Qwen3_5TextConfig:
  """The hybrid decoder: Gated DeltaNet and gated attention layers."""

  vocab_size: int = 248320
  hidden_size: int = 1024
  intermediate_size: int = 3584
  num_hidden_layers: int = 24
  num_attention_heads: int = 8
  num_key_value_heads: int = 2
  head_dim: int = 256
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  attention_bias: bool = False
  linear_conv_kernel_dim: int = 4
  linear_key_head_dim: int = 128
  linear_value_head_dim: int = 128
  linear_num_key_heads: int = 16
  linear_num_value_heads: int = 16
  # Empty means "three linear_attention layers, then one full_attention".
  layer_types: tuple[str, ...] = ()
  rope_theta: float = 10_000_000.0
  partial_rotary_factor: float = 0.25
  mrope_section: tuple[int, int, int] = (11, 11, 10)
  initializer_range: float = 0.02

  def __post_init__(self):
    if not self.layer_types:
      types = tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                    for i in range(self.num_hidden_layers))
      object.__setattr__(self, "layer_types", types)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
    if len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries but "
          f"num_hidden_layers is {self.num_hidden_layers}; they must match.")
    unknown = set(self.layer_types) - {"linear_attention", "full_attention"}
    if unknown:
      raise ValueError(f"Unknown layer_types {sorted(unknown)}; expected "
                       "'linear_attention' or 'full_attention'.")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError("num_attention_heads must be a multiple of "
                       "num_key_value_heads.")
    if self.linear_num_value_heads % self.linear_num_key_heads:
      raise ValueError("linear_num_value_heads must be a multiple of "
                       "linear_num_key_heads.")
    if self.rotary_dim % 2 or self.rotary_dim // 2 < sum(self.mrope_section):
      raise ValueError(
          f"mrope_section {self.mrope_section} needs {sum(self.mrope_section)} "
          f"frequencies but the rotary dim {self.rotary_dim} gives "
          f"{self.rotary_dim // 2}.")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class Qwen3_5VisionConfig:
  """The ViT image tower and its 2x2 patch merger."""

  depth: int = 12
  hidden_size: int = 768
  hidden_act: str = "gelu_pytorch_tanh"
  intermediate_size: int = 3072
  num_heads: int = 12
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 1024
  num_position_embeddings: int = 2304
  rope_theta: float = 10_000.0
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError("vision hidden_size must be a multiple of num_heads.")
    side = int(self.num_position_embeddings ** 0.5)
    if side * side != self.num_position_embeddings:
      raise ValueError("num_position_embeddings must be a square number.")

  @property
  def patch_dim(self) -> int:
    """Row length of `pixel_values`: channels x temporal x patch x patch."""
    return (self.in_channels * self.temporal_patch_size * self.patch_size *
            self.patch_size)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen3_5Config:
  """The whole model: vision tower, decoder and the multimodal token ids."""

  text: Qwen3_5TextConfig = dataclasses.field(default_factory=Qwen3_5TextConfig)
  vision: Qwen3_5VisionConfig = dataclasses.field(
      default_factory=Qwen3_5VisionConfig)
  image_token_id: int = 248056
  video_token_id: int = 248057
  vision_start_token_id: int = 248053
  vision_end_token_id: int = 248054
  tie_word_embeddings: bool = True
  # The config.json this was read from, kept so that saving keeps every field
  # this port does not use (token ids, generation settings, ...).
  hf_config: Mapping[str, Any] | None = dataclasses.field(
      default=None, compare=False, hash=False, repr=False)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "Qwen3_5Config":
    """Builds a config from a parsed Hugging Face `config.json`."""
    model_type = d.get("model_type")
    if model_type not in ("qwen3_5", None):
      raise ValueError(
          f"config.json has model_type {model_type!r}; this loader reads "
          "Qwen3.5 checkpoints (model_type 'qwen3_5').")
    if "text_config" not in d or "vision_config" not in d:
      raise ValueError(
          "config.json has no text_config/vision_config: expected the config "
          "of a Qwen3_5ForConditionalGeneration (or Qwen3_5Model) checkpoint.")
    tc, vc = d["text_config"], d["vision_config"]
    text_kwargs = {k: tc[k] for k in _TEXT_FIELDS if tc.get(k) is not None}
    if tc.get("layer_types"):
      text_kwargs["layer_types"] = tuple(tc["layer_types"])
    elif "full_attention_interval" in tc:
      n, every = tc["num_hidden_layers"], tc["full_attention_interval"]
      text_kwargs["layer_types"] = tuple(
          "full_attention" if (i + 1) % every == 0 else "linear_attention"
          for i in range(n))
    rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"rope_type {rope_type!r} is not supported; only "
                       "'default' (what Qwen3.5 ships) is implemented.")
    text_kwargs["rope_theta"] = rope.get("rope_theta",
                                         tc.get("rope_theta", 10_000_000.0))
    text_kwargs["partial_rotary_factor"] = rope.get(
        "partial_rotary_factor", tc.get("partial_rotary_factor", 0.25))
    text_kwargs["mrope_section"] = tuple(rope.get("mrope_section",
                                                  (11, 11, 10)))
    vision_kwargs = {k: vc[k] for k in _VISION_FIELDS if vc.get(k) is not None}
    vrope = vc.get("rope_parameters") or {}
    vision_kwargs["rope_theta"] = vrope.get("rope_theta", 10_000.0)
    top = {k: d[k] for k in _TOP_FIELDS if d.get(k) is not None}
    return cls(text=Qwen3_5TextConfig(**text_kwargs),
               vision=Qwen3_5VisionConfig(**vision_kwargs),
               hf_config=copy.deepcopy(dict(d)), **top)

  @classmethod
  def from_json_file(cls, path: str) -> "Qwen3_5Config":
    with open(path) as f:
      return cls.from_hf_dict(json.load(f))

  @classmethod
  def from_pretrained(cls, hf_dir: str) -> "Qwen3_5Config":
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} does not exist: a Qwen3.5 checkpoint directory needs the "
          "config.json that save_pretrained writes beside the safetensors.")
    return cls.from_json_file(path)

  def to_hf_dict(self) -> dict[str, Any]:
    """Returns a `config.json` dict that transformers reads as Qwen3.5."""
    d = copy.deepcopy(dict(self.hf_config or {}))
    d.setdefault("architectures", ["Qwen3_5ForConditionalGeneration"])
    d["model_type"] = "qwen3_5"
    tc = dict(d.get("text_config") or {})
    for k in _TEXT_FIELDS:
      tc[k] = getattr(self.text, k)
    tc["model_type"] = "qwen3_5_text"
    tc["layer_types"] = list(self.text.layer_types)
    tc.pop("full_attention_interval", None)
    tc.pop("rope_scaling", None)
    tc.pop("rope_theta", None)
    rope = dict(tc.get("rope_parameters") or {})
    rope.update(rope_type="default", rope_theta=self.text.rope_theta,
                partial_rotary_factor=self.text.partial_rotary_factor,
                mrope_section=list(self.text.mrope_section))
    rope.setdefault("mrope_interleaved", True)
    tc["rope_parameters"] = rope
    vc = dict(d.get("vision_config") or {})
    for k in _VISION_FIELDS:
      vc[k] = getattr(self.vision, k)
    vc["model_type"] = "qwen3_5_vision"
    vrope = dict(vc.get("rope_parameters") or {})
    vrope.update(rope_type="axial", rope_theta=self.vision.rope_theta)
    vc["rope_parameters"] = vrope
    d["text_config"], d["vision_config"] = tc, vc
    for k in _TOP_FIELDS:
      d[k] = getattr(self, k)
    # transformers ties by the top-level flag; the text config's own flag is
    # only filled in when missing.
    tc.setdefault("tie_word_embeddings", self.tie_word_embeddings)
    return d

  def replace(self, **changes) -> "Qwen3_5Config":
    return dataclasses.replace(self, **changes)
