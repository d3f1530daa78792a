"""A catalogue bigger than memory: a sharded ScaNN index built and served within it.

The issue "catalogue-scale retrieval" asks that 10M x 1024 vectors build and serve
within this machine's 24 GB, with queries/s and recall@10 measured against exact
search computed in streaming blocks. This runs the path a shop would:

  1. data    a synthetic catalogue of `--num` rows (bench/search.py's `clusters`
             distribution, unless told otherwise) written block by block as an
             embedding collection, float16 as `--config.embed.dtype=float16`
             writes one (20 GB at 10M x 1024), and `--queries` queries near random
             rows of it;
  2. build   `tools/build_index.py --embeddings=<collection> --shard_rows=N
             --tuning_queries=<npy>` in a child process: one ScaNN index per N
             rows, saved and freed before the next, then tuned together to the
             target recall@10 (0.95) of the catalogue's exact top 10 on
             `--tuning_queries` queries made as the measured ones are (near other
             rows); its wall time and peak memory measured;
  3. exact   the exact top 10 of every query, streamed over the collection a block
             at a time (numpy float32 products; the gallery is never in memory);
  4. serve   the saved index loaded in a child process, which times the queries
             (`--repeats` passes of all of them in one call) and reports its peak
             memory; recall@10 is the mean share of the exact top 10 returned.

Each step's output is kept in `--workdir` and reused by a rerun (delete it to redo
a step), so an interrupted run goes on where it stopped.

  # 10M x 1024: about 20 GB of disk for the collection and 13 GB for the index.
  python -m bench.search_catalogue --workdir=/tmp/catalogue_10m --num=10000000

  # The catalogue partitioned by similarity across its shards (the build needs about
  # the collection's size again of scratch disk), on data with categories.
  python -m bench.search_catalogue --workdir=/tmp/categories_1m --num=1000000 \
      --data=categories --shard_rows=250000 --shard_by=similarity

The table's B/vec is the float16 rows on disk for exact search and the index's
memory per vector for ScaNN. Timings are wall-clock on whatever else the machine
runs; memory is each child's peak resident set (ru_maxrss), page cache not
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench import search as search_bench  # noqa: E402
from bench.common import timed  # noqa: E402
from procir_jax.eval import collection as collection_lib  # noqa: E402
from procir_jax.eval import recall  # noqa: E402
from procir_jax.eval.search import tuning  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Rows generated, and scored by the exact pass, per block.
BLOCK_ROWS = 65536


def _log(text: str) -> None:
  print(text, flush=True)


def _gib(kib: int) -> float:
  return kib / 2**20  # ru_maxrss is in KiB on Linux.


def _machine_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def write_data(args, where: pathlib.Path) -> None:
  """The synthetic catalogue as a collection, and its queries (queries.npy)."""
  coll_dir, queries_path = where / "collection", where / "queries.npy"
  if queries_path.exists() and (coll_dir / collection_lib.MANIFEST).exists():
    try:
      collection_lib.open_collection(coll_dir)
      _log(f"data: kept {coll_dir} and {queries_path}")
      return
    except ValueError as e:
      _log(f"data: {coll_dir} is incomplete ({e}); writing the missing shards")
  dist = search_bench.DISTRIBUTIONS[args.data]
  clusters = args.clusters or max(1, args.num // dist["rows_per_cluster"])
  rng = np.random.default_rng(args.seed)
  centres = search_bench.cluster_centres(rng, clusters, args.dim,
                                        dist.get("categories", 0),
                                        dist.get("category_spread", 1.0))
  origin = np.sort(rng.choice(args.num, args.queries, replace=False))
  targets = np.empty((args.queries, args.dim), np.float32)

  def blocks():
    for start in range(0, args.num, BLOCK_ROWS):
      stop = min(args.num, start + BLOCK_ROWS)
      assign = rng.integers(0, clusters, stop - start)
      block = search_bench.scatter(centres[assign], dist["spread"], rng)
      inside = (origin >= start) & (origin < stop)
      targets[inside] = block[origin[inside] - start]
      if start // BLOCK_ROWS % 16 == 0:
        _log(f"  data: {stop}/{args.num} rows")
      yield block

  start = time.perf_counter()
  ids = [f"synthetic/{i:09d}" for i in range(args.num)]
  stats = collection_lib.write_arrays(
      coll_dir, ids, blocks(), dim=args.dim, dtype="float16",
      shard_size=args.collection_shard_rows,
      fingerprint=dict(data=args.data, clusters=clusters, seed=args.seed),
      collection=dict(synthetic=args.data, num=args.num))
  queries = search_bench.scatter(targets, dist["query_noise"], rng)
  np.save(queries_path, queries)
  _log(f"data: {args.num} x {args.dim} ({args.data}, {clusters} clusters) in "
       f"{coll_dir}, {stats['written']} shards written, {stats['kept']} kept, "
       f"{time.perf_counter() - start:.0f} s; {len(queries)} queries")


def write_tuning_queries(args, where: pathlib.Path) -> pathlib.Path:
  """Queries to tune the index on (tuning_queries.npy), near other random rows
  than the measured queries', as the measured ones are made."""
  path = where / "tuning_queries.npy"
  if path.exists():
    return path
  coll = collection_lib.open_collection(where / "collection")
  rng = np.random.default_rng(args.seed + 1)
  rows = np.sort(rng.choice(len(coll), args.tuning_queries, replace=False))
  noise = search_bench.DISTRIBUTIONS[args.data]["query_noise"]
  np.save(path, search_bench.scatter(coll.rows(rows), noise, rng))
  return path


def build(args, where: pathlib.Path) -> dict:
  """tools/build_index.py over the collection, in a child process."""
  out, record = where / "index", where / "build.json"
  if record.exists() and (out / "index.json").exists():
    _log(f"build: kept {out}")
    return json.loads(record.read_text())
  cmd = [sys.executable, "tools/build_index.py",
         f"--embeddings={where / 'collection'}", f"--shard_rows={args.shard_rows}",
         f"--target_recall={args.target_recall}", f"--shard_by={args.shard_by}",
         f"--out={out}"]
  if args.tuning_queries:
    cmd.append(f"--tuning_queries={write_tuning_queries(args, where)}")
  _log("build: " + " ".join(cmd))
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=_REPO, check=False)
  if done.returncode:
    raise SystemExit(f"build failed (status {done.returncode}); its output is above")
  result = dict(seconds=time.perf_counter() - start,
                peak_gib=_gib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
  record.write_text(json.dumps(result))
  return result


def exact(args, where: pathlib.Path) -> dict:
  """Exact top k of every query, streamed over the collection."""
  path = where / "exact.npz"
  if path.exists():
    with np.load(path) as z:
      _log(f"exact: kept {path}")
      return dict(indices=z["indices"], seconds=float(z["seconds"]))
  coll = collection_lib.open_collection(where / "collection")
  queries = np.load(where / "queries.npy")
  start = time.perf_counter()
  indices, scores = tuning.exact_top_k_blocks(
      (emb for _, emb in coll.iter_blocks(BLOCK_ROWS)), queries, args.k)
  seconds = time.perf_counter() - start
  np.savez(path, indices=indices, scores=scores, seconds=seconds)
  return dict(indices=indices, seconds=seconds)


def serve(where: pathlib.Path, k: int, repeats: int) -> None:
  """In the child: loads the index, times the queries, writes serve.json."""
  from procir_jax.eval import search  # pylint: disable=g-import-not-at-top
  queries = np.load(where / "queries.npy")
  start = time.perf_counter()
  index = search.load_index(where / "index")
  load_s = time.perf_counter() - start
  index.search(queries[:256], k)  # warm-up
  seconds, (found, _) = timed(lambda: index.search(queries, k), iters=repeats)
  # As ids: a partitioned index numbers its rows in its own order.
  np.save(where / "found_ids.npy",
          np.array([[index.ids[i] if i >= 0 else "" for i in row] for row in found]))
  result = dict(load_s=load_s, qps=len(queries) / seconds,
                bytes_per_vector=index.bytes_per_vector,
                memory_per_vector=index.memory_per_vector(),
                describe=index.describe(), tuned_recall=index.tuned_recall,
                shards=len(getattr(index, "shards", [index])),
                peak_gib=_gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
  (where / "serve.json").write_text(json.dumps(result, indent=1))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="where each step's output goes")
  p.add_argument("--num", type=int, default=10_000_000, help="catalogue rows")
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--data", choices=tuple(search_bench.DISTRIBUTIONS),
                 default="clusters")
  p.add_argument("--clusters", type=int, default=0, help="0: from --data")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--shard_rows", type=int, default=500_000,
                 help="rows per index shard")
  p.add_argument("--shard_by", choices=("order", "similarity"), default="order",
                 help="tools/build_index.py's --shard_by")
  p.add_argument("--collection_shard_rows", type=int, default=100_000,
                 help="rows per collection shard file")
  p.add_argument("--target_recall", type=float, default=0.95)
  p.add_argument("--tuning_queries", type=int, default=500,
                 help="queries the shards are tuned on together, against the "
                      "catalogue's exact top 10 (0: each shard tunes on its own "
                      "rows plus noise)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  where = pathlib.Path(args.workdir)
  if args.serve:  # The child process of step 4.
    serve(where, args.k, args.repeats)
    return None
  where.mkdir(parents=True, exist_ok=True)
  _log(f"machine: {search_bench.cpu_name()}, {os.cpu_count()} cores, "
       f"{_machine_gib():.1f} GiB")

  write_data(args, where)
  built = build(args, where)
  _log(f"build: {built['seconds'] / 60:.1f} min, peak {built['peak_gib']:.1f} GiB")
  truth = exact(args, where)
  queries = len(truth["indices"])
  exact_qps = queries / truth["seconds"]
  _log(f"exact: {exact_qps:.2f} queries/s streamed from disk")
  child = subprocess.run([sys.executable, "-m", "bench.search_catalogue", "--serve",
                          f"--workdir={where}", f"--k={args.k}",
                          f"--repeats={args.repeats}"], cwd=_REPO, check=False)
  if child.returncode:
    raise SystemExit(f"serving failed (status {child.returncode})")
  served = json.loads((where / "serve.json").read_text())
  found = np.load(where / "found_ids.npy")
  ids = collection_lib.open_collection(where / "collection").ids
  exact_ids = np.array([[ids[i] for i in row] for row in truth["indices"]])
  del ids
  per_query = recall.overlaps(found, exact_ids, args.k)
  got = float(per_query.mean())
  # The queries are a sample: the error of their mean says how far the recall
  # measured here may sit from the catalogue's.
  stderr = float(per_query.std(ddof=1) / np.sqrt(len(per_query)))

  machine = _machine_gib()
  _log("")
  _log(f"{args.num} x {args.dim} ({args.data}), {queries} queries, k={args.k}; "
       f"index: {served['describe']}")
  _log(f"{'':<22}{'recall@' + str(args.k):>10}{'queries/s':>11}{'x exact':>9}"
       f"{'B/vec':>8}{'build min':>10}{'build GiB':>10}{'serve GiB':>10}")
  _log(f"{'exact, from disk':<22}{1.0:>10.4f}{exact_qps:>11.2f}{1.0:>9.1f}"
       f"{2 * args.dim:>8}{'-':>10}{'-':>10}{'-':>10}")
  _log(f"{'scann, ' + str(served['shards']) + ' shards':<22}{got:>10.4f}"
       f"{served['qps']:>11.0f}{served['qps'] / exact_qps:>9.1f}"
       f"{served['bytes_per_vector']:>8.0f}{built['seconds'] / 60:>10.1f}"
       f"{built['peak_gib']:>10.1f}{served['peak_gib']:>10.1f}")
  _log(f"recall@{args.k} {got:.4f} +/- {stderr:.4f} (one standard error over "
       f"{queries} queries)")
  _log(f"build peak {built['peak_gib']:.1f} GiB, serving peak "
       f"{served['peak_gib']:.1f} GiB, machine {machine:.1f} GiB: "
       f"{'within' if max(built['peak_gib'], served['peak_gib']) < machine else 'over'}"
       " its memory")
  result = dict(num=args.num, dim=args.dim, data=args.data, queries=queries,
                recall=got, recall_stderr=stderr, qps=served["qps"],
                exact_qps=exact_qps, build=built, serve=served,
                machine_gib=machine)
  (where / "result.json").write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
