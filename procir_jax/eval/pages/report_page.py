"""The evaluation's results page, eval/report.html, beside results.json.

One self-contained file (inline SVG, images as data URIs) with

- the recall table of results.txt (exact search; ScaNN below it when it was
  evaluated) with each dataset's chance level: the recall@k of a uniformly
  random ranking of its gallery, 100 * min(k, G) / G for a gallery of G rows
  (documents plus reused sources), as `recall.chance_recall` computes it;
- recall@k curves for k = 1..50, one chart per dataset, one line per search
  backend, with the chance line;
- example queries per dataset, ranked by exact search: the best-ranked, the
  worst-ranked and a few drawn at random (seeded, so the same page comes out
  every time), each with its source views, modification text, top 5 results
  with scores and the target marked (shown below them when it ranks lower).

Product views come from a view source per dataset, e.g.
`product_views(fashionmv.Products(data_dir, "validation"))`. Without one the
page shows products by id and says so, as when it is written again from the
npz files alone:

  results = report.recompute("workdir/eval")
  report.write_html("workdir/eval", results,
                    report.load_embeddings_dir("workdir/eval"))
"""

from __future__ import annotations

import dataclasses
import html
import math
import zlib
from typing import Callable, Iterable, Mapping, Union

import numpy as np

from procir_jax.eval import recall
from procir_jax.eval.pages import results_page

TOP = 5
CURVE_K = recall.CURVE_DEPTH
BACKEND_NAMES = {"exact": "Exact search", "scann": "ScaNN"}
_COLOURS = {"exact": "#0d6efd", "scann": "#fd7e14"}
_DASHES = {"exact": "", "scann": "6 4"}

# Dataset key -> the dataset's view source (product id -> views).
DatasetViews = Union[Mapping[str, results_page.ViewSource],
                     Callable[[str], Union[results_page.ViewSource, None]]]

_CSS = """
h2 { font-size: 18px; margin: 32px 0 8px; }
h3 { font-size: 16px; margin: 24px 0 8px; }
table.recall { border-collapse: collapse; margin: 8px 0 16px;
               font-variant-numeric: tabular-nums; }
table.recall th, table.recall td { padding: 4px 10px; text-align: right;
                                   border-bottom: 1px solid #e2e5e9; }
table.recall th:first-child, table.recall td:first-child { text-align: left; }
table.recall td.chance, table.recall th.chance { color: #6c757d; }
table.recall tr.average td { font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.charts svg { background: #fff; border: 1px solid #e2e5e9; border-radius: 6px; }
.note { background: #fff3cd; border-radius: 6px; padding: 8px 12px;
        font-size: 14px; }
.example { border: 1px solid #e2e5e9; border-radius: 8px; padding: 12px;
           margin-bottom: 20px; }
.example .query { margin-bottom: 8px; }
.kind { display: inline-block; padding: 1px 8px; border-radius: 10px;
        color: #fff; background: #495057; margin-right: 6px; }
.kind.best { background: #198754; } .kind.worst { background: #dc3545; }
.gap { color: #6c757d; padding: 6px 12px; }
"""


def product_views(products) -> Callable[[str], results_page.ViewSource]:
  """Views from a `fashionmv.Products` (any object with `(source, id) in` and
  `.get((source, id)).views`): dataset -> product id -> encoded views."""
  def for_dataset(dataset: str):
    def views(product_id: str):
      key = (dataset, product_id)
      return products.get(key).views if key in products else []
    return views
  return for_dataset


def recall_curve(rankings: recall.Rankings, backend: str,
                 max_k: int = CURVE_K) -> list[float]:
  """Recall@k in percent for k = 1..max_k, rounded as the table is."""
  ks = range(1, max_k + 1)
  hits = recall.hits_at_k(rankings.rows[backend], rankings.targets, ks)
  return [recall.recall_percent(hits[k], len(rankings.targets)) for k in ks]


@dataclasses.dataclass
class Example:
  """One query shown on the page.

  Attributes:
    kind: "best", "worst" or "random".
    backend: the backend that ranked it.
    query: the query's row in the dataset's arrays (and its npz file).
    source_id, target_id, text: the query.
    rank: the target's rank over the whole gallery by the ranking backend.
    target_score: the target's score.
    ids, scores: the top results.
    ranks: backend -> the target's rank within the kept depth (0: beyond it).
  """

  kind: str
  backend: str
  query: int
  source_id: str
  target_id: str
  text: str
  rank: int
  target_score: float
  ids: list[str]
  scores: list[float]
  ranks: dict[str, int]


def _ranking_backend(rankings: recall.Rankings | None) -> str:
  if rankings is None or not rankings.rows:
    return ""
  return "exact" if "exact" in rankings.rows else next(iter(rankings.rows))


def _target_ranks(g: recall.EvalGallery, rankings: recall.Rankings,
                  backend: str) -> tuple[np.ndarray, np.ndarray]:
  """Each target's rank over the whole gallery and its score.

  Within the kept depth both come from the search itself; beyond it they are
  counted here (ties rank the lower gallery row first, as in search), never
  above the depth the search saw.
  """
  ranks = rankings.target_ranks(backend)
  rows, scores = rankings.rows[backend], rankings.scores[backend]
  found = ranks > 0
  target_scores = np.zeros(len(ranks), np.float32)
  target_scores[found] = scores[found, ranks[found] - 1]
  missing = np.flatnonzero(~found)
  order = np.arange(len(g.ids))
  for start in range(0, len(missing), 1024):  # bounded memory on big galleries
    part = missing[start:start + 1024]
    targets = g.targets[part]
    sims = g.queries[part] @ g.vectors.T
    own = sims[np.arange(len(part)), targets][:, None]
    ahead = (sims > own) | ((sims == own) & (order[None] < targets[:, None]))
    ranks[part] = np.maximum(ahead.sum(axis=1) + 1, rows.shape[1] + 1)
    target_scores[part] = own[:, 0]
  return ranks, target_scores


def pick_examples(data: recall.DatasetEmbeddings, result: recall.DatasetResult,
                  *, best: int = 1, worst: int = 1, random: int = 3,
                  seed: int = 0, top: int = TOP) -> list[Example]:
  """The dataset's best- and worst-ranked queries and `random` others.

  Ranked by exact search (the first backend without it). Ties in rank go to
  the higher target score for "best", the lower for "worst", then to the
  earlier query. The random draw depends only on `seed` and the dataset.
  """
  rankings = result.rankings
  if rankings is None or not len(rankings.targets):
    return []
  g = recall.assemble(data)
  if g.ids != rankings.gallery_ids:
    raise ValueError(f"{data.name}: the embeddings give another gallery than "
                     "the results were computed on")
  backend = _ranking_backend(rankings)
  ranks, target_scores = _target_ranks(g, rankings, backend)
  index = np.arange(len(ranks))
  orders = {"best": np.lexsort((index, -target_scores, ranks)),
            "worst": np.lexsort((index, target_scores, -ranks))}
  chosen: list[tuple[str, int]] = []
  taken: set[int] = set()
  for kind, count in (("best", best), ("worst", worst)):
    # With few queries the best can also be the worst: show it once.
    picked = [i for i in orders[kind].tolist() if i not in taken][:count]
    chosen += [(kind, i) for i in picked]
    taken.update(picked)
  rest = [i for i in index.tolist() if i not in taken]
  rng = np.random.default_rng([seed, zlib.crc32(data.dataset.encode())])
  draw = rng.choice(len(rest), size=min(random, len(rest)), replace=False)
  chosen += [("random", rest[j]) for j in sorted(draw.tolist())]

  by_backend = {b: rankings.target_ranks(b) for b in rankings.rows}
  examples = []
  for kind, i in chosen:
    row = int(rankings.query_rows[i])
    top_rows = rankings.rows[backend][i, :top]
    keep = top_rows >= 0
    examples.append(Example(
        kind=kind, backend=backend, query=row, source_id=data.source_ids[row],
        target_id=data.target_ids[row],
        text=data.texts[row] if data.texts else "", rank=int(ranks[i]),
        target_score=float(target_scores[i]),
        ids=[g.ids[r] for r in top_rows[keep]],
        scores=rankings.scores[backend][i, :top][keep].tolist(),
        ranks={b: int(r[i]) for b, r in by_backend.items()}))
  return examples


def _pct(x: float | None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  # Chance on big galleries is far below 0.01%: keep its digits.
  return f"{x:.2f}" if x == 0 or abs(x) >= 0.1 else f"{x:.2g}"


def table_html(results: recall.EvalResults, backend: str) -> str:
  """One backend's recall table; cells carry their results.json keys."""
  esc = html.escape
  ks = results.ks
  head = ("<tr><th>Dataset</th>" + "".join(f"<th>R@{k}</th>" for k in ks)
          + "".join(f'<th class="chance">chance R@{k}</th>' for k in ks)
          + "<th>queries</th><th>dropped</th><th>gallery</th></tr>")
  rows = []
  for d in results.datasets:
    cells = "".join(
        f'<td data-key="{esc(d.name)}_R@{k}">{_pct(d.recall[backend][k])}</td>'
        for k in ks)
    chance = "".join(
        f'<td class="chance" data-chance="{k}">'
        f"{_pct(recall.chance_recall(k, d.num_gallery))}</td>" for k in ks)
    rows.append(f'<tr data-dataset="{esc(d.dataset)}"><td>{esc(d.name)}</td>'
                f"{cells}{chance}<td>{d.num_evaluated}</td>"
                f"<td>{d.num_dropped}</td><td>{d.num_gallery}</td></tr>")
  averaged = [k for k in recall.AVERAGED_KS if k in ks]
  avg = "".join(
      f'<td data-key="Average_R@{k}">{_pct(results.average(k, backend))}</td>'
      if k in averaged else "<td></td>" for k in ks)

  def mean_chance(k):
    if k not in averaged or not results.datasets:
      return ""
    return _pct(float(np.mean([recall.chance_recall(k, d.num_gallery)
                               for d in results.datasets])))
  avg_chance = "".join(f'<td class="chance">{mean_chance(k)}</td>' for k in ks)
  rows.append(f'<tr class="average"><td>Average</td>{avg}{avg_chance}'
              "<td></td><td></td><td></td></tr>")
  return (f'<table class="recall" data-backend="{esc(backend)}"><thead>{head}'
          f"</thead><tbody>{''.join(rows)}</tbody></table>")


def curves_svg(result: recall.DatasetResult, max_k: int = CURVE_K) -> str:
  """Recall@k against k for each backend, and the chance line, as SVG."""
  esc = html.escape
  width, height = 400, 270
  # The legend sits in a row under the title, clear of the curves.
  left, right, top, bottom = 44, 12, 48, 36
  plot_w, plot_h = width - left - right, height - top - bottom

  def x(k):
    return left + plot_w * (k - 1) / max(max_k - 1, 1)

  def y(v):
    return top + plot_h * (1 - v / 100)

  def points(values):
    return " ".join(f"{x(k):.1f},{y(v):.1f}"
                    for k, v in enumerate(values, start=1))

  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'data-dataset="{esc(result.dataset)}" font-size="11" '
           'font-family="sans-serif">',
           f"<title>{esc(result.name)}: recall@k</title>",
           f'<text x="{left}" y="16" font-size="13" font-weight="600">'
           f"{esc(result.name)}</text>"]
  for v in (0, 25, 50, 75, 100):
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" '
                 f'y2="{y(v):.1f}" stroke="#e2e5e9"/>'
                 f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
                 f'fill="#6c757d">{v}%</text>')
  for k in sorted({1, 10, 20, 30, 40, max_k}):
    parts.append(f'<text x="{x(k):.1f}" y="{top + plot_h + 14}" '
                 f'text-anchor="middle" fill="#6c757d">{k}</text>')
  parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" '
               'text-anchor="middle" fill="#6c757d">k</text>')
  chance = [recall.chance_recall(k, result.num_gallery)
            for k in range(1, max_k + 1)]
  parts.append(f'<polyline class="chance" points="{points(chance)}" '
               'fill="none" stroke="#adb5bd" stroke-dasharray="2 3">'
               f"<title>chance: 100 * min(k, {result.num_gallery}) / "
               f"{result.num_gallery}</title></polyline>")
  legend = []
  backends = list(result.rankings.rows) if result.rankings else []
  for backend in backends:
    values = recall_curve(result.rankings, backend, max_k)
    colour = _COLOURS.get(backend, "#6f42c1")
    dash = _DASHES.get(backend, "")
    dash = f' stroke-dasharray="{dash}"' if dash else ""
    name = BACKEND_NAMES.get(backend, backend)
    summary = ", ".join(f"R@{k} {values[k - 1]:.2f}"
                        for k in (1, 5, 10, max_k) if k <= max_k)
    parts.append(
        f'<polyline class="curve" data-dataset="{esc(result.dataset)}" '
        f'data-backend="{esc(backend)}" '
        f'data-values="{",".join(f"{v:g}" for v in values)}" '
        f'points="{points(values)}" fill="none" stroke="{colour}" '
        f'stroke-width="2"{dash}><title>{esc(name)}: {summary}</title>'
        "</polyline>")
    for k in (1, 5, 10):
      if k <= max_k:
        parts.append(f'<circle cx="{x(k):.1f}" cy="{y(values[k - 1]):.1f}" '
                     f'r="3" fill="{colour}"><title>{esc(name)} R@{k} = '
                     f"{values[k - 1]:.2f}%</title></circle>")
    legend.append((name, f'stroke="{colour}" stroke-width="2"{dash}'))
  legend.append(("chance", 'stroke="#adb5bd" stroke-dasharray="2 3"'))
  lx = left
  for name, style in legend:
    parts.append(f'<line x1="{lx}" x2="{lx + 22}" y1="30" y2="30" {style}/>'
                 f'<text x="{lx + 27}" y="34">{esc(name)}</text>')
    lx += 40 + 7 * len(name)
  parts.append("</svg>")
  return "".join(parts)


class _CachedViews:
  """A dataset's view source whose images are decoded once per product."""

  def __init__(self, views: results_page.ViewSource):
    self._views, self._images = views, {}

  def __call__(self, product_id: str):
    if product_id not in self._images:
      self._images[product_id] = [results_page.to_image(v) for v in
                                  results_page.views_of(self._views, product_id)]
    return self._images[product_id]


def _example_html(ex: Example, dataset: str, views, store, stems: dict,
                  max_views: int) -> str:
  esc = html.escape

  def stem(pid):
    return stems.setdefault(pid, f"{dataset}_p{len(stems)}")

  others = "".join(
      f" &middot; {esc(BACKEND_NAMES.get(b, b))}: "
      + (f"rank {r}" if r else f"not in the top {CURVE_K}")
      for b, r in ex.ranks.items() if b != ex.backend)
  meta = (f'<span class="kind {esc(ex.kind)}">{esc(ex.kind)}</span>'
          f"query {ex.query} &middot; source {esc(ex.source_id)} &middot; "
          f"target {esc(ex.target_id)} &middot; target rank {ex.rank}{others}")
  query_row = results_page.load_row("Query", ex.source_id, None, views)
  parts = [f'<article class="example" data-dataset="{esc(dataset)}" '
           f'data-kind="{esc(ex.kind)}" data-query="{ex.query}" '
           f'data-source="{esc(ex.source_id)}" '
           f'data-target="{esc(ex.target_id)}" data-rank="{ex.rank}">',
           results_page.query_html(query_row, ex.text, store, max_views, meta,
                                stem=stem(ex.source_id))]
  if not ex.text:
    parts.append('<p class="meta">modification text not recorded with these '
                 "embeddings</p>")
  rows = results_page.result_rows(ex.ids, ex.scores, views,
                               target_id=ex.target_id, source_id=ex.source_id)
  parts += [results_page.row_html(r, stem(r.product_id), store, max_views)
            for r in rows]
  if ex.target_id not in ex.ids:
    target = results_page.load_row(f"#{ex.rank}", ex.target_id, ex.target_score,
                                views, "target")
    between = ex.rank - len(ex.ids) - 1
    parts.append(f'<div class="gap">&hellip; {between} more, then the target'
                 "</div>" if between else
                 '<div class="gap">then the target</div>')
    parts.append(results_page.row_html(target, stem(ex.target_id), store,
                                    max_views))
  parts.append("</article>")
  return "".join(parts)


def _views_for(views: DatasetViews | None, dataset: str):
  if views is None:
    return None
  if isinstance(views, Mapping):
    return views.get(dataset)
  return views(dataset)


def render(results: recall.EvalResults,
           data: Iterable[recall.DatasetEmbeddings] | None = None,
           views: DatasetViews | None = None, *, best: int = 1,
           worst: int = 1, random: int = 3, seed: int = 0, thumb: int = 80,
           max_views: int = 4, title: str = "ProCIR evaluation") -> str:
  """The page's HTML.

  Args:
    results: from `recall.evaluate` (its rankings give curves and examples).
    data: the embeddings behind `results` (examples need them).
    views: dataset -> its view source (a mapping or a callable); None: ids only.
    best, worst, random: examples per dataset of each kind.
    seed: seed of the random examples.
    thumb: view size in pixels.
    max_views: views shown per product.
    title: page heading.
  """
  esc = html.escape
  by_name = {d.dataset: d for d in data or ()}
  backends = results.backends
  body = [f'<p class="meta">{len(results.datasets)} datasets; search: '
          + ", ".join(BACKEND_NAMES.get(b, b) for b in backends)
          + ". results.json holds the exact search numbers.</p>",
          "<h2>Recall</h2>"]
  for backend in backends:
    body += [f"<h3>{esc(BACKEND_NAMES.get(backend, backend))}</h3>",
             table_html(results, backend)]
  body.append(
      '<p class="meta">Recall in percent: the share of evaluated queries whose '
      "target is among the top k. Chance R@k is the recall of a uniformly "
      "random ranking of the dataset's gallery, 100 &times; min(k, G) / G, "
      "where G is the gallery column (documents plus reused sources); its "
      "average is the mean over datasets.</p>")
  if results.without_queries:
    body.append('<p class="meta">Left out, nothing to evaluate in this data: '
                + esc(", ".join(recall.display_name(n)
                                for n in results.without_queries)) + "</p>")

  body.append(f"<h2>Recall@k, k = 1 to {CURVE_K}</h2>")
  charts = [curves_svg(d) for d in results.datasets if d.rankings is not None]
  body.append(f'<div class="charts">{"".join(charts)}</div>' if charts else
              '<p class="note">These results carry no rankings, so there are '
              "no curves.</p>")

  body.append("<h2>Example queries</h2>")
  if not by_name:
    body.append('<p class="note">The embeddings were not given to this page, '
                "so there are no examples.</p>")
  elif views is None:
    body.append('<p class="note">Product views were not given to this page '
                "(as when it is written from the embeddings alone), so "
                "products are shown by their ids.</p>")
  # Embedded images keep the page one file that can be moved or mailed.
  store = results_page.ImageStore("", "", thumb, embed=True)
  for d in results.datasets:
    item = by_name.get(d.dataset)
    if item is None:
      continue
    examples = pick_examples(item, d, best=best, worst=worst, random=random,
                             seed=seed)
    source = _views_for(views, d.dataset)
    backend = _ranking_backend(d.rankings)
    ranked_by = ("exact search" if backend == "exact"
                 else BACKEND_NAMES.get(backend, backend))
    body.append(f'<h3>{esc(d.name)}</h3><p class="meta">Ranked by '
                f"{esc(ranked_by)}; {len(examples)} of "
                f"{d.num_evaluated} evaluated queries; the random ones drawn "
                f"with seed {seed}.</p>")
    if views is not None and source is None:
      body.append('<p class="note">No product views for this dataset: '
                  "products are shown by their ids.</p>")
    cached = _CachedViews(source) if source is not None else None
    stems: dict[str, str] = {}
    for ex in examples:
      body.append(_example_html(ex, d.dataset, cached,
                                store if cached is not None else None, stems,
                                max_views))
  return results_page.page_html(title, body, thumb=thumb, css=_CSS)

