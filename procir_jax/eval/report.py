"""Evaluation outputs: results.json, a readable table, and the embeddings.

`write_report(out_dir, results, data)` writes

  results.json            the release's keys: <Dataset>_R@1/5/10 and
                          Average_R@5/10 (exact search), nothing else
  results_details.json    counts per dataset (gallery, documents, reused
                          sources, queries, evaluated, dropped), every
                          backend's recall and hits, the ScaNN top-10 overlap
                          with exact search and the ScaNN settings
  results.txt             the table that is also printed
  report.html             the table with chance levels, recall@k curves and
                          example queries with their views (report_page.py)
  embeddings/<dataset>.npz
                          gallery_ids, gallery, source_ids, target_ids, q, s
                          (float32 vectors as encoded, before normalisation),
                          skipped (encoder skip messages), texts (the queries'
                          modification texts; empty when not recorded, and
                          absent from older files, which still load)

and `recompute(out_dir)` evaluates those npz files again, so anyone holding the
directory can check the numbers:

  results = report.recompute("workdir/eval")
  assert results.results_json() == json.load(open("workdir/eval/results.json"))
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from procir_jax import files
from procir_jax.eval import recall
from procir_jax.eval.pages import report_page

RESULTS_FILE = "results.json"
DETAILS_FILE = "results_details.json"
TABLE_FILE = "results.txt"
HTML_FILE = "report.html"
EMBEDDINGS_DIR = "embeddings"
NPZ_FORMAT_VERSION = 1
_NPZ_KEYS = ("gallery_ids", "gallery", "source_ids", "target_ids", "q", "s")


def _json_bytes(obj) -> bytes:
  def clean(x):
    # Strict JSON: NaN (a dataset without evaluable queries) becomes null.
    if isinstance(x, float) and math.isnan(x):
      return None
    if isinstance(x, dict):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  return (json.dumps(clean(obj), indent=2, allow_nan=False) + "\n").encode()


def write_json(path, obj) -> str:
  path = os.fspath(path)
  files.write_atomically(path, lambda f: f.write(_json_bytes(obj)))
  return path


def save_embeddings(path, data: recall.DatasetEmbeddings) -> str:
  """Writes one dataset's embeddings and ids to an .npz file (no pickles)."""
  path = os.fspath(path)
  arrays = dict(
      format_version=np.asarray(NPZ_FORMAT_VERSION),
      dataset=np.asarray(data.dataset),
      gallery_ids=np.asarray(data.gallery_ids, dtype=str),
      gallery=np.asarray(data.gallery, np.float32),
      source_ids=np.asarray(data.source_ids, dtype=str),
      target_ids=np.asarray(data.target_ids, dtype=str),
      q=np.asarray(data.q, np.float32),
      s=np.asarray(data.s, np.float32),
      skipped=np.asarray(data.skipped, dtype=str),
      texts=np.asarray(data.texts, dtype=str))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  files.write_atomically(path, lambda f: np.savez(f, **arrays))
  return path


def load_embeddings(path) -> recall.DatasetEmbeddings:
  """Reads what `save_embeddings` wrote."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: expected an embeddings "
                            "file written by report.save_embeddings")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable .npz file ({e})") from e
  missing = [k for k in ("dataset",) + _NPZ_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"{path} lacks arrays {missing}")
  version = int(arrays.get("format_version", 0))
  if version != NPZ_FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {version}; this code reads "
                     f"{NPZ_FORMAT_VERSION}")
  try:
    return recall.DatasetEmbeddings(
        dataset=str(arrays["dataset"]),
        skipped=arrays.get("skipped", np.zeros(0, str)).tolist(),
        texts=arrays.get("texts", np.zeros(0, str)).tolist(),
        **{k: arrays[k] for k in _NPZ_KEYS})
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def embeddings_dir(directory) -> str:
  """The folder holding the npz files: `directory/embeddings` or itself."""
  directory = os.fspath(directory)
  sub = os.path.join(directory, EMBEDDINGS_DIR)
  return sub if os.path.isdir(sub) else directory


def load_embeddings_dir(directory) -> list[recall.DatasetEmbeddings]:
  """Every `<dataset>.npz` under `directory` (or its embeddings/ folder)."""
  folder = embeddings_dir(directory)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} does not exist: expected an evaluation "
                            f"directory with {EMBEDDINGS_DIR}/<dataset>.npz")
  files = sorted(f for f in os.listdir(folder) if f.endswith(".npz"))
  if not files:
    raise FileNotFoundError(f"no <dataset>.npz files in {folder}")
  return [load_embeddings(os.path.join(folder, f)) for f in files]


def _fmt(x, width=7) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-".rjust(width)
  return f"{x:{width}.2f}"


def format_table(results: recall.EvalResults) -> str:
  """A plain-text table of recall and counts, ScaNN below exact search."""
  lines = []
  header = (f"{'Dataset':<16}{'R@1':>7}{'R@5':>8}{'R@10':>8}   "
            f"{'queries':>8}{'dropped':>8}{'gallery':>9}{'reused':>8}")
  backends = results.backends
  if "exact" in backends:
    lines += ["Exact search (cosine)", header, "-" * len(header)]
    for d in results.datasets:
      r = d.recall["exact"]
      lines.append(f"{d.name:<16}{_fmt(r.get(1))}{_fmt(r.get(5), 8)}"
                   f"{_fmt(r.get(10), 8)}   {d.num_evaluated:>8}"
                   f"{d.num_dropped:>8}{d.num_gallery:>9}"
                   f"{d.num_reused_sources:>8}")
    lines.append(f"{'Average':<16}{'':>7}{_fmt(results.average(5), 8)}"
                 f"{_fmt(results.average(10), 8)}")
  if "scann" in backends:
    header = (f"{'Dataset':<16}{'R@1':>7}{'R@5':>8}{'R@10':>8}   "
              f"{'R@10/exact':>10}{'top10 overlap':>15}  mode")
    lines += ["", "ScaNN", header, "-" * len(header)]
    for d in results.datasets:
      r = d.recall["scann"]
      exact = d.recall.get("exact", {}).get(10)
      share = r[10] / exact if exact else None
      share = "-" if share is None else f"{100 * share:.1f}%"
      overlap = ("-" if d.scann_overlap is None
                 else f"{100 * d.scann_overlap:.1f}%")
      mode = (d.scann_settings or {}).get("mode", "")
      lines.append(f"{d.name:<16}{_fmt(r.get(1))}{_fmt(r.get(5), 8)}"
                   f"{_fmt(r.get(10), 8)}   {share:>10}{overlap:>15}  {mode}")
    lines.append(f"{'Average':<16}{'':>7}{_fmt(results.average(5, 'scann'), 8)}"
                 f"{_fmt(results.average(10, 'scann'), 8)}")
  for d in results.datasets:
    if d.skipped:
      lines.append(f"{d.name}: {len(d.skipped)} examples skipped by the "
                   f"encoder (listed in {DETAILS_FILE})")
  if results.without_queries:
    lines += ["", "Left out, nothing to evaluate in this data: "
              + ", ".join(recall.display_name(n) for n in results.without_queries)]
  return "\n".join(lines)


def write_html(out_dir, results: recall.EvalResults,
               data: Iterable[recall.DatasetEmbeddings] | None = None,
               views: report_page.DatasetViews | None = None,
               **options) -> str:
  """Writes report.html (see report_page.render for `views` and `options`)."""
  path = os.path.join(os.fspath(out_dir), HTML_FILE)
  page = report_page.render(results, data, views, **options)
  files.write_atomically(path, lambda f: f.write(page.encode()))
  return path


def write_report(out_dir, results: recall.EvalResults,
                 data: Iterable[recall.DatasetEmbeddings] | Mapping[str, Any]
                 | None = None, *, echo: bool = True,
                 views: report_page.DatasetViews | None = None
                 ) -> dict[str, Any]:
  """Writes results.json, results_details.json, results.txt, the npz files
  and report.html.

  Args:
    out_dir: output directory (created if needed).
    results: from `recall.evaluate`.
    data: the embeddings behind `results`, saved to embeddings/<dataset>.npz
      (left out if None; the page's examples need them).
    echo: print the table.
    views: dataset -> its product views, for the page (None: ids only).

  Returns:
    {"results": path, "details": path, "table": path, "html": path,
     "embeddings": [paths]}.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths: dict[str, Any] = {"embeddings": []}
  if isinstance(data, Mapping):
    data = [recall.DatasetEmbeddings.coerce(k, v) for k, v in data.items()]
  data = list(data or ())
  for item in data:
    paths["embeddings"].append(save_embeddings(
        os.path.join(out_dir, EMBEDDINGS_DIR, f"{item.dataset}.npz"), item))
  backend = "exact" if "exact" in results.backends else results.backends[0]
  paths["results"] = write_json(os.path.join(out_dir, RESULTS_FILE),
                                results.results_json(backend))
  details = results.details()
  details["results_json_backend"] = backend
  paths["details"] = write_json(os.path.join(out_dir, DETAILS_FILE), details)
  table = format_table(results)
  paths["table"] = os.path.join(out_dir, TABLE_FILE)
  files.write_atomically(paths["table"], lambda f: f.write((table + "\n").encode()))
  if echo:
    print(table)
  # Last: the numbers are on disk even if a product's views fail to render.
  paths["html"] = write_html(out_dir, results, data, views)
  return paths


def evaluate_and_write(out_dir, data: Sequence[recall.DatasetEmbeddings]
                       | Mapping[str, Any],
                       backends: Sequence[str] = ("exact", "scann"),
                       scann_settings=None, echo: bool = True,
                       views: report_page.DatasetViews | None = None
                       ) -> recall.EvalResults:
  """`recall.evaluate` then `write_report`, embeddings included."""
  if isinstance(data, Mapping):
    data = [recall.DatasetEmbeddings.coerce(k, v) for k, v in data.items()]
  data = list(data)
  results = recall.evaluate(data, backends=backends,
                            scann_settings=scann_settings)
  write_report(out_dir, results, data, echo=echo, views=views)
  return results


def recompute(directory, backends: Sequence[str] = ("exact",),
              scann_settings=None) -> recall.EvalResults:
  """Evaluates the npz files of an evaluation directory again."""
  return recall.evaluate(load_embeddings_dir(directory), backends=backends,
                         scann_settings=scann_settings)
