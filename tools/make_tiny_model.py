"""Writes a small random Qwen3.5 model directory, made offline.

  python tools/make_tiny_model.py --out_dir=workdir/tiny_model --preset=small

The directory has what a Qwen3.5 checkpoint has (config.json, model.safetensors,
tokenizer files with the Qwen special tokens and <emb_all>, a chat template and
preprocessor_config.json), so the same loading code serves both.
"""

from absl import app, flags

from procir_jax import tiny_model

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the model.",
                               required=True)
_PRESET = flags.DEFINE_enum(
    "preset", "tiny", sorted(tiny_model.PRESETS),
    "Model shape, Qwen3_5Config's preset of this name: test (quickest to compile), "
    "tiny (tests) or small (the embedded default's demo model).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the tokenizer corpus and weights.")


def main(argv):
  del argv
  out = tiny_model.write_model_dir(_OUT_DIR.value, _PRESET.value, _SEED.value)
  print(f"Wrote a {_PRESET.value} Qwen3.5 model directory to {out}:")
  for path in sorted(out.iterdir()):
    print(f"  {path.name:28s} {path.stat().length:>12,d} bytes")


if __name__ == "__main__":
  app.run(main)
