"""The grain input pipeline: batches, determinism, resume, sharding, buckets, errors."""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from procir_jax.data import bucketing, examples, pipeline
from procir_jax.data import tokenizer as tok


@pytest.fixture(scope="module")
def config(fashionmv_data_dir, tiny_tokenizer_dir):
  return pipeline.DataConfig(data_dir=str(fashionmv_data_dir),
                             model_dir=str(tiny_tokenizer_dir), global_batch_size=4)


def _ids(batch):
  return [json.dumps(i, sort_keys=True) for i in batch["meta"]["ids"]]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_contrastive_batch_contents(config, tiny_tokenizer_dir):
  records = pipeline.records_for("contrastive", config, "train")
  assert len(records) == 60  # 20 triplets x 3 sources
  batch = next(iter(pipeline.make_loader("contrastive", config, records, train=True)))
  tokenizer = tok.load_tokenizer(str(tiny_tokenizer_dir))
  emb = tokenizer.convert_tokens_to_ids(tok.EMB_TOKEN)
  pad = tokenizer.convert_tokens_to_ids(tok.IMAGE_PAD)
  assert batch["valid"].all()
  for name, num_emb in (("query", 2), ("document", 1), ("source_caption", 1),
                        ("target_caption", 1)):
    part = batch[name]
    assert part["input_ids"].shape[1] in config.buckets.lengths
    rows = np.arange(4)[:, None]
    assert (part["input_ids"][rows, part["emb_positions"]] == emb).all()
    assert part["emb_positions"].shape == (4, num_emb)
    lengths = part["attention_mask"].sum(1)
    assert (part["attention_mask"] == (np.arange(part["input_ids"].shape[1]) <
                                       lengths[:, None])).all()  # right padded
  for name in ("query", "document"):
    part = batch[name]
    # One group of slots (image_groups=1) of uint8 patches of one frame.
    groups, slots, patches, dim = part["patches"].shape
    assert part["patches"].dtype == np.uint8 and (groups, dim) == (1, 3 * 16 * 16)
    assert patches in config.buckets.patches
    per_image = part["image_grid_thw"][0].prod(-1)  # [slots], zero for empty slots
    assert per_image.astype(bool).sum() == (per_image > 0).sum()
    views = (part["image_slot"] >= 0)
    tokens = views.sum(1)
    assert ((part["input_ids"] == pad) == views).all()
    assert tokens.sum() == per_image.sum() // 4  # one token per 2x2 merged patches
    # Real views fill the first slots; every row's tokens name its own slots.
    real = int((per_image > 0).sum())
    assert (per_image[:real] > 0).all() and not per_image[real:].any()
    assert slots in [max(1, int(np.ceil(f * 4 * 5))) for f in config.buckets.image_fill]
    for v, n in enumerate(per_image):  # padding patches are zeros
      assert not part["patches"][0, v, n:].any()
      assert n == 0 or part["patches"][0, v, n - 1].any()
    for i in range(4):
      shown = np.unique(part["image_slot"][i][views[i]])
      for v in shown:  # image v of the row has grid h*w/4 tokens at positions 0..
        pos = part["image_pos"][i][part["image_slot"][i] == v]
        np.testing.assert_array_equal(pos, np.arange(per_image[v] // 4))
  text = tokenizer.decode(batch["query"]["input_ids"][0])
  assert "make it" in text and text.count("<|im_start|>assistant") == 2
  assert not batch["query"]["loss_mask"].any()  # no chain of thought by default


def test_chain_of_thought_and_single_stage_options(config):
  import dataclasses
  cot = dataclasses.replace(config, options=examples.ExampleOptions(cot=True))
  records = pipeline.records_for("contrastive", cot, "train")
  batch = next(iter(pipeline.make_loader("contrastive", cot, records, train=True)))
  assert batch["query"]["loss_mask"].any(axis=1).all()
  single = dataclasses.replace(
      config, options=examples.ExampleOptions(two_stage=False, align=False))
  batch = next(iter(pipeline.make_loader("contrastive", single, records, train=True)))
  assert batch["query"]["emb_positions"].shape == (4, 1)
  assert "source_caption" not in batch


def test_same_seed_same_order_and_new_order_each_epoch(config):
  records = pipeline.records_for("contrastive", config, "train")
  epoch = len(records) // 4
  first = [_ids(b) for b in _take(iter(pipeline.make_loader(
      "contrastive", config, records, train=True)), 2 * epoch)]
  again = [_ids(b) for b in _take(iter(pipeline.make_loader(
      "contrastive", config, records, train=True)), 2 * epoch)]
  assert first == again
  epoch1 = sorted(sum(first[:epoch], []))
  epoch2 = sorted(sum(first[epoch:], []))
  assert epoch1 == epoch2 and len(set(epoch1)) == len(records)  # each once per epoch
  assert sum(first[:epoch], []) != sum(first[epoch:], [])  # reshuffled


def test_iterator_state_resumes_on_the_next_example(config):
  records = pipeline.records_for("contrastive", config, "train")
  loader = pipeline.make_loader("contrastive", config, records, train=True)
  iterator = iter(loader)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = [_ids(b) for b in _take(iterator, 4)]
  fresh = iter(pipeline.make_loader(
      "contrastive", config, pipeline.records_for("contrastive", config, "train"),
      train=True))
  fresh.set_state(state)
  assert [_ids(b) for b in _take(fresh, 4)] == expected


def test_worker_processes_are_deterministic(config):
  """With workers, each worker batches its own share of the sampler's indices, so
  batches group differently than in-process, but the run is just as reproducible."""
  import dataclasses
  records = pipeline.records_for("contrastive", config, "train")
  workers = dataclasses.replace(config, worker_count=2)
  epoch = len(records) // 4
  runs = [_take(iter(pipeline.make_loader("contrastive", workers, records,
                                          train=True)), epoch) for _ in range(2)]
  for a, b in zip(*runs):
    assert _ids(a) == _ids(b)
    np.testing.assert_array_equal(a["query"]["patches"], b["query"]["patches"])
  first_40 = sum(map(_ids, runs[0][:10]), [])  # within the first epoch
  assert len(set(first_40)) == 40


def test_evaluation_pads_the_last_batch(config):
  records = pipeline.records_for("eval_query", config, "validation",
                                 sources=["deepfashion"])
  assert len(records) == 8
  import dataclasses
  cfg = dataclasses.replace(config, global_batch_size=3)
  batches = list(pipeline.make_loader("eval_query", cfg, records, train=False))
  assert len(batches) == 3
  assert [b["valid"].sum() for b in batches] == [3, 3, 2]
  assert batches[-1]["meta"]["ids"][-1] is None
  assert not batches[-1]["query"]["attention_mask"][-1].any()
  rows = [int(i["row"]) for b in batches for i in b["meta"]["ids"] if i]
  assert rows == sorted(rows)  # file order


def test_gallery_of_chosen_products(config):
  products = pipeline.records_for("gallery", config, "validation")
  keys = products.keys()[:5]
  subset = pipeline.records_for("gallery", config, "validation", product_keys=keys)
  batches = list(pipeline.make_loader("gallery", config, subset, train=False))
  got = [(i["source"], i["product_id"]) for b in batches for i in b["meta"]["ids"] if i]
  assert got == keys


def test_buckets_bound_compilations(config):
  import dataclasses
  cfg = dataclasses.replace(config, buckets=bucketing.Buckets(
      lengths=(48, 64, 96, 128), patches=(16, 64, 144)))
  records = pipeline.records_for("contrastive", cfg, "train")
  traces = []

  @jax.jit
  def step(batch):
    traces.append(1)  # runs once per compilation
    return (batch["query"]["input_ids"].sum() +
            batch["document"]["patches"].astype(jnp.int32).sum())

  report = bucketing.PaddingReport()
  shapes = set()
  for batch in _take(iter(pipeline.make_loader("contrastive", cfg, records,
                                               train=True)), 15):
    report.update(batch)
    part = pipeline.device_part(batch)
    shapes.add(tuple(jax.tree.leaves(jax.tree.map(np.shape, part))))
    step(part)
  assert len(traces) == len(shapes) < 15
  summary = report.summary()
  assert all(0.0 <= v["waste"] < 1.0 for v in summary.values())
  assert sum(v["batches"] for k, v in summary.items()
             if k.startswith("query/tokens")) == 15
  assert "padding over" in str(report)


def test_too_long_example_names_the_product(config):
  import dataclasses
  cfg = dataclasses.replace(config, buckets=bucketing.Buckets(lengths=(16,)))
  records = pipeline.records_for("gallery", cfg, "train")
  with pytest.raises(examples.BadExampleError, match=r"document of product '.*' \(.*\) "
                     r"renders to \d+ tokens, more than the largest length bucket 16"):
    next(iter(pipeline.make_loader("gallery", cfg, records, train=False)))


def test_undecodable_image_is_an_error_or_a_counted_skip(config):
  import dataclasses
  records = pipeline.records_for("gallery", config, "validation")

  class Corrupt:
    """The second product's first view is not an image."""

    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      product = records[i]
      if i == 1:
        product = dataclasses.replace(product, views=(b"not a jpeg",) + product.views)
      return product

  with pytest.raises(examples.BadExampleError,
                     match=r"Could not decode an image of product '.*'.*skip_bad"):
    list(pipeline.make_loader("gallery", config, Corrupt(), train=False))
  skip = dataclasses.replace(config, skip_bad_examples=True)
  batches = list(pipeline.make_loader("gallery", skip, Corrupt(), train=False))
  counter = {}
  for b in batches:
    pipeline.log_skips(b, counter)
  assert counter == {"skipped": 1}
  assert not batches[0]["valid"][1] and batches[0]["valid"][0]
  assert sum(b["valid"].sum() for b in batches) == len(records) - 1


def test_global_batches_on_the_mesh(config):
  mesh = jax.make_mesh((8,), ("data",))
  import dataclasses
  cfg = dataclasses.replace(config, global_batch_size=8)
  records = pipeline.records_for("contrastive", cfg, "train")
  sharding = lambda ndim: jax.sharding.NamedSharding(  # noqa: E731
      mesh, jax.sharding.PartitionSpec("data", *([None] * (ndim - 1))))
  batch = next(iter(pipeline.make_loader("contrastive", cfg, records, train=True)))
  with pytest.raises(ValueError, match="image_groups"):
    pipeline.to_global(batch, sharding)  # one image group cannot split 8 ways
  cfg = dataclasses.replace(cfg, image_groups=8)
  batch = next(iter(pipeline.make_loader("contrastive", cfg, records, train=True)))
  arrays = pipeline.to_global(batch, sharding)
  assert arrays["query"]["input_ids"].shape == batch["query"]["input_ids"].shape
  # Device d holds row d and the image group of that row.
  for shard in arrays["query"]["patches"].addressable_shards:
    row = shard.index[0].start
    assert shard.data.shape[0] == 1
    # The row's image tokens.
    tokens = int((batch["query"]["image_slot"][row] >= 0).sum())
    assert batch["query"]["image_grid_thw"][row].prod(-1).sum() == 4 * tokens
  np.testing.assert_array_equal(np.asarray(arrays["document"]["input_ids"]),
                                batch["document"]["input_ids"])


_SHARD_SCRIPT = """
import json, sys
import jax
import jax.numpy as jnp
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from procir_jax.data import pipeline
cfg = pipeline.DataConfig(data_dir=sys.argv[3], model_dir=sys.argv[4],
                          global_batch_size=4)
records = pipeline.records_for("contrastive", cfg, "train")
it = iter(pipeline.make_loader("contrastive", cfg, records, train=True))
ids = [i for _ in range(7) for i in next(it)["meta"]["ids"]]
json.dump(ids, open(sys.argv[5], "w"))
"""


def test_two_processes_read_disjoint_shards(tmp_path, fashionmv_data_dir,
                                            tiny_tokenizer_dir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "shard.py"
  script.write_text(_SHARD_SCRIPT)
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, str(script), f"127.0.0.1:{port}", str(i),
       str(fashionmv_data_dir), str(tiny_tokenizer_dir), str(tmp_path / f"{i}.json")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  ids = [[json.dumps(i, sort_keys=True) for i in json.loads(
      pathlib.Path(tmp_path / f"{r}.json").read_text())] for r in range(2)]
  # 7 batches x 2 examples each: one epoch (60 triplets) is 15 batches per process.
  assert len(ids[0]) == len(ids[1]) == 14
  assert not set(ids[0]) & set(ids[1])
