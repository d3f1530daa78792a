"""The FashionMV evaluation protocol, from embeddings to recall@k.

It follows the released ProCIR evaluation (`evaluate.py` of the FashionMV
release) step by step:

1. Each source dataset is evaluated on its own gallery.
2. The gallery starts as the products encoded as documents (every product that
   appears as a source or target in the dataset's validation triplets and has
   images), in the order given; a repeated id keeps its first embedding.
3. Source reuse: every query whose source product is not in the gallery adds
   that product once, represented by the query's two-stage source embedding s
   (from its first query), after the documents. All queries take part in this
   step, including those dropped in the next one.
4. Queries whose target is not in that gallery (documents plus reused sources)
   are left out and counted.
5. Every vector is L2-normalised; the score is the dot product (cosine). The
   source product stays in the gallery.
6. Recall@k is the share of queries whose target is among the top k (k capped
   at the gallery size). As released, the share is a float32 mean, reported in
   percent rounded to 2 decimals; the averages of R@5 and R@10 are taken over
   those rounded values, datasets in the release's order (sorted by its dataset
   keys), and rounded again.

Ties in score rank the lower gallery row first (the release leaves ties to
torch.topk). One difference from the release: galleries are kept per dataset,
so the same product id in two datasets cannot collide.

  data = [recall.DatasetEmbeddings("deepfashion", gallery_ids, gallery,
                                   source_ids, target_ids, q, s), ...]
  results = recall.evaluate(data)                 # exact and ScaNN
  results.results_json()  # {"DeepFashion_R@1": ..., "Average_R@10": ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from procir_jax.eval import search

KS = (1, 5, 10)
AVERAGED_KS = (5, 10)
OVERLAP_K = 10
# Rankings are kept this deep, for recall@k curves. Their first 10 columns are
# what a top-10 search returns: exact search is deterministic, and ScaNN
# rescores max(reorder_num_neighbors, k) candidates, 250 unless set lower.
CURVE_DEPTH = 50

# Source keys (as in the TFDS builder and the release) -> reported names.
DISPLAY_NAMES = {
    "deepfashion": "DeepFashion",
    "f200k": "Fashion200K",
    "fashiongen": "FashionGen-val",
    "fashiongen_val": "FashionGen-val",
}
# The release's own keys, which fix the order datasets are averaged in.
_RELEASE_KEYS = {"fashiongen": "fashiongen_val"}


def display_name(dataset: str) -> str:
  """"deepfashion" -> "DeepFashion"; unknown names are kept as given."""
  return DISPLAY_NAMES.get(dataset, dataset)


def chance_recall(k: int, gallery_size: int) -> float:
  """Recall@k in percent of a uniformly random ranking of the gallery.

  The target is one of `gallery_size` rows, so it lands in the top k with
  probability min(k, gallery_size) / gallery_size.
  """
  if gallery_size <= 0:
    return float("nan")
  return 100.0 * min(k, gallery_size) / gallery_size


def release_order(datasets: Iterable[str]) -> list[str]:
  """Datasets in the order the released evaluation reports and averages them."""
  return sorted(datasets, key=lambda d: _RELEASE_KEYS.get(d, d))


def _ids(values, what: str) -> list[str]:
  values = [v.decode() if isinstance(v, bytes) else str(v) for v in
            (values.tolist() if isinstance(values, np.ndarray) else values)]
  if any(not v for v in values):
    raise ValueError(f"{what} contains an empty product id")
  return values


def _matrix(values, rows: int, what: str, dim: int | None) -> np.ndarray:
  values = np.asarray(values, dtype=np.float32)
  if rows == 0 and values.size == 0:
    return np.zeros((0, dim or 0), np.float32)
  if values.ndim != 2 or values.shape[0] != rows:
    raise ValueError(f"{what} must have shape [{rows}, D], got {values.shape}")
  if dim is not None and values.shape[1] != dim:
    raise ValueError(f"{what} has dimension {values.shape[1]}, expected {dim}")
  if not np.all(np.isfinite(values)):
    row = int(np.flatnonzero(~np.all(np.isfinite(values), axis=1))[0])
    raise ValueError(f"{what} row {row} has non-finite values")
  return values


@dataclasses.dataclass
class DatasetEmbeddings:
  """Everything the protocol needs for one source dataset.

  Attributes:
    dataset: source key, e.g. "deepfashion", "f200k", "fashiongen".
    gallery_ids: [G] ids of the products encoded as documents.
    gallery: float32 [G, D] their document embeddings.
    source_ids: [Q] source product id of each query (triplet).
    target_ids: [Q] target product id of each query.
    q: float32 [Q, D] query embeddings (second turn of the dialogue).
    s: float32 [Q, D] source embeddings (first turn).
    skipped: examples the encoder could not encode (messages naming the
      product), reported with the results.
    texts: [Q] modification text of each query, or empty when not recorded
      (only the results page reads them).
  """

  dataset: str
  gallery_ids: Sequence[str]
  gallery: np.ndarray
  source_ids: Sequence[str]
  target_ids: Sequence[str]
  q: np.ndarray
  s: np.ndarray
  skipped: Sequence[str] = ()
  texts: Sequence[str] = ()

  def __post_init__(self):
    self.dataset = str(self.dataset)
    if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
      raise ValueError(f"bad dataset name {self.dataset!r}")
    what = f"{self.dataset}:"
    self.skipped = [str(x) for x in self.skipped]
    self.texts = [v.decode() if isinstance(v, bytes) else str(v) for v in
                  (self.texts.tolist() if isinstance(self.texts, np.ndarray)
                   else self.texts)]
    self.gallery_ids = _ids(self.gallery_ids, f"{what} gallery_ids")
    self.source_ids = _ids(self.source_ids, f"{what} source_ids")
    self.target_ids = _ids(self.target_ids, f"{what} target_ids")
    num_queries = len(self.source_ids)
    if len(self.target_ids) != num_queries:
      raise ValueError(f"{what} {num_queries} source_ids but "
                       f"{len(self.target_ids)} target_ids")
    if self.texts and len(self.texts) != num_queries:
      raise ValueError(f"{what} {num_queries} queries but {len(self.texts)} "
                       "texts")
    self.q = _matrix(self.q, num_queries, f"{what} q", None)
    dim = self.q.shape[1] if num_queries else None
    self.s = _matrix(self.s, num_queries, f"{what} s", dim)
    self.gallery = _matrix(self.gallery, len(self.gallery_ids),
                           f"{what} gallery", dim)
    if not num_queries and self.gallery.size:
      self.q = self.s = np.zeros((0, self.gallery.shape[1]), np.float32)

  @classmethod
  def coerce(cls, dataset: str, value: Any) -> "DatasetEmbeddings":
    """From any object with the same fields (`query_source_ids` and
    `query_target_ids` are accepted for `source_ids` and `target_ids`)."""
    if isinstance(value, cls):
      return value
    def get(*names, default=None):
      for name in names:
        if hasattr(value, name):
          return getattr(value, name)
      if default is not None:
        return default
      raise ValueError(f"{dataset}: {type(value).__name__} has no {names[0]}")
    return cls(dataset=dataset, gallery_ids=get("gallery_ids"),
               gallery=get("gallery"),
               source_ids=get("source_ids", "query_source_ids"),
               target_ids=get("target_ids", "query_target_ids"),
               q=get("q"), s=get("s"), skipped=get("skipped", default=()),
               texts=get("texts", default=()))

  @property
  def name(self) -> str:
    return display_name(self.dataset)

  @property
  def dimension(self) -> int:
    return int(self.q.shape[1] if self.q.size else self.gallery.shape[1])


@dataclasses.dataclass
class EvalGallery:
  """The gallery and queries the protocol evaluates, for one dataset.

  Attributes:
    ids: [N] product ids, documents first, then reused sources.
    vectors: float32 [N, D], L2-normalised.
    num_documents: rows that are document embeddings.
    reused_source_ids: ids of sources represented by their s embedding.
    duplicate_gallery_ids: ids given more than once as documents (the first
      embedding is kept).
    query_rows: [M] rows of the dataset's queries that are evaluated.
    queries: float32 [M, D], L2-normalised q of those queries.
    targets: [M] gallery row of each evaluated query's target.
    dropped_target_ids: target id of each left-out query, in query order.
  """

  ids: list[str]
  vectors: np.ndarray
  num_documents: int
  reused_source_ids: list[str]
  duplicate_gallery_ids: list[str]
  query_rows: np.ndarray
  queries: np.ndarray
  targets: np.ndarray
  dropped_target_ids: list[str]


def assemble(data: DatasetEmbeddings) -> EvalGallery:
  """Applies the protocol's gallery and query rules (steps 2-5 above)."""
  row_of: dict[str, int] = {}
  ids: list[str] = []
  rows: list[np.ndarray] = []
  duplicates: list[str] = []
  for pid, vector in zip(data.gallery_ids, data.gallery):
    if pid in row_of:
      duplicates.append(pid)
      continue
    row_of[pid] = len(ids)
    ids.append(pid)
    rows.append(vector)
  num_documents = len(ids)
  reused = []
  for pid, vector in zip(data.source_ids, data.s):
    if pid not in row_of:
      row_of[pid] = len(ids)
      ids.append(pid)
      rows.append(vector)
      reused.append(pid)
  dim = data.dimension
  vectors = (np.stack(rows) if rows else np.zeros((0, dim), np.float32))
  query_rows, targets, dropped = [], [], []
  for i, tid in enumerate(data.target_ids):
    if tid in row_of:
      query_rows.append(i)
      targets.append(row_of[tid])
    else:
      dropped.append(tid)
  query_rows = np.asarray(query_rows, np.int64)
  return EvalGallery(
      ids=ids, vectors=search.l2_normalize(vectors),
      num_documents=num_documents, reused_source_ids=reused,
      duplicate_gallery_ids=duplicates, query_rows=query_rows,
      queries=search.l2_normalize(data.q[query_rows].reshape(-1, dim)),
      targets=np.asarray(targets, np.int64), dropped_target_ids=dropped)


@dataclasses.dataclass
class Rankings:
  """What the search backends returned for one dataset's evaluated queries.

  Attributes:
    gallery_ids: [N] product id of each gallery row (`EvalGallery.ids`).
    query_rows: [M] rows of the dataset's queries that are evaluated.
    targets: [M] gallery row of each evaluated query's target.
    rows: backend -> int64 [M, depth] gallery rows, best first (-1: empty).
    scores: backend -> float32 [M, depth] their cosine scores.
  """

  gallery_ids: list[str]
  query_rows: np.ndarray
  targets: np.ndarray
  rows: dict[str, np.ndarray]
  scores: dict[str, np.ndarray]

  def target_ranks(self, backend: str) -> np.ndarray:
    """[M] 1-based rank of each target within the kept depth, 0 if beyond."""
    found = self.rows[backend] == self.targets[:, None]
    return np.where(found.any(axis=1), found.argmax(axis=1) + 1, 0)


def hits_at_k(ranked: np.ndarray, targets: np.ndarray,
              ks: Sequence[int] = KS) -> dict[int, int]:
  """Queries whose target is among the first k of their ranked gallery rows."""
  ranked = np.asarray(ranked)
  found = ranked == np.asarray(targets)[:, None]
  return {k: int(found[:, :k].any(axis=1).sum()) for k in ks}


def recall_percent(hits: int, num: int) -> float:
  """Recall in percent, rounded to 2 decimals, computed as the release does.

  The release takes a float32 mean of hits, then rounds 100x it in Python;
  doing the same keeps the rare half-way cases identical.
  """
  if num <= 0:
    return float("nan")
  share = float(np.float32(hits) / np.float32(num))
  return round(share * 100, 2)


def overlaps(approx: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
  """Each query's share of its exact top-k that the approximate top-k holds."""
  k = min(k, exact.shape[1])
  if k == 0:
    return np.full(exact.shape[0], np.nan)
  return np.array([len(set(a[:k].tolist()) & set(e[:k].tolist())) / k
                   for a, e in zip(approx, exact)], dtype=np.float64)


def mean_overlap(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
  """Mean share of each query's exact top-k that the approximate top-k holds."""
  shared = overlaps(approx, exact, k)
  return float(shared.mean()) if shared.size else float("nan")


@dataclasses.dataclass
class DatasetResult:
  """Recall and counts for one dataset.

  Attributes:
    dataset: source key ("deepfashion").
    name: reported name ("DeepFashion").
    recall: backend -> {k: recall in percent, rounded as released}.
    hits: backend -> {k: number of evaluated queries with the target in top k}.
    num_gallery: gallery rows (documents + reused sources).
    num_documents: gallery rows encoded as documents.
    num_reused_sources: sources represented by their s embedding.
    num_duplicate_gallery_ids: document ids given more than once.
    num_queries: queries given.
    num_evaluated: queries evaluated.
    num_dropped: queries left out because the target is not in the gallery.
    dropped_target_ids: their target ids.
    reused_source_ids: ids of the reused sources.
    scann_overlap: mean share of the exact top-10 that ScaNN returns.
    scann_settings: the resolved ScaNN settings used.
    skipped: examples the encoder skipped.
    rankings: each backend's top `CURVE_DEPTH` results, for reports.
  """

  dataset: str
  name: str
  recall: dict[str, dict[int, float]]
  hits: dict[str, dict[int, int]]
  num_gallery: int
  num_documents: int
  num_reused_sources: int
  num_duplicate_gallery_ids: int
  num_queries: int
  num_evaluated: int
  num_dropped: int
  dropped_target_ids: list[str]
  reused_source_ids: list[str]
  scann_overlap: float | None = None
  scann_settings: dict[str, Any] | None = None
  skipped: list[str] = dataclasses.field(default_factory=list)
  rankings: Rankings | None = dataclasses.field(default=None, repr=False,
                                                compare=False)

  def counts(self) -> dict[str, int]:
    return dict(gallery=self.num_gallery, documents=self.num_documents,
                reused_sources=self.num_reused_sources,
                duplicate_gallery_ids=self.num_duplicate_gallery_ids,
                queries=self.num_queries, evaluated=self.num_evaluated,
                dropped=self.num_dropped, encoder_skipped=len(self.skipped))


def _average(values: Sequence[float]) -> float:
  # Plain Python sum in dataset order, then round: as released.
  return round(sum(values) / len(values), 2) if values else float("nan")


@dataclasses.dataclass
class EvalResults:
  """Per-dataset results in the release's order, and their averages."""

  datasets: list[DatasetResult]
  ks: tuple[int, ...] = KS
  # Datasets given without any query: nothing to evaluate, listed here.
  without_queries: list[str] = dataclasses.field(default_factory=list)

  @property
  def backends(self) -> list[str]:
    return list(self.datasets[0].recall) if self.datasets else []

  def average(self, k: int, backend: str = "exact") -> float:
    return _average([d.recall[backend][k] for d in self.datasets])

  def results_json(self, backend: str = "exact") -> dict[str, float]:
    """The release's results.json: `<Dataset>_R@k` and `Average_R@{5,10}`."""
    out = {}
    for d in self.datasets:
      for k in self.ks:
        out[f"{d.name}_R@{k}"] = d.recall[backend][k]
    for k in AVERAGED_KS:
      if k in self.ks:
        out[f"Average_R@{k}"] = self.average(k, backend)
    return out

  def details(self) -> dict[str, Any]:
    """Counts, every backend's recall, and the ScaNN comparison."""
    out: dict[str, Any] = {"datasets": {}, "averages": {},
                           "datasets_without_queries": self.without_queries}
    for d in self.datasets:
      entry: dict[str, Any] = dict(name=d.name, counts=d.counts())
      for backend in d.recall:
        entry[backend] = {f"R@{k}": d.recall[backend][k] for k in self.ks}
        entry[backend]["hits"] = {f"@{k}": d.hits[backend][k] for k in self.ks}
      if "scann" in d.recall:
        exact10 = d.recall.get("exact", {}).get(OVERLAP_K)
        entry["scann"]["top10_overlap_with_exact"] = d.scann_overlap
        entry["scann"]["R@10_share_of_exact"] = (
            d.recall["scann"][OVERLAP_K] / exact10 if exact10 else None)
        entry["scann"]["settings"] = d.scann_settings
      entry["dropped_target_ids"] = d.dropped_target_ids
      entry["reused_source_ids"] = d.reused_source_ids
      entry["encoder_skipped"] = d.skipped
      out["datasets"][d.dataset] = entry
    for backend in self.backends:
      out["averages"][backend] = {
          f"R@{k}": self.average(k, backend) for k in AVERAGED_KS
          if k in self.ks}
    return out


def evaluate_dataset(data: DatasetEmbeddings,
                     backends: Sequence[str] = ("exact", "scann"),
                     scann_settings=None, ks: Sequence[int] = KS,
                     exact_kwargs: Mapping[str, Any] | None = None
                     ) -> DatasetResult:
  """Recall@k of one dataset with each backend.

  Args:
    data: the dataset's embeddings.
    backends: any of "exact" and "scann". The ScaNN top-10 overlap is
      reported when both are given.
    scann_settings: `search.ScannSettings` or a mapping of its fields.
    ks: recall cut-offs.
    exact_kwargs: extra arguments for `search.ExactSearch`.

  Returns:
    The dataset's result.

  Raises:
    ValueError: when the dataset has queries but none can be evaluated.
  """
  for backend in backends:
    if backend not in search.BACKENDS:
      raise ValueError(f"unknown backend {backend!r}; known: {search.BACKENDS}")
  g = assemble(data)
  if data.source_ids and not len(g.query_rows):
    raise ValueError(
        f"{data.name}: none of its {len(data.source_ids)} queries has its "
        f"target in the gallery ({g.num_documents} documents, "
        f"{len(g.reused_source_ids)} reused sources), e.g. target "
        f"{g.dropped_target_ids[0]!r}; check that the gallery ids are the "
        "product ids the triplets use")
  depth = max(max(ks), OVERLAP_K, CURVE_DEPTH)
  ranked, scores, recall, hits = {}, {}, {}, {}
  scann_settings_used = None
  for backend in backends:
    if not len(g.query_rows):
      ranked[backend] = np.zeros((0, 0), np.int64)
      scores[backend] = np.zeros((0, 0), np.float32)
    elif backend == "exact":
      index = search.ExactSearch(g.vectors, g.ids, **(exact_kwargs or {}))
      ranked[backend], scores[backend] = index.search(g.queries, depth)
    else:
      index = search.ScannSearch(g.vectors, g.ids, settings=scann_settings)
      scann_settings_used = index.settings.to_dict()
      ranked[backend], scores[backend] = index.search(g.queries, depth)
    hits[backend] = hits_at_k(ranked[backend], g.targets, ks)
    recall[backend] = {k: recall_percent(hits[backend][k], len(g.query_rows))
                       for k in ks}
  overlap = None
  if "exact" in ranked and "scann" in ranked:
    overlap = mean_overlap(ranked["scann"], ranked["exact"], OVERLAP_K)
  return DatasetResult(
      dataset=data.dataset, name=data.name, recall=recall, hits=hits,
      num_gallery=len(g.ids), num_documents=g.num_documents,
      num_reused_sources=len(g.reused_source_ids),
      num_duplicate_gallery_ids=len(g.duplicate_gallery_ids),
      num_queries=len(data.source_ids), num_evaluated=len(g.query_rows),
      num_dropped=len(g.dropped_target_ids),
      dropped_target_ids=g.dropped_target_ids,
      reused_source_ids=g.reused_source_ids, scann_overlap=overlap,
      scann_settings=scann_settings_used, skipped=list(data.skipped),
      rankings=Rankings(g.ids, g.query_rows, g.targets, ranked, scores))


def evaluate(datasets: Iterable[DatasetEmbeddings] | Mapping[str, Any],
             backends: Sequence[str] = ("exact", "scann"),
             scann_settings=None, ks: Sequence[int] = KS,
             exact_kwargs: Mapping[str, Any] | None = None) -> EvalResults:
  """Evaluates each dataset on its own gallery; see `evaluate_dataset`.

  Args:
    datasets: `DatasetEmbeddings`, or a mapping from source key to them (or to
      objects with the same fields, see `DatasetEmbeddings.coerce`).
    backends: any of "exact" and "scann".
    scann_settings: `search.ScannSettings` or a mapping of its fields.
    ks: recall cut-offs.
    exact_kwargs: extra arguments for `search.ExactSearch`.

  Returns:
    Results in the release's dataset order.
  """
  if isinstance(datasets, Mapping):
    datasets = [DatasetEmbeddings.coerce(k, v) for k, v in datasets.items()]
  by_name = {}
  for data in datasets:
    if data.dataset in by_name:
      raise ValueError(f"dataset {data.dataset!r} is given twice")
    by_name[data.dataset] = data
  order = release_order(by_name)
  results = [evaluate_dataset(by_name[name], backends, scann_settings, ks,
                              exact_kwargs)
             for name in order if by_name[name].source_ids]
  return EvalResults(datasets=results, ks=tuple(ks),
                     without_queries=[n for n in order
                                      if not by_name[n].source_ids])
