"""Qwen3.5 configuration, read from and written to Hugging Face `config.json`.

A checkpoint's shapes always come from its `config.json`. Configs built by hand
(tests, benchmarks, the embedded default's tiny model) start from a named preset,
the one home of every model shape in this project:

  Qwen3_5Config.qwen3_5_0_8b()   Qwen3.5-0.8B (also the dataclass defaults)
  Qwen3_5Config.small(...)       the embedded default's demo model (minutes on a CPU)
  Qwen3_5Config.tiny(...)        tests and the CPU benchmarks
  Qwen3_5Config.test(...)        the smallest with both layer kinds: quick compiles
  Qwen3_5Config.preset(name, ...)  any of them by name (PRESETS)

Each takes the vocabulary size and the multimodal token ids, which belong to a
tokenizer: by default Qwen3.5's own; pass a smaller tokenizer's, e.g.

  Qwen3_5Config.tiny(vocab_size=len(tokenizer), image_token_id=..., ...)
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

# Qwen3.5's tokenizer: its vocabulary (the embedding rows of every released size)
# and its multimodal token ids.
QWEN3_5_VOCAB_SIZE = 248320
QWEN3_5_TOKEN_IDS = {
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}
# The named shapes, smallest first: each is a classmethod of Qwen3_5Config.
PRESETS = ("test", "tiny", "small", "qwen3_5_0_8b")


@dataclasses.dataclass(frozen=True)
class Qwen3_5TextConfig:
  """The hybrid decoder: Gated DeltaNet and gated attention layers.

  The defaults are Qwen3.5-0.8B's (Qwen3_5Config.qwen3_5_0_8b()).
  """

  vocab_size: int = QWEN3_5_VOCAB_SIZE
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
  """The ViT image tower and its 2x2 patch merger (defaults: Qwen3.5-0.8B's)."""

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
  """The whole model: vision tower, decoder and the multimodal token ids.

  The defaults are Qwen3.5-0.8B's; the named presets below build every other shape.
  """

  text: Qwen3_5TextConfig = dataclasses.field(default_factory=Qwen3_5TextConfig)
  vision: Qwen3_5VisionConfig = dataclasses.field(
      default_factory=Qwen3_5VisionConfig)
  image_token_id: int = QWEN3_5_TOKEN_IDS["image_token_id"]
  video_token_id: int = QWEN3_5_TOKEN_IDS["video_token_id"]
  vision_start_token_id: int = QWEN3_5_TOKEN_IDS["vision_start_token_id"]
  vision_end_token_id: int = QWEN3_5_TOKEN_IDS["vision_end_token_id"]
  tie_word_embeddings: bool = True
  # The config.json this was read from, kept so that saving keeps every field
  # this port does not use (token ids, generation settings, ...).
  hf_config: Mapping[str, Any] | None = dataclasses.field(
      default=None, compare=False, hash=False, repr=False)

  # --- named shapes ---------------------------------------------------------------
  # In the tiny shapes head_dim * partial_rotary_factor / 2 rotary frequencies must
  # cover sum(mrope_section); the vision tower's output width is the decoder's.

  @classmethod
  def qwen3_5_0_8b(cls, *, vocab_size: int = QWEN3_5_VOCAB_SIZE,
                   **token_ids: int) -> "Qwen3_5Config":
    """Qwen3.5-0.8B: 24 decoder layers (3 Gated DeltaNet : 1 attention), 12 ViT
    blocks, tied embeddings. The paper's model and the benchmarks' GPU shape."""
    return cls._preset(
        dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
             num_attention_heads=8, num_key_value_heads=2, head_dim=256,
             linear_conv_kernel_dim=4, linear_key_head_dim=128,
             linear_value_head_dim=128, linear_num_key_heads=16,
             linear_num_value_heads=16, rope_theta=10_000_000.0,
             partial_rotary_factor=0.25, mrope_section=(11, 11, 10)),
        dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
             num_position_embeddings=2304),
        vocab_size, token_ids)

  @classmethod
  def small(cls, *, vocab_size: int = QWEN3_5_VOCAB_SIZE,
            **token_ids: int) -> "Qwen3_5Config":
    """The embedded default's demo model: trains in minutes on two CPU cores."""
    return cls._preset(
        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             linear_key_head_dim=32, linear_value_head_dim=32,
             linear_num_key_heads=2, linear_num_value_heads=4,
             mrope_section=(2, 1, 1)),
        dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
             num_position_embeddings=256),
        vocab_size, token_ids)

  @classmethod
  def tiny(cls, *, vocab_size: int = QWEN3_5_VOCAB_SIZE,
           **token_ids: int) -> "Qwen3_5Config":
    """Tests and the CPU benchmarks: four decoder layers (one attention)."""
    return cls._preset(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             linear_key_head_dim=16, linear_value_head_dim=16,
             linear_num_key_heads=2, linear_num_value_heads=4,
             mrope_section=(2, 1, 1)),
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
             num_position_embeddings=64),
        vocab_size, token_ids)

  @classmethod
  def test(cls, *, vocab_size: int = QWEN3_5_VOCAB_SIZE,
           **token_ids: int) -> "Qwen3_5Config":
    """The smallest model that still has both layer kinds: quick to compile."""
    return cls._preset(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             layer_types=("linear_attention", "full_attention"),
             num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             linear_key_head_dim=16, linear_value_head_dim=16,
             linear_num_key_heads=1, linear_num_value_heads=2,
             mrope_section=(2, 1, 1)),
        dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
             num_position_embeddings=64),
        vocab_size, token_ids)

  @classmethod
  def preset(cls, name: str, **kwargs: int) -> "Qwen3_5Config":
    """The named shape (one of PRESETS); kwargs as the preset's classmethod takes."""
    if name not in PRESETS:
      raise ValueError(f"Unknown preset {name!r}; choose one of {list(PRESETS)}.")
    return getattr(cls, name)(**kwargs)

  @classmethod
  def _preset(cls, text: Mapping[str, Any], vision: Mapping[str, Any],
              vocab_size: int, token_ids: Mapping[str, int]) -> "Qwen3_5Config":
    unknown = set(token_ids) - set(QWEN3_5_TOKEN_IDS)
    if unknown:
      raise TypeError(f"Unknown token id argument(s) {sorted(unknown)}; a preset "
                      f"takes vocab_size and {sorted(QWEN3_5_TOKEN_IDS)}.")
    ids = {**QWEN3_5_TOKEN_IDS, **token_ids}
    outside = {k: v for k, v in ids.items() if not 0 <= v < vocab_size}
    if outside:
      raise ValueError(
          f"Token ids {outside} lie outside the vocabulary of {vocab_size}: pass "
          "the tokenizer's own ids with its vocab_size (the defaults are "
          "Qwen3.5's).")
    text_config = Qwen3_5TextConfig(vocab_size=vocab_size, **text)
    return cls(text=text_config,
               vision=Qwen3_5VisionConfig(out_hidden_size=text_config.hidden_size,
                                          **vision),
               tie_word_embeddings=True, **ids)

  # --- Hugging Face config.json ---------------------------------------------------

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
