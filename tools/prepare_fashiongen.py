"""Extracts FashionGen images from its h5 files into FashionMV's image folders.

  python tools/prepare_fashiongen.py --h5=fashiongen_256_256_validation.h5 \
      --out_dir=<manual_dir>/images/fashiongen_val
  python tools/prepare_fashiongen.py --h5=fashiongen_256_256_train.h5 \
      --out_dir=<manual_dir>/images/fashiongen_train

Each h5 row becomes `<out_dir>/<product_id>/<row>.jpg`, the same tree and the same
bytes as the release's own extraction tool. Rerunning after an interruption skips the
files already written.
"""

from absl import app, flags

from tfds_fashionmv import fashiongen

_H5 = flags.DEFINE_string("h5", None, "A FashionGen h5 file.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "images/fashiongen_{train,val}.",
                               required=True)
_QUALITY = flags.DEFINE_integer("quality", 95, "JPEG quality (the release uses 95).")


def main(argv):
  del argv
  counts = fashiongen.extract(_H5.value, _OUT_DIR.value, quality=_QUALITY.value)
  print(f"{counts.rows} rows, {counts.products} products: {counts.written} images "
        f"written, {counts.already_there} already there, in {_OUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)
