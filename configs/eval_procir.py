"""The released evaluation protocol on a ProCIR (or Qwen3.5) checkpoint directory.

  python -m procir_jax.main --config=configs/eval_procir.py --workdir=runs/eval_procir \
      --config.model.hf_dir=/path/to/ProCIR-0.8B \
      --config.data.manual_dir=/path/to/FashionMV

Encodes each dataset's validation gallery (every product of its validation triplets,
as a product document, views capped at 5) and its queries (two-stage dialogue, short
modification text, empty think blocks), then writes <workdir>/eval/results.json, the
printed table and <workdir>/eval/embeddings/<dataset>.npz. The released ProCIR 0.8B
checkpoint gives R@5 / R@10: DeepFashion 89.2 / 95.1, Fashion200K 77.6 / 86.6,
FashionGen-val 75.0 / 85.3 (average 80.6 / 89.0).
"""

from configs import procir_0_8b


def get_config():
  c = procir_0_8b.get_config()
  c.mode = "eval"
  c.eval.backends = ("exact",)  # the released protocol searches exactly
  return c
