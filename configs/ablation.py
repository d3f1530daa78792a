"""The paper's ablation: one config per combination of ProCIR's four mechanisms.

  python -m procir_jax.main \
      --config=configs/ablation.py:two_stage=1,align=1,cot=0,sft=1 \
      --workdir=workdir/ablation_1101

Each switch is 0 or 1 (all four must be given): two_stage (two-stage dialogue, else a
single user turn with views and text), align (caption-based alignment), cot
(chain-of-thought reasoning in the think blocks), sft (an SFT captioning stage before
contrastive training). Everything else is configs/base.py, so on the embedded default
each combination trains in minutes on CPU; point `model.hf_dir` and `data.manual_dir`
at real data (as in configs/procir_0_8b.py) to reproduce the paper's table.
"""

import itertools

from configs import base

SWITCHES = ("two_stage", "align", "cot", "sft")


def parse(arg: str) -> dict[str, bool]:
  values = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in SWITCHES or value not in ("0", "1"):
      raise ValueError(f"Bad ablation setting {item!r}: expected {','.join(SWITCHES)} "
                       f"each =0 or =1, e.g. two_stage=1,align=1,cot=0,sft=1.")
    values[key] = value == "1"
  if set(values) != set(SWITCHES):
    raise ValueError(f"Give all four switches ({', '.join(SWITCHES)}); got "
                     f"{sorted(values)}.")
  return values


def all_settings() -> list[str]:
  """The 16 config arguments, e.g. 'two_stage=1,align=0,cot=1,sft=0'."""
  return [",".join(f"{k}={int(v)}" for k, v in zip(SWITCHES, bits))
          for bits in itertools.product((1, 0), repeat=4)]


def get_config(arg: str = "two_stage=1,align=1,cot=1,sft=1"):
  config = base.get_config()
  config.procir.update(parse(arg))
  return config
