"""Queries/s at matched recall@10: the project's ScaNN vs exact search and peers.

Every backend searches the same gallery of unit vectors with the same queries, by
inner product, in one run, on the same cores (FAISS and hnswlib get
`search.available_cores()` threads, as ScaNN does; JAX's exact search uses every
core). Exact search gives the ground truth for all queries.

The goals of the issue "catalogue-scale retrieval", at 1M x 1024 vectors on two
cores:

  1. the project's ScaNN index with default settings
     (`ScannSearch(gallery, settings=dict(target_recall=t))` for t = 0.95,
     the default, and 0.99) answers at least as many queries/s as the best
     peer at equal recall@10 (the peers searched at the first setting that
     reaches that index's recall: the rows whose target is "=scann t").
     Without `--tuning_queries` the index tunes without queries, on gallery
     rows plus noise; with `--tuning_queries=N` it tunes on N held-out
     queries made as the measured ones are (`tuning_queries=`), as a shop
     tunes on queries from its own log. The peers' settings are swept on the
     measured queries themselves;
  2. the index for 0.99 reaches recall@10 >= 0.99 at >= 100x exact search's
     queries/s.

Commands (from the repository root; the peers come with `pip install -e .[bench]`):

  # 100K x 1024: 17-35 min on 2 cores (12-20 of them the two HNSW builds).
  python -m bench.search --data=overlap --json=search_100k.json
  # 1M x 1024: about 3.5-5 hours on 2 cores, peak memory 12-19 GiB (see below).
  python -m bench.search --data=overlap --num=1000000 --exact_queries=500 \
      --json=search_1m.json
  # 1M without FAISS's HNSW, the slowest build: about 2-3 hours.
  python -m bench.search --data=overlap --num=1000000 --exact_queries=500 \
      --peers=faiss_ivfpq,hnswlib --json=search_1m.json
  # ScaNN tuned on 1000 held-out queries of the same kind, not on the gallery.
  python -m bench.search --data=clusters --num=1000000 --exact_queries=500 \
      --tuning_queries=1000 --peers=faiss_ivfpq
  # Real embeddings from an evaluation run's workdir W.
  python -m bench.search --data=procir --embeddings W/eval/embeddings/*.npz

Most of the 1M run is the two HNSW builds (M=32, efConstruction=200): 100K x
1024 took 6-12 min each on 2 cores, so 1M takes 1-2.5 hours each (a run
smaller than `--estimate_num` prints this estimate from its own builds);
`--peers` picks a subset. Memory: the gallery (4 GiB at 1M x 1024), plus exact
search's copies of it while it runs, then one index at a time (FAISS's and
hnswlib's: 4.4 KB per vector); the peak is ScaNN's build, 2.8 GiB of process
memory at 100K and 1.9 GiB at 50K, which extrapolates to at most 19 GiB at 1M
(less, as its training sample stops growing at 250K rows). The run logs its
peak so far after each build.

Data (`--data`):

  clusters  well-separated clusters: `--clusters` (default num / 100) random unit
            centres, points scattered around them (spread 1: cosine to the
            centre about 1 / sqrt(1 + spread^2) = 0.71); each query is a
            gallery point plus noise (0.5), as a composed query lands near, not
            on, its target.
  overlap   harder: many more clusters (num / 20: 50K at 1M, 50 per ScaNN
            leaf) with spread 1.5 (cosine to the centre 0.55, between two
            points of a cluster 0.31), so clusters overlap and no partition
            follows them, and query noise 1 (cosine to the target 0.71, not
            0.89). A query's top 10 are still rows of its cluster (cosines 0.26
            to 0.22 after the target's 0.71; on `clusters` 0.49 to 0.47), but
            weakly tied to any leaf: at 100K x 1024, ScaNN searching 3% of its
            leaves finds 71% of them here (100% on `clusters`), and needs 90%
            of its leaves for 0.99; HNSW finds 99% with ef=76.
  categories  `clusters`, whose centres gather in 50 categories (each centre
            at spread 1 from a random category centre), as products gather
            in categories: a catalogue with coarse structure, which an index
            split by similarity across shards can follow (bench.search_catalogue
            --shard_by=similarity).
  procir    real ProCIR embeddings: `--embeddings` names one or more .npz files
            with `gallery` and `q` arrays (what `python -m procir_jax.main`
            writes to <workdir>/eval/embeddings/<dataset>.npz); the galleries are
            concatenated and normalised, their queries (up to `--queries`) are the
            queries. A small sample is flagged in the output.

Method: each peer is built once with fixed, documented build parameters (see the
peer classes); ScaNN is built twice, with its defaults for each target (int8
rescoring for 0.95, bfloat16 for 0.99). Then the search-time knobs (ScaNN:
leaves_to_search and reorder_num_neighbors; FAISS IVF-PQ: nprobe and the refine
k_factor; HNSW: efSearch / ef) are swept upward, one pass of the first
`--sweep_queries` queries each, along geometric ladders (the main knob by 1.5x;
one ladder per count of candidates rescored exactly: 2, 8 and 32 x k, and
ScaNN's tuned number); a ladder stops at the highest target (or ScaNN's recall),
at its end, or where it stops rising. For each recall target, the first setting
of each ladder that reaches it is a candidate, and the candidate fastest in the
sweep is timed on all queries (`--repeats` passes, their mean counts); if all
the queries fall short of the target, the next settings of its ladder are timed
until one reaches it. A target no setting reaches is "not reached", with the
best recall seen.

Columns of the table (also written by `--json=PATH`, with every sweep point):

  backend      exact (jax), scann (the project's ScannSearch), faiss_ivfpq
               (IVF + 4-bit fast-scan PQ + exact refinement), faiss_hnsw
               (IndexHNSWFlat), hnswlib
  target       the recall@10 the row's setting was chosen to reach: 0.95 or
               0.99 (the first swept setting to reach it), "default t" (ScaNN
               built with default settings for target t, as tuned, not
               swept) or "=scann t" (that index's own recall)
  setting      the search-time knobs of the row
  build s      seconds to build the index (exact: copying the gallery and
               compiling)
  B/vec        index memory per gallery vector in bytes (FAISS: its serialized
               size; hnswlib: its saved file size; ScaNN: the index's own
               `memory_per_vector` less the product ids, which no peer holds,
               else its serialized assets; exact: the float32 gallery)
  recall@10    mean share of exact search's top 10 that the backend returns
  queries/s    all queries in one batch call, `--repeats` passes
  x exact      queries/s over exact search's
  x peer       queries/s over the best peer's at the same target

Timings are wall-clock: on a shared machine they vary between runs.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import math
import os
import platform
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# FAISS's OpenMP threads sleep, not spin, while they wait (set before faiss loads
# libgomp; OMP_WAIT_POLICY=ACTIVE in the environment wins): spinning threads on a
# machine with other load stall each other, and FAISS with them (here 18 s
# instead of 0.13 s to train a 2000-row IVF index on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import timed  # noqa: E402
from procir_jax.eval import recall, search  # noqa: E402

TARGETS = (0.95, 0.99)
PEERS = ("faiss_ivfpq", "faiss_hnsw", "hnswlib")
# Synthetic distributions: rows per cluster, spread around the centre, query
# noise (both relative to a unit vector; see make_data).
DISTRIBUTIONS = {
    "clusters": dict(rows_per_cluster=100, spread=1.0, query_noise=0.5),
    "overlap": dict(rows_per_cluster=20, spread=1.5, query_noise=1.0),
    "categories": dict(rows_per_cluster=100, spread=1.0, query_noise=0.5,
                       categories=50, category_spread=1.0),
}
# Ladders: the main knob grows by KNOB_RATIO per step; the candidates rescored
# exactly (ScaNN's reorder, FAISS's k_factor) take these multiples of k.
KNOB_RATIO = 1.5
CANDIDATE_FACTORS = (2, 8, 32)
MAX_EF = 2048
# A ladder stops when recall rose less than this over its last PLATEAU steps.
PLATEAU, PLATEAU_GAIN = 3, 0.001
# Below these, the output says the sample says little about catalogue scale.
SMALL_GALLERY, SMALL_QUERIES = 100_000, 500


def unit(x):
  """Rows scaled to unit norm, in place."""
  x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return x


def cluster_centres(rng, clusters, dim, categories=0, category_spread=1.0):
  """Unit cluster centres: random, or scattered around `categories` random
  category centres (`categories`)."""
  if not categories:
    return unit(rng.standard_normal((clusters, dim), dtype=np.float32))
  tops = unit(rng.standard_normal((categories, dim), dtype=np.float32))
  return scatter(tops[rng.integers(0, categories, clusters)], category_spread,
                 rng)


def make_data(num, dim, clusters, queries, spread, query_noise, seed,
              categories=0, category_spread=1.0):
  """Clustered unit gallery [num, dim] and queries near gallery points."""
  rng = np.random.default_rng(seed)
  centres = cluster_centres(rng, clusters, dim, categories, category_spread)
  assign = rng.integers(0, clusters, num)
  gallery = np.empty((num, dim), np.float32)
  step = 65536  # Bounded temporaries at 1M rows.
  for start in range(0, num, step):
    stop = min(num, start + step)
    gallery[start:stop] = scatter(centres[assign[start:stop]], spread, rng)
  origin = rng.choice(num, queries, replace=False)
  return gallery, scatter(gallery[origin], query_noise, rng), origin


def held_out_queries(gallery, origin, count, noise, seed):
  """`count` queries made as `make_data` makes them, around gallery rows that
  no query in `origin` starts from: for tuning, not for measuring."""
  rng = np.random.default_rng(seed)
  free = np.setdiff1d(np.arange(len(gallery)), origin)
  if count > len(free):
    raise ValueError(f"--tuning_queries={count} is more than the {len(free)} "
                     "gallery rows no measured query starts from")
  return scatter(gallery[rng.choice(free, count, replace=False)], noise, rng)


def scatter(points, spread, rng):
  """Unit vectors at Gaussian noise of norm about `spread` from unit `points`."""
  dim = points.shape[1]
  noise = rng.standard_normal(points.shape, dtype=np.float32)
  noise *= spread / np.sqrt(dim)
  noise += points
  return unit(noise)


def load_embeddings(paths, queries, seed):
  """Gallery and queries from ProCIR .npz files (galleries concatenated).

  Returns:
    (gallery, queries, origin): unit float32 arrays and, per query, the row of
    its target in the gallery where the file names one (target_ids and
    gallery_ids), else -1.
  """
  galleries, qs, origins, offset = [], [], [], 0
  for path in paths:
    with np.load(path, allow_pickle=False) as z:
      if "gallery" not in z.files or "q" not in z.files:
        raise ValueError(f"{path} lacks a 'gallery' or 'q' array (it has "
                         f"{z.files})")
      gallery = np.asarray(z["gallery"], np.float32)
      q = np.asarray(z["q"], np.float32)
      origin = np.full(len(q), -1, np.int64)
      if "gallery_ids" in z.files and "target_ids" in z.files:
        row = {str(i): n for n, i in enumerate(z["gallery_ids"].tolist())}
        origin = np.array([row.get(str(t), -1 - offset)
                           for t in z["target_ids"].tolist()], np.int64)
        origin = origin + offset
    if gallery.ndim != 2 or q.ndim != 2 or q.shape[1] != gallery.shape[1]:
      raise ValueError(f"{path}: gallery {gallery.shape} and q {q.shape} are "
                       "not [N, D] and [Q, D]")
    if galleries and gallery.shape[1] != galleries[0].shape[1]:
      raise ValueError(f"{path} has dimension {gallery.shape[1]}, the first "
                       f"file {galleries[0].shape[1]}")
    galleries.append(gallery)
    qs.append(q)
    origins.append(origin)
    offset += len(gallery)
  gallery = unit(np.concatenate(galleries))
  q = unit(np.concatenate(qs))
  origin = np.concatenate(origins)
  if len(q) > queries:
    keep = np.sort(np.random.default_rng(seed).choice(len(q), queries,
                                                      replace=False))
    q, origin = q[keep], origin[keep]
  return gallery, np.ascontiguousarray(q), origin


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def hit(indices, origin, k):
  """Share of queries with a known target whose target is in the top k."""
  known = origin >= 0
  if not known.any():
    return None
  found = (np.asarray(indices)[:, :k] == origin[:, None]).any(axis=1)
  return float(found[known].mean())


def geometric(start, stop, ratio=KNOB_RATIO):
  """Increasing integers from `start` to `stop` (both in), each ~ratio x the last."""
  out, x = [], float(start)
  while True:
    v = min(int(round(x)), stop)
    if not out or v > out[-1]:
      out.append(v)
    if v >= stop:
      return out
    x *= ratio


def _file_bytes(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def _setting(knobs):
  return " ".join(f"{k}={v}" for k, v in knobs.items()) or "as built"


# --- backends --------------------------------------------------------------------


class Backend:
  """A built index with search-time knobs; subclasses build in __init__."""

  name = ""
  build_s = 0.0

  def describe(self) -> str:
    """Build parameters, for the log."""
    return ""

  def search(self, queries, k, **knobs):
    """Gallery rows [Q, k] of the top k for each query."""
    raise NotImplementedError

  def ladders(self, k):
    """Lists of knob settings, each ordered by growing cost."""
    return [[{}]]

  def bytes_per_vector(self) -> float | None:
    return None

  def close(self):
    pass


class Scann(Backend):
  """The project's ScaNN, built as `ScannSearch(gallery)` builds it."""

  name = "scann"

  def __init__(self, gallery, overrides, tuning_queries=None):
    # Loads ScaNN (and TensorFlow, seconds) outside the build's time.
    importlib.import_module("scann.scann_ops.py.scann_ops_pybind")
    t0 = time.perf_counter()
    self.index = search.ScannSearch(gallery, settings=overrides or None,
                                    tuning_queries=tuning_queries)
    self.build_s = time.perf_counter() - t0
    self.count = len(gallery)
    s = self.index.settings
    self.mode, self.num_leaves, self.code_dims = (s.mode, s.num_leaves,
                                                  s.dims_per_block)
    self.default = {"leaves": s.leaves_to_search, "reorder": s.reorder_num_neighbors}

  def describe(self):
    s = self.index.settings
    fields = ("mode", "num_leaves", "leaves_to_search", "spherical",
              "dims_per_block", "hash_type", "reorder_num_neighbors",
              "reorder_dtype", "target_recall")
    parts = [f"{f}={getattr(s, f)}" for f in fields]
    tuned = self.tuned_recall()
    if tuned is not None:
      t = self.index.tuning
      parts.append(f"tuned_recall={tuned:.4f} tuned_on={t.num_queries}:"
                   f"{t.queries}")
    return " ".join(parts) + f" threads={self.index.threads}"

  def tuned_recall(self):
    return self.index.tuned_recall

  def default_setting(self):
    if self.mode == "brute_force":
      return "brute force"
    knobs = {"leaves": self.default["leaves"]} if self.mode == "tree_ah" else {}
    knobs["reorder"] = self.default["reorder"]
    return f"{self.mode} {self.code_dims} dims/code {_setting(knobs)}"

  def search(self, queries, k, **knobs):
    names = {"leaves": "leaves_to_search", "reorder": "reorder_num_neighbors"}
    kwargs = {names[n]: v for n, v in knobs.items()}
    return self.index.search(queries, k, **kwargs)[0]

  def ladders(self, k):
    if self.mode == "brute_force":
      return [[{}]]
    reorders = sorted({k * f for f in CANDIDATE_FACTORS} |
                      {self.default["reorder"]} - {0})
    if self.mode != "tree_ah":
      return [[{"reorder": r} for r in reorders]]
    leaves = geometric(1, self.num_leaves)
    return [[{"leaves": n, "reorder": r} for n in leaves] for r in reorders]

  def bytes_per_vector(self):
    # The index's own figure, less the product ids (Python strings) that the
    # peers do not hold.
    return float(sum(v for name, v in self.index.memory_per_vector().items()
                     if name != "id"))

  def close(self):
    self.index = None


def _faiss():
  import faiss  # pylint: disable=g-import-not-at-top
  faiss.omp_set_num_threads(search.available_cores())
  return faiss


def _faiss_bytes(index, count):
  # write_index's file holds what serialize_index returns, without a second
  # in-memory copy of a multi-GB index.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "index.faiss")
    _faiss().write_index(index, path)
    return os.path.getsize(path) / count


class FaissIvfPq(Backend):
  """FAISS IVF + PQ + exact refinement (IndexRefineFlat), inner product.

  Build parameters, and why:
    lists: 4 sqrt(n) (FAISS's guidance for up to ~1M vectors is 4-16 sqrt(n);
      the low end keeps k-means bearable at 1M on 2 cores: 4000 lists).
    training sample: 64 rows per list (FAISS wants >= 39), at most n: 256K rows
      at 1M, as ScaNN trains on 250K.
    PQ: the same code budget as ScaNN's default asymmetric hashing, 2 bits per
      dimension: with `pq_bits=4` (default), dim/2 sub-quantizers of 4 bits
      searched with FAISS's SIMD fast scan (IndexIVFPQFastScan, like ScaNN's
      lut16 with 2 dims per block); with `pq_bits=8`, classic IndexIVFPQ with
      dim/4 sub-quantizers of 8 bits.
    refinement: float32 copies of the gallery rescore k * k_factor candidates
      (as ScaNN reorders its candidates in float32).
  """

  name = "faiss_ivfpq"

  def __init__(self, gallery, lists=0, pq_bits=4, seed=0):
    faiss = _faiss()
    n, d = gallery.shape
    self.count = n
    lists = lists or round(4 * math.sqrt(n))
    self.lists = max(1, min(lists, n // 39 or 1))
    ip = faiss.METRIC_INNER_PRODUCT
    t0 = time.perf_counter()
    self.quantizer = faiss.IndexFlatIP(d)
    if pq_bits == 4:
      m = max(1, d // 2)
      self.ivf = faiss.IndexIVFPQFastScan(self.quantizer, d, self.lists, m, 4, ip)
    elif pq_bits == 8:
      m = max(1, d // 4)
      self.ivf = faiss.IndexIVFPQ(self.quantizer, d, self.lists, m, 8, ip)
    else:
      raise ValueError(f"pq_bits must be 4 or 8, got {pq_bits}")
    self.pq = f"PQ{m}x{pq_bits}{'fs' if pq_bits == 4 else ''}"
    self.index = faiss.IndexRefineFlat(self.ivf)
    sample = min(n, 64 * self.lists)
    rows = np.random.default_rng(seed).choice(n, sample, replace=False)
    self.index.train(gallery[np.sort(rows)])
    self.index.add(gallery)
    self.build_s = time.perf_counter() - t0

  def describe(self):
    return f"IVF{self.lists},{self.pq},RFlat (inner product)"

  def search(self, queries, k, nprobe=1, k_factor=1):
    self.ivf.nprobe = nprobe
    self.index.k_factor = k_factor
    return self.index.search(queries, k)[1]

  def ladders(self, k):
    del k
    return [[{"nprobe": p, "k_factor": f} for p in geometric(1, self.lists)]
            for f in CANDIDATE_FACTORS]

  def bytes_per_vector(self):
    return _faiss_bytes(self.index, self.count)

  def close(self):
    self.index = self.ivf = self.quantizer = None


class FaissHnsw(Backend):
  """FAISS IndexHNSWFlat, inner product, M=32 and efConstruction=200.

  M=32 and efConstruction=200 are the usual settings for high-recall search
  over high-dimensional embeddings (hnswlib's and FAISS's examples use
  16-48 and 100-500); higher ones build slower still at 1M x 1024 on 2 cores.
  """

  name = "faiss_hnsw"

  def __init__(self, gallery, m=32, ef_construction=200):
    faiss = _faiss()
    n, d = gallery.shape
    self.count, self.m, self.efc = n, m, ef_construction
    t0 = time.perf_counter()
    self.index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    self.index.hnsw.efConstruction = ef_construction
    self.index.add(gallery)
    self.build_s = time.perf_counter() - t0

  def describe(self):
    return f"HNSW{self.m},Flat efConstruction={self.efc} (inner product)"

  def search(self, queries, k, efSearch=16):  # noqa: N803 (FAISS's name)
    self.index.hnsw.efSearch = efSearch
    return self.index.search(queries, k)[1]

  def ladders(self, k):
    return [[{"efSearch": ef} for ef in geometric(k, max(k, MAX_EF))]]

  def bytes_per_vector(self):
    return _faiss_bytes(self.index, self.count)

  def close(self):
    self.index = None


class Hnswlib(Backend):
  """hnswlib, space "ip", the same M and ef_construction as FaissHnsw."""

  name = "hnswlib"

  def __init__(self, gallery, m=32, ef_construction=200, seed=0):
    import hnswlib  # pylint: disable=g-import-not-at-top
    n, d = gallery.shape
    self.threads = search.available_cores()
    self.count, self.m, self.efc = n, m, ef_construction
    t0 = time.perf_counter()
    self.index = hnswlib.Index(space="ip", dim=d)
    self.index.init_index(max_elements=n, M=m, ef_construction=ef_construction,
                          random_seed=seed)
    self.index.set_num_threads(self.threads)
    self.index.add_items(gallery, np.arange(n), num_threads=self.threads)
    self.build_s = time.perf_counter() - t0

  def describe(self):
    return f"M={self.m} ef_construction={self.efc} space=ip"

  def search(self, queries, k, ef=16):
    self.index.set_ef(ef)
    return self.index.knn_query(queries, k, num_threads=self.threads)[0]

  def ladders(self, k):
    return [[{"ef": ef} for ef in geometric(k, max(k, MAX_EF))]]

  def bytes_per_vector(self):
    # The size save_index writes (data, links and labels).
    return self.index.index_file_size() / self.count

  def close(self):
    self.index = None


# --- sweeps -----------------------------------------------------------------------


def sweep(backend, queries, truth, k, stop_at, log):
  """Recall and one-pass queries/s along each ladder of `backend`.

  Each ladder climbs until recall@k reaches `stop_at`, its knobs run out, or it
  plateaus (less than PLATEAU_GAIN over PLATEAU steps).
  """
  points = []
  for number, ladder in enumerate(backend.ladders(k)):
    recalls = []
    for knobs in ladder:
      start = time.perf_counter()
      found = backend.search(queries, k, **knobs)
      seconds = time.perf_counter() - start
      rec = recall.mean_overlap(np.asarray(found), truth, k)
      recalls.append(rec)
      points.append(dict(ladder=number, knobs=knobs, recall=rec,
                         qps=len(queries) / seconds))
      log(f"  {backend.name} {_setting(knobs)}: recall@{k} {rec:.4f}, "
          f"{len(queries) / seconds:.0f} queries/s")
      if rec >= stop_at or (len(recalls) > PLATEAU and
                            recalls[-1] - recalls[-1 - PLATEAU] < PLATEAU_GAIN):
        break
  return points


def choose(points, target):
  """The sweep's fastest "first setting of a ladder to reach `target`"."""
  first = {}
  for p in points:
    if p["recall"] >= target and p["ladder"] not in first:
      first[p["ladder"]] = p
  if not first:
    return None
  return max(first.values(), key=lambda p: p["qps"])


def measure(backend, queries, truth, k, knobs, repeats):
  seconds, found = timed(lambda: backend.search(queries, k, **knobs),
                         iters=repeats)
  return recall.mean_overlap(np.asarray(found), truth, k), len(queries) / seconds


def settle(backend, queries, truth, k, points, target, repeats):
  """(knobs, recall, queries/s) for `target` over all queries, or None.

  Times the sweep's choice; where all the queries fall short of `target` (the
  sweep may use fewer), climbs that ladder until they reach it or it ends.
  """
  best = choose(points, target)
  if best is None:
    return None
  ladder = backend.ladders(k)[best["ladder"]]
  for knobs in ladder[ladder.index(best["knobs"]):]:
    rec, qps = measure(backend, queries, truth, k, knobs, repeats)
    if rec >= target:
      return knobs, rec, qps
  return None


def _peak_gib():
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_estimate(name, seconds, num, to_num):
  """HNSW inserts cost ~log n each: n log n scaling from a smaller build."""
  if num >= to_num or num < 2:
    return None
  estimate = seconds * (to_num / num) * (math.log(to_num) / math.log(num))
  return (f"{name}: built {num} rows in {seconds:.0f} s; at {to_num} rows expect "
          f"about {estimate / 60:.0f} min (n log n scaling; more on harder data)")


def _fmt(x, spec, width):
  return ("-" if x is None else format(x, spec)).rjust(width)


def format_table(rows, k):
  head = (f"{'backend':<12}{'target':>13}  {'setting':<28}{'build s':>8}"
          f"{'B/vec':>7}{'recall@' + str(k):>10}{'queries/s':>11}"
          f"{'x exact':>9}{'x peer':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['backend']:<12}{r['target']:>13}  {r['setting']:<28}"
        f"{_fmt(r['build_s'], '.1f', 8)}{_fmt(r['bytes_per_vector'], '.0f', 7)}"
        f"{_fmt(r['recall'], '.4f', 10)}{_fmt(r['qps'], '.0f', 11)}"
        f"{_fmt(r['x_exact'], '.1f', 9)}{_fmt(r['x_peer'], '.2f', 8)}")
  return "\n".join(lines)


def _parse_peers(text):
  peers = [p.strip() for p in text.split(",") if p.strip()]
  bad = sorted(set(peers) - set(PEERS))
  if bad:
    raise argparse.ArgumentTypeError(f"unknown peers {bad}; known: {PEERS}")
  return peers


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", choices=(*DISTRIBUTIONS, "procir"),
                 default="clusters", help="vectors to search (see above)")
  p.add_argument("--embeddings", nargs="+", default=[], metavar="NPZ",
                 help="--data=procir: .npz files (or globs) with gallery and q")
  p.add_argument("--num", type=int, default=100_000, help="gallery size")
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--clusters", type=int, default=0,
                 help="cluster count (0: from --data)")
  p.add_argument("--spread", type=float, default=None,
                 help="spread around the centres (default: from --data)")
  p.add_argument("--query_noise", type=float, default=None,
                 help="query noise (default: from --data)")
  p.add_argument("--queries", type=int, default=2000)
  p.add_argument("--tuning_queries", type=int, default=0,
                 help="ScaNN tunes on this many held-out queries, made as the "
                      "measured ones are (procir: drawn from the files' "
                      "queries and not measured); 0: on gallery rows plus "
                      "noise, as without queries")
  p.add_argument("--exact_queries", type=int, default=0,
                 help="queries timed for exact search (0: all); recall uses "
                      "exact results for all queries either way")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sweep_queries", type=int, default=500,
                 help="queries of each sweep step (0: all); the chosen settings "
                      "are timed, and checked, on all queries")
  p.add_argument("--repeats", type=int, default=2,
                 help="timed passes per chosen setting (their mean counts)")
  p.add_argument("--peers", type=_parse_peers, default=list(PEERS),
                 help=f"comma-separated subset of {','.join(PEERS)} (may be "
                      "empty)")
  p.add_argument("--ivf_lists", type=int, default=0,
                 help="faiss_ivfpq lists (0: 4 sqrt(n))")
  p.add_argument("--pq_bits", type=int, choices=(4, 8), default=4,
                 help="faiss_ivfpq: 4 (dim/2 fast-scan codes) or 8 (dim/4)")
  p.add_argument("--hnsw_m", type=int, default=32)
  p.add_argument("--ef_construction", type=int, default=200)
  p.add_argument("--estimate_num", type=int, default=1_000_000,
                 help="gallery size the HNSW build-time estimate is for")
  p.add_argument("--scann", action="append", default=[],
                 metavar="FIELD=VALUE",
                 help="override a ScannSettings field (repeatable)")
  p.add_argument("--json", default="", metavar="PATH",
                 help="write the table, sweeps and settings as JSON")
  args = p.parse_args(argv)
  k = args.k

  def log(text):
    print(text, flush=True)

  started = time.perf_counter()
  cores = search.available_cores()
  log(f"machine: {cpu_name()}, {cores} cores; jax {jax.__version__} on "
      f"{jax.devices()[0].platform}")
  t0 = time.perf_counter()
  notes = []
  if args.data == "procir":
    paths = sorted({f for pattern in args.embeddings
                    for f in (glob.glob(pattern) or [pattern])})
    if not paths:
      p.error("--data=procir needs --embeddings=PATH.npz [...]")
    gallery, queries, origin = load_embeddings(
        paths, args.queries + args.tuning_queries, args.seed)
    tuning_q = None
    if args.tuning_queries:
      if len(queries) <= args.tuning_queries:
        p.error(f"--tuning_queries={args.tuning_queries} leaves none of the "
                f"files' {len(queries)} queries to measure")
      held = np.random.default_rng(args.seed).permutation(len(queries))
      tuning_q = queries[np.sort(held[:args.tuning_queries])]
      keep = np.sort(held[args.tuning_queries:])
      queries, origin = np.ascontiguousarray(queries[keep]), origin[keep]
    data_desc = (f"procir: {len(paths)} file(s), {gallery.shape[0]} x "
                 f"{gallery.shape[1]} gallery, {len(queries)} queries")
    if len(gallery) < SMALL_GALLERY or len(queries) < SMALL_QUERIES:
      notes.append(
          f"small sample: {len(gallery)} gallery rows and {len(queries)} queries "
          f"(under {SMALL_GALLERY} / {SMALL_QUERIES}); ScaNN and the peers pick "
          "their structures from the size, so these numbers say little about "
          "a catalogue of 1M")
  else:
    dist = dict(DISTRIBUTIONS[args.data])
    spread = dist["spread"] if args.spread is None else args.spread
    noise = dist["query_noise"] if args.query_noise is None else args.query_noise
    clusters = args.clusters or max(1, args.num // dist["rows_per_cluster"])
    gallery, queries, origin = make_data(
        args.num, args.dim, clusters, args.queries, spread, noise, args.seed,
        dist.get("categories", 0), dist.get("category_spread", 1.0))
    data_desc = (f"{args.data}: {args.num} x {args.dim} gallery in {clusters} "
                 f"clusters (spread {spread}), {args.queries} queries (noise "
                 f"{noise})")
    tuning_q = (held_out_queries(gallery, origin, args.tuning_queries, noise,
                                 args.seed + 1)
                if args.tuning_queries else None)
  num, dim = gallery.shape
  tuned_on = (f"{len(tuning_q)} held-out queries" if tuning_q is not None
              else "gallery rows plus noise")
  data_desc += f"; ScaNN tuned on {tuned_on}"
  log(f"data: {data_desc} ({time.perf_counter() - t0:.1f} s)")
  for note in notes:
    log(f"note: {note}")

  # Exact search: the ground truth for every query, timed on --exact_queries.
  t0 = time.perf_counter()
  exact = search.ExactSearch(gallery)
  exact.search(queries[:exact.query_batch_size], k)  # compiles
  exact_build = time.perf_counter() - t0
  timed_q = queries[:args.exact_queries] if args.exact_queries else queries
  exact_time, (truth, _) = timed(lambda: exact.search(timed_q, k),
                                 iters=args.repeats)
  if len(timed_q) < len(queries):
    truth = np.concatenate([truth, exact.search(queries[len(timed_q):], k)[0]])
  exact_qps = len(timed_q) / exact_time
  exact = None  # frees its device copy of the gallery before the others build
  gc.collect()
  exact_hit = hit(truth, origin, k)
  log(f"exact: {exact_qps:.1f} queries/s over {len(timed_q)} queries"
      + ("" if exact_hit is None else
         f"; the query's target is in its top {k} for {exact_hit:.1%}")
      + f" (peak RSS so far {_peak_gib():.1f} GiB)")

  sweep_q = queries[:args.sweep_queries] if args.sweep_queries else queries
  rows = [dict(backend="exact (jax)", target="-", setting="brute force float32",
               build_s=exact_build, bytes_per_vector=4.0 * dim, recall=1.0,
               qps=exact_qps, reached=True)]
  sweeps, described, estimates = {}, {}, []

  def add_rows(backend, targets, bpv, stop_at, sweep_name=None):
    """Sweeps `backend` up to recall `stop_at`, then one row per (recall
    target, label)."""
    start = time.perf_counter()
    points = sweep(backend, sweep_q, truth[:len(sweep_q)], k, stop_at, log)
    sweeps[sweep_name or backend.name] = points
    for target, label in targets:
      found = settle(backend, queries, truth, k, points, target, args.repeats)
      row = dict(backend=backend.name, target=label, build_s=backend.build_s,
                 bytes_per_vector=bpv, target_recall=target)
      if found is None:
        best = max(points, key=lambda p: p["recall"])
        row.update(setting=f"not reached (max {best['recall']:.4f})",
                   recall=best["recall"], qps=None, reached=False,
                   knobs=best["knobs"])
      else:
        knobs, rec, qps = found
        row.update(setting=_setting(knobs), recall=rec, qps=qps, reached=True,
                   knobs=knobs)
      rows.append(row)
    log(f"{backend.name}: swept {len(points)} settings over {len(sweep_q)} "
        f"queries and timed its choices in {time.perf_counter() - start:.0f} s")

  # The project's ScaNN, built with its default settings for each target (the
  # tuning and the rescoring precision follow the target), then swept from there.
  overrides = {}
  for item in args.scann:
    key, value = item.split("=", 1)
    try:
      overrides[key] = json.loads(value)
    except ValueError:
      overrides[key] = value  # A string such as mode=tree_ah.
  matched = {}  # target -> the recall its default index reached
  for target in TARGETS:
    log(f"building scann for target recall@{k} {target:g} ...")
    scann = Scann(gallery, {"target_recall": target, **overrides}, tuning_q)
    name = f"scann {target:g}"
    described[name] = scann.describe()
    log(f"{name}: {described[name]} ({scann.build_s:.1f} s, peak RSS so far "
        f"{_peak_gib():.1f} GiB)")
    scann.search(queries[:256], k)  # warm-up
    scann_bpv = scann.bytes_per_vector()
    rec, qps = measure(scann, queries, truth, k, {}, args.repeats)
    matched[target] = rec
    rows.append(dict(backend="scann", target=f"default {target:g}",
                     setting=scann.default_setting(), build_s=scann.build_s,
                     bytes_per_vector=scann_bpv, recall=rec, qps=qps,
                     reached=True, knobs={}, tuned_recall=scann.tuned_recall(),
                     target_recall=target))
    add_rows(scann, [(target, f"{target:g}")], scann_bpv,
             stop_at=max(target, rec), sweep_name=name)
    scann.close()
    scann = None
    gc.collect()

  builders = {
      "faiss_ivfpq": lambda: FaissIvfPq(gallery, args.ivf_lists, args.pq_bits,
                                        args.seed),
      "faiss_hnsw": lambda: FaissHnsw(gallery, args.hnsw_m, args.ef_construction),
      "hnswlib": lambda: Hnswlib(gallery, args.hnsw_m, args.ef_construction,
                                 args.seed),
  }
  for name in args.peers:
    log(f"building {name} ...")
    try:
      backend = builders[name]()
    except ImportError as e:
      log(f"{name}: skipped, not installed ({e}); pip install -e .[bench]")
      continue
    except (RuntimeError, ValueError) as e:
      log(f"{name}: skipped, build failed ({e})")
      continue
    described[name] = backend.describe()
    log(f"{name}: {described[name]} ({backend.build_s:.1f} s, peak RSS so far "
        f"{_peak_gib():.1f} GiB)")
    if name != "faiss_ivfpq":
      estimate = build_estimate(name, backend.build_s, num, args.estimate_num)
      if estimate:
        estimates.append(estimate)
        log(f"estimate: {estimate}")
    add_rows(backend, [(t, f"{t:g}") for t in TARGETS]
             + [(r, f"=scann {t:g}") for t, r in matched.items()],
             backend.bytes_per_vector(),
             stop_at=max(*TARGETS, *matched.values()))
    backend.close()
    backend = None
    gc.collect()

  # Ratios: vs exact, and vs the best peer at the same target.
  best_peer = {}
  for r in rows:
    if r["backend"] in PEERS and r["qps"] is not None:
      if r["qps"] > best_peer.get(r["target"], {}).get("qps", 0):
        best_peer[r["target"]] = r
  for r in rows:
    r["x_exact"] = None if r["qps"] is None else r["qps"] / exact_qps
    peer = best_peer.get(r["target"].replace("default", "=scann"))
    r["x_peer"] = (None if r["qps"] is None or peer is None or
                   r["backend"].startswith("exact") else r["qps"] / peer["qps"])

  log("")
  log("build settings: " + "; ".join(f"{n}: {d}" for n, d in described.items()))
  log(f"{num} x {dim} ({args.data}), {len(queries)} queries, k={k}, "
      f"{cores} threads each")
  log(format_table(rows, k))
  for estimate in estimates:
    log(f"estimate: {estimate}")

  goals = {}
  for target in TARGETS:
    default = next(r for r in rows if r["target"] == f"default {target:g}")
    peer = best_peer.get(f"=scann {target:g}")
    if peer is not None:
      ratio = goals[f"vs_best_peer_{target:g}"] = default["qps"] / peer["qps"]
      log(f"goal 1: scann default for {target:g} (recall@{k} "
          f"{default['recall']:.4f}) {ratio:.2f}x the best peer at that recall "
          f"({peer['backend']}, {peer['setting']}): "
          f"{'met' if ratio >= 1 else 'not met'} (goal >= 1x at 1M)")
  at99 = next(r for r in rows if r["target"] == "default 0.99")
  goals["x_exact_at_0.99"] = at99["x_exact"]
  reached = at99["recall"] >= 0.99
  log(f"goal 2: scann default for 0.99: recall@{k} {at99['recall']:.4f}, "
      f"{at99['x_exact']:.1f}x exact: "
      f"{'met' if reached and at99['x_exact'] >= 100 else 'not met'} (goal "
      "recall >= 0.99 at >= 100x exact, at 1M)")

  peak_gb = _peak_gib()
  total_min = (time.perf_counter() - started) / 60
  log(f"peak memory {peak_gb:.1f} GiB, {total_min:.1f} min in all")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=cpu_name(), cores=cores, jax=jax.__version__,
                     data=args.data, description=data_desc, notes=notes,
                     num=num, dim=dim, queries=len(queries),
                     tuning_queries=0 if tuning_q is None else len(tuning_q), k=k,
                     exact_hit=exact_hit, args=vars(args), build=described,
                     rows=rows, sweeps=sweeps, estimates=estimates, goals=goals,
                     peak_memory_gib=peak_gb, minutes=total_min),
                f, indent=2)
    log(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
