"""Searches a product gallery with a composed query and shows the results.

  python tools/search.py --config=configs/base.py --workdir=workdir/base \
      --index=workdir/base/index/deepfashion --source=deepfashion \
      --product_id='WOMEN/Dresses/id_00500012/05' --text='make it blue and striped' \
      --out=workdir/base/search

The query is a product (its views from the TFDS products split) or a folder of images
(`--image_dir`), plus a modification text. Prints the top-k product ids with scores and
writes results.html and results.png (query views, text, and the retrieved products'
views with rank and score) into --out.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from procir_jax import factories, modes
from procir_jax.data import examples, fashionmv, pipeline
from procir_jax.eval import encode as encode_lib
from procir_jax.eval import search
from procir_jax.eval.pages import results_page

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_INDEX = flags.DEFINE_string("index", None, "Index dir from tools/build_index.py.",
                             required=True)
_TEXT = flags.DEFINE_string("text", None, "Modification text.", required=True)
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "Folder of the query's views.")
_PRODUCT_ID = flags.DEFINE_string("product_id", None, "Query product id (source/id "
                                   "when --source is not given).")
_SOURCE = flags.DEFINE_string("source", None, "The index's source dataset, when it was "
                              "built for one (deepfashion, f200k, fashiongen).")
_SPLIT = flags.DEFINE_string("split", "validation",
                             "Products split to read views from.")
_K = flags.DEFINE_integer("k", 10, "Results to show.")
_OUT = flags.DEFINE_string("out", "search_results", "Where to write the page.")

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _key(product_id: str) -> tuple[str, str]:
  """(source, id) of an index entry: ids are plain with --source, else source/id."""
  if _SOURCE.value:
    return _SOURCE.value, product_id
  source, _, rest = product_id.partition("/")
  return source, rest


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("Pass --config (the config the model was trained with).")
  if bool(_IMAGE_DIR.value) == bool(_PRODUCT_ID.value):
    raise app.UsageError("Give the query as --image_dir or as --product_id.")
  config = _CONFIG.value
  paths, mesh, graphdef, params = modes.load_trained(config, _WORKDIR.value)
  dcfg = factories.eval_data_config(config, data_dir=paths.data_dir,
                                    model_dir=paths.model_dir, batch_size=1)
  builder, _ = pipeline.make_builder(dcfg)
  products = fashionmv.Products(paths.data_dir, _SPLIT.value)

  def views(product_id):
    key = _key(product_id)
    if key not in products:
      return []
    return [examples.decode_image(v, f"product {product_id!r}")
            for v in products.get(key).views]

  if _IMAGE_DIR.value:
    files = sorted(p for p in pathlib.Path(_IMAGE_DIR.value).iterdir()
                   if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
      raise app.UsageError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) in "
                           f"{_IMAGE_DIR.value}.")
    query_views = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    source_id = None
  else:
    query_views = views(_PRODUCT_ID.value)
    if not query_views:
      raise app.UsageError(f"Product {_PRODUCT_ID.value!r} is not in fashionmv/"
                           f"products {_SPLIT.value} (source {_SOURCE.value}).")
    source_id = _PRODUCT_ID.value
  q = encode_lib.embed_query(encode_lib.Encoder(graphdef, mesh), params, builder,
                             query_views, _TEXT.value, dcfg.buckets)
  index = search.load_index(_INDEX.value)
  print(f"Index: {index.describe()}")
  ids, scores = index.search_ids(q[None], k=_K.value)
  print(f"Query: {source_id or _IMAGE_DIR.value} + {_TEXT.value!r}")
  for rank, (pid, score) in enumerate(zip(ids[0], scores[0]), start=1):
    if pid is not None:
      print(f"  {rank:3d}. {score:7.4f}  {pid}")
  written = results_page.write_results_page(
      _OUT.value, query_views, _TEXT.value, ids[0], scores[0], views,
      source_id=source_id, max_views=config.data.max_views)
  print(f"Wrote {written['html']} and {written['png']}")


if __name__ == "__main__":
  app.run(main)
