"""Builds a gallery search index (ScaNN or exact) that tools/search.py can query.

From embeddings an evaluation or `--config.mode=embed` wrote:

  python tools/build_index.py --embeddings=workdir/base/eval/embeddings/deepfashion.npz \
      --out=workdir/base/index/deepfashion

Or from a model and the products of a split (every source, or one):

  python tools/build_index.py --config=configs/base.py --workdir=workdir/base \
      --split=validation --source=deepfashion --out=workdir/base/index/deepfashion

The index directory holds the searcher's files and the product ids with relative
paths only, so it can be copied anywhere and loaded there.
"""

import sys

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from procir_jax.eval import search

_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "An embeddings/<dataset>.npz.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (to "
                                          "encode the products with a model).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (model, data, "
                               "checkpoints).")
_SPLIT = flags.DEFINE_string("split", "validation", "Products split to index.")
_SOURCE = flags.DEFINE_string("source", None, "Only this source (deepfashion, f200k, "
                              "fashiongen); ids are only unique within a source.")
_OUT = flags.DEFINE_string("out", None, "Index directory to write.", required=True)
_BACKEND = flags.DEFINE_enum("backend", "scann", ["scann", "exact"], "Searcher.")


def _from_model():
  from procir_jax import factories, modes
  from procir_jax.data import fashionmv, pipeline
  from procir_jax.eval import encode as encode_lib

  config = _CONFIG.value
  paths, mesh, graphdef, params = modes.load_trained(config, _WORKDIR.value)
  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir, mesh=mesh)
  products = fashionmv.Products(paths.data_dir, _SPLIT.value)
  keys = [k for k in products.keys() if _SOURCE.value in (None, k[0])]
  records = products.select(keys)
  docs, skipped = encode_lib.Encoder(graphdef, mesh).run(
      params, pipeline.make_loader("gallery", dcfg, records, train=False),
      "products", len(keys))
  for message in skipped:
    print(f"skipped: {message}", file=sys.stderr)
  order = sorted(docs)
  ids = [keys[i][1] if _SOURCE.value else f"{keys[i][0]}/{keys[i][1]}" for i in order]
  return np.stack([docs[i][0] for i in order]), ids


def main(argv):
  del argv
  if _EMBEDDINGS.value:
    with np.load(_EMBEDDINGS.value) as data:
      embeddings, ids = data["gallery"], [str(i) for i in data["gallery_ids"]]
  elif _CONFIG.value is not None and _WORKDIR.value:
    embeddings, ids = _from_model()
  else:
    raise app.UsageError("Pass --embeddings=<npz>, or --config and --workdir.")
  index = search.build_index(embeddings, ids, backend=_BACKEND.value)
  path = index.save(_OUT.value)
  print(f"Indexed {len(ids)} products ({embeddings.shape[1]}-d, {_BACKEND.value}) "
        f"in {path}")


if __name__ == "__main__":
  app.run(main)
