"""Writes a synthetic FashionMV in the release layout (data/*.jsonl + images/).

  python tools/make_synthetic_fashionmv.py --out_dir=workdir/fashionmv_release

Then build it with TFDS like the real release:

  tfds build fashionmv --imports=tfds_fashionmv \
      --manual_dir=workdir/fashionmv_release --data_dir=workdir/tfds
"""

import time

from absl import app, flags

from tfds_fashionmv import synthetic

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the release.",
                               required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; same seed, same bytes.")
_TRAIN_PRODUCTS = flags.DEFINE_integer(
    "train_products", 120, "Initial training products per source.")
_TRAIN_TRIPLETS = flags.DEFINE_integer(
    "train_triplets", 200, "Training triplets per source.")
_VAL_PRODUCTS = flags.DEFINE_integer(
    "val_products", 40, "Initial validation products per source.")
_VAL_TRIPLETS = flags.DEFINE_integer(
    "val_triplets", 60, "Validation triplets per source.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Side of each view in pixels.")


def main(argv):
  del argv
  start = time.perf_counter()
  counts = synthetic.generate(_OUT_DIR.value, synthetic.SyntheticConfig(
      seed=_SEED.value, train_products=_TRAIN_PRODUCTS.value,
      train_triplets=_TRAIN_TRIPLETS.value, val_products=_VAL_PRODUCTS.value,
      val_triplets=_VAL_TRIPLETS.value, image_size=_IMAGE_SIZE.value))
  print(f"Synthetic FashionMV in {_OUT_DIR.value} "
        f"({time.perf_counter() - start:.1f}s):")
  for name, count in counts.items():
    print(f"  {name:22s} {count}")


if __name__ == "__main__":
  app.run(main)
