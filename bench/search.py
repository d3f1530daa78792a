"""Queries/s and recall@10: ScaNN (default settings) vs exact JAX search.

Both search the same synthetic gallery of clustered unit vectors with the same
queries, in one run, on the same machine. The gallery is `--clusters` random
unit centres with points scattered around them (cosine to the centre about
`1 / sqrt(1 + spread^2)`); each query is a gallery point plus noise, as a
composed query lands near, not on, its target.

  python -m bench.search                      # 100K x 1024, about a minute
  python -m bench.search --num=1000000 --exact_queries=500   # 1M, ~16 GB RAM

Prints, for each backend, build time, queries/s and recall@10, then the
ratio. Recall@10 is the mean share of exact search's top 10 that a backend
returns (1 for exact search by definition); "hit@10" is the share of queries
whose generating gallery point is in the top 10. The goal on 1M vectors on two
cores is ScaNN >= 20x exact's queries/s with recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import timed  # noqa: E402
from procir_jax.eval import search  # noqa: E402


def _unit(x):
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def make_data(num, dim, clusters, queries, spread, query_noise, seed):
  """Clustered unit gallery [num, dim] and queries near gallery points."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.standard_normal((clusters, dim), dtype=np.float32))
  assign = rng.integers(0, clusters, num)
  gallery = np.empty((num, dim), np.float32)
  step = 65536  # Bounded temporaries at 1M rows.
  for start in range(0, num, step):
    stop = min(num, start + step)
    noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
    noise *= spread / np.sqrt(dim)
    noise += centres[assign[start:stop]]
    gallery[start:stop] = _unit(noise)
  origin = rng.choice(num, queries, replace=False)
  noise = rng.standard_normal((queries, dim), dtype=np.float32)
  q = _unit(gallery[origin] + noise * (query_noise / np.sqrt(dim)))
  return gallery, q, origin


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def overlap(a, b, k):
  return float(np.mean([len(set(x[:k]) & set(y[:k])) / k
                        for x, y in zip(a.tolist(), b.tolist())]))


def hit(indices, origin, k):
  return float(np.mean((indices[:, :k] == origin[:, None]).any(axis=1)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num", type=int, default=100_000, help="gallery size")
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--clusters", type=int, default=0,
                 help="cluster count (0: num / 100)")
  p.add_argument("--queries", type=int, default=2000)
  p.add_argument("--exact_queries", type=int, default=0,
                 help="queries timed for exact search (0: all); recall uses "
                      "exact results for all queries either way")
  p.add_argument("--spread", type=float, default=1.0)
  p.add_argument("--query_noise", type=float, default=0.5)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=2,
                 help="timed passes per backend (their mean counts)")
  p.add_argument("--scann", action="append", default=[],
                 metavar="FIELD=VALUE",
                 help="override a ScannSettings field (repeatable)")
  args = p.parse_args(argv)

  clusters = args.clusters or max(1, args.num // 100)
  print(f"machine: {cpu_name()}, "
        f"{search.available_cores()} cores; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  t0 = time.perf_counter()
  gallery, queries, origin = make_data(args.num, args.dim, clusters,
                                       args.queries, args.spread,
                                       args.query_noise, args.seed)
  print(f"data: {args.num} x {args.dim} gallery in {clusters} clusters, "
        f"{args.queries} queries ({time.perf_counter() - t0:.1f} s)")

  # Exact search: warm up (compile) on one batch, then time.
  t0 = time.perf_counter()
  exact = search.ExactSearch(gallery)
  exact.search(queries[:exact.query_batch_size], args.k)
  exact_build = time.perf_counter() - t0
  timed_q = queries[:args.exact_queries] if args.exact_queries else queries
  exact_time, (exact_idx, _) = timed(lambda: exact.search(timed_q, args.k),
                                     iters=args.repeats)
  if len(timed_q) < len(queries):
    rest = exact.search(queries[len(timed_q):], args.k)[0]
    exact_idx = np.concatenate([exact_idx, rest])
  exact_qps = len(timed_q) / exact_time
  exact = None  # frees its device copy of the gallery before ScaNN builds

  overrides = {}
  for item in args.scann:
    key, value = item.split("=", 1)
    try:
      overrides[key] = json.loads(value)
    except ValueError:
      overrides[key] = value  # A string such as mode=tree_ah.
  t0 = time.perf_counter()
  scann = search.ScannSearch(gallery, settings=overrides)
  scann_build = time.perf_counter() - t0
  scann.search(queries[:256], args.k)  # Warm-up.
  scann_time, (scann_idx, _) = timed(lambda: scann.search(queries, args.k),
                                     iters=args.repeats)
  scann_qps = len(queries) / scann_time

  s = scann.settings
  print(f"scann settings: mode={s.mode} leaves={s.num_leaves} "
        f"searched={s.leaves_to_search} spherical={s.spherical} "
        f"dims_per_block={s.dims_per_block} "
        f"reorder={s.reorder_num_neighbors} threads={scann.threads}")
  k = args.k
  rows = [("exact (jax)", exact_build, exact_qps, 1.0,
           hit(exact_idx, origin, k)),
          ("scann", scann_build, scann_qps, overlap(scann_idx, exact_idx, k),
           hit(scann_idx, origin, k))]
  print(f"{'backend':<12}{'build s':>9}{'queries/s':>12}"
        f"{'recall@' + str(k):>11}{'hit@' + str(k):>8}")
  for name, build, qps, rec, h in rows:
    print(f"{name:<12}{build:>9.1f}{qps:>12.1f}{rec:>11.4f}{h:>8.4f}")
  ratio = scann_qps / exact_qps
  print(f"scann / exact: {ratio:.1f}x queries/s at recall@{k} "
        f"{rows[1][3]:.4f} (goal on 1M: >= 20x at >= 0.95)")


if __name__ == "__main__":
  main()
