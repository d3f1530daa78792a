"""tools/build_index.py and tools/search.py on a small synthetic run."""

import pathlib
import subprocess
import sys

import numpy as np

from configs import base
from procir_jax import provision

REPO = pathlib.Path(__file__).parents[1]
OVERRIDES = ["--config.model.tiny_preset=test", "--config.data.max_views=2",
             "--config.eval.max_views=2",
             "--config.data.synthetic.train_products=6",
             "--config.data.synthetic.train_triplets=6",
             "--config.data.synthetic.val_products=6",
             "--config.data.synthetic.val_triplets=6",
             "--config.data.synthetic.image_size=48"]


def _run(args):
  result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_index_then_search_writes_a_page(tmp_path):
  config = base.get_config()
  for flag in OVERRIDES:  # the same workdir the tools will find
    key, value = flag[len("--config."):].split("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  paths = provision.prepare(config, str(tmp_path))
  common = ["--config=configs/base.py", f"--workdir={tmp_path}", *OVERRIDES]
  out = _run(["tools/build_index.py", *common, "--source=deepfashion",
              f"--out={tmp_path / 'index'}"])
  assert "Indexed" in out and (tmp_path / "index").is_dir()

  from procir_jax.data import fashionmv
  products = fashionmv.Products(paths.data_dir, "validation")
  query = next(k for k in products.keys() if k[0] == "deepfashion")[1]
  out = _run(["tools/search.py", *common, f"--index={tmp_path / 'index'}",
              "--source=deepfashion", f"--product_id={query}", "--text=make it blue",
              "--k=3", f"--out={tmp_path / 'page'}"])
  ranked = [line.split()[-1] for line in out.splitlines() if line.strip()[:2] in
            ("1.", "2.", "3.")]
  assert len(ranked) == 3 and all(("deepfashion", r) in products for r in ranked)
  html = (tmp_path / "page" / "results.html").read_text()
  assert "make it blue" in html and ranked[0] in html
  for src in html.split('src="')[1:]:
    assert (tmp_path / "page" / src.split('"')[0]).exists()
  png = tmp_path / "page" / "results.png"
  from PIL import Image
  with Image.open(png) as image:
    assert image.size[0] > 200 and np.asarray(image).std() > 0
