"""The search benchmark runs on every cheap data path (speed is never asserted)."""

import json
import re

import numpy as np
import pytest

from bench import search as bench

# Tiny: ScaNN picks brute force at this size unless told otherwise.
SMALL = ["--num=2000", "--dim=32", "--queries=40", "--repeats=1", "--k=10"]
ROW = re.compile(r"^(exact \(jax\)|scann|faiss_ivfpq|faiss_hnsw|hnswlib)\s+"
                 r"(-|default 0\.9[59]|0\.95|0\.99|=scann 0\.9[59])\s")


def _table_rows(out):
  """(backend, target, recall) of each table row of the printed output."""
  head = out.index("backend ")
  rows = []
  for line in out[head:].splitlines()[2:]:
    match = ROW.match(line)
    if not match:
      break
    # The columns end: recall, queries/s, x exact, x peer ("-" where none).
    rows.append((match.group(1), match.group(2), float(line.split()[-4])))
  return rows


def _check(out, backends):
  rows = _table_rows(out)
  assert {b for b, _, _ in rows} == set(backends), out
  for backend, target, recall in rows:
    assert 0.0 <= recall <= 1.0, (backend, target, recall)
  assert ("exact (jax)", "-", 1.0) in rows
  assert {t for b, t, _ in rows if b == "scann"} == {
      "default 0.95", "0.95", "default 0.99", "0.99"}, out
  for peer in set(backends) & set(bench.PEERS):
    assert {t for b, t, _ in rows if b == peer} == {
        "0.95", "0.99", "=scann 0.95", "=scann 0.99"}


def _procir_npz(path, rng):
  """A small npz shaped as report.save_embeddings writes one."""
  gallery = rng.standard_normal((300, 32)).astype(np.float32)
  targets = rng.choice(300, 30, replace=False)
  q = gallery[targets] + 0.3 * rng.standard_normal((30, 32)).astype(np.float32)
  np.savez(path, gallery=gallery, q=q,
           gallery_ids=np.array([f"p{i}" for i in range(300)]),
           target_ids=np.array([f"p{i}" for i in targets]))
  return str(path)


def test_every_distribution_runs(tmp_path, capsys):
  """Exact and ScaNN on each data path; ScaNN's tree sweep once; JSON out."""
  rng = np.random.default_rng(0)
  npz = [_procir_npz(tmp_path / f"d{i}.npz", rng) for i in range(2)]
  runs = {
      "clusters": ["--data=clusters"],
      # Forces a small tree, so the leaves x reorder sweep runs.
      "overlap": ["--data=overlap", "--scann=mode=tree_ah",
                  "--scann=num_leaves=8", "--scann=min_partition_size=10"],
      "procir": ["--data=procir", "--embeddings", *npz],
      "categories": ["--data=categories"],
  }
  for name, flags in runs.items():
    out_json = tmp_path / f"{name}.json"
    bench.main([*SMALL, *flags, "--peers=", f"--json={out_json}"])
    out = capsys.readouterr().out
    _check(out, {"exact (jax)", "scann"})
    saved = json.loads(out_json.read_text())
    assert len(saved["rows"]) == len(_table_rows(out))
    if name == "procir":
      # 600 rows, 60 queries from two files: flagged as a small sample; the
      # files name each query's target, and exact search finds it.
      assert "note: small sample" in out
      assert saved["num"] == 600 and saved["queries"] == 40
      assert saved["exact_hit"] == pytest.approx(1.0)
    if name == "overlap":
      assert len(saved["sweeps"]["scann 0.99"]) > 1


def test_scann_tunes_on_held_out_queries(tmp_path, capsys):
  """--tuning_queries: ScaNN tunes on queries that are never measured."""
  gallery, queries, origin = bench.make_data(500, 16, 25, 50, 1.0, 0.5, 0)
  held = bench.held_out_queries(gallery, origin, 30, 0.5, 1)
  assert held.shape == (30, 16)
  # Each is near a row no measured query starts from, and none is measured.
  nearest = np.argmax(held @ gallery.T, axis=1)
  assert not set(nearest.tolist()) & set(origin.tolist())
  with pytest.raises(ValueError, match="--tuning_queries=451"):
    bench.held_out_queries(gallery, origin, 451, 0.5, 1)

  rng = np.random.default_rng(0)
  npz = _procir_npz(tmp_path / "d.npz", rng)
  for flags in (["--data=clusters"], ["--data=procir", "--embeddings", npz]):
    out_json = tmp_path / "tuned.json"
    bench.main([*SMALL, "--scann=mode=ah", "--tuning_queries=20", *flags,
                "--peers=", f"--json={out_json}"])
    out = capsys.readouterr().out
    _check(out, {"exact (jax)", "scann"})
    saved = json.loads(out_json.read_text())
    assert saved["tuning_queries"] == 20
    # procir: 20 of the file's 30 queries tune, the other 10 are measured.
    assert saved["queries"] == (40 if flags[0] == "--data=clusters" else 10)
    assert "ScaNN tuned on 20 held-out queries" in saved["description"]
    for target in ("0.95", "0.99"):
      assert "tuned_on=20:given" in saved["build"][f"scann {target}"]


def test_peers_run(capsys):
  """Each peer gets rows at 0.95, 0.99 and the recalls of ScaNN's defaults."""
  pytest.importorskip("faiss")
  pytest.importorskip("hnswlib")
  bench.main([*SMALL, "--data=clusters", "--peers=" + ",".join(bench.PEERS)])
  _check(capsys.readouterr().out, {"exact (jax)", "scann", *bench.PEERS})


def test_catalogue_benchmark_runs_and_resumes(tmp_path, capsys):
  """The catalogue path end to end on a tiny catalogue: collection, sharded index
  through tools/build_index.py, streamed exact search, serving; a rerun reuses
  every step."""
  from bench import search_catalogue
  flags = [f"--workdir={tmp_path}", "--num=3000", "--dim=16", "--queries=50",
           "--shard_rows=1000", "--collection_shard_rows=700", "--repeats=1"]
  result = search_catalogue.main(flags)
  out = capsys.readouterr().out
  assert result["serve"]["shards"] == 3 and result["queries"] == 50
  # Shards this small are searched by brute force: exact.
  assert result["recall"] == pytest.approx(1.0)
  assert re.search(r"scann, 3 shards\s+1\.0000", out), out
  assert "within its memory" in out
  again = search_catalogue.main(flags)
  out = capsys.readouterr().out
  for step in ("data", "build", "exact"):
    assert f"{step}: kept" in out, out
  assert again["recall"] == result["recall"]


def test_catalogue_benchmark_partitioned_by_similarity(tmp_path, capsys):
  """--shard_by=similarity on data with categories: the shards follow them, and
  the tuned index searches fewer shards than it has at the target recall."""
  from bench import search_catalogue
  result = search_catalogue.main([
      f"--workdir={tmp_path}", "--num=4000", "--dim=32", "--queries=200",
      "--data=categories", "--clusters=200", "--shard_rows=1000",
      "--collection_shard_rows=1500", "--shard_by=similarity", "--repeats=1"])
  out = capsys.readouterr().out
  assert result["serve"]["shards"] == 5, out  # ceil(4000 * 1.15 / 1000)
  assert "partitioned by similarity: each query searches the" in out
  assert "searches the 5 of 5" not in out
  # The target holds on the fresh queries, up to three standard errors.
  assert 0 < result["recall_stderr"] < 0.02, out
  assert result["recall"] >= 0.95 - 3 * result["recall_stderr"], out
