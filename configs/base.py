"""The embedded default: ProCIR end to end on a synthetic FashionMV, on CPU.

  python -m procir_jax.main --config=configs/base.py --workdir=workdir/base

With no data or model given it writes a synthetic FashionMV into the workdir, builds
the TFDS dataset, creates a small random Qwen3.5 directory, trains with all four
mechanisms on (two-stage dialogue, caption alignment, chain of thought, an SFT stage
first), evaluates with the released protocol (5 views per product) and prints the
results table. Expect about 10 minutes on 2 CPU cores and recall@10 far above the
chance level printed beside the table (measured on 2 cores: 10.1 minutes; average R@10
60.6, chance 9.4). Every
value can be overridden, e.g. `--config.train.steps=50`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | sft | eval | embed | export
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.hf_dir = ""  # empty: make a tiny model directory in the workdir
  c.model.tiny_preset = "small"
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay fp32)
  c.model.checkpoint = ""  # a ProCIR checkpoint dir (orbax) to start from / evaluate
  # How the model runs (procir_jax/models/qwen3_5/options.py): attention kernel
  # auto | reference | xla | flash; delta rule auto | chunked | recurrent | pallas;
  # remat none | full | save_dots per decoder layer and vision block; scan_layers
  # compiles one period of layers instead of all of them. "auto" picks the Pallas
  # kernels on TPU and the XLA paths elsewhere.
  c.model.attention = "auto"
  c.model.delta_rule = "auto"
  c.model.remat = "none"
  c.model.scan_layers = False
  c.model.interpret_kernels = False  # Pallas kernels interpreted: TPU kernels on CPU

  c.data = ml_collections.ConfigDict()
  c.data.manual_dir = ""  # the FashionMV release; empty: synthetic in the workdir
  c.data.use_synthetic = True  # may an empty manual_dir mean synthetic data?
  c.data.data_dir = ""  # where TFDS builds fashionmv; empty: <workdir>/tfds
  c.data.synthetic = ml_collections.ConfigDict(dict(
      train_products=80, train_triplets=240, val_products=120, val_triplets=60,
      image_size=96))
  c.data.global_batch_size = 16
  c.data.eval_batch_size = 32
  c.data.worker_count = 0
  c.data.max_views = 3
  c.data.skip_bad_examples = False
  # Resize and normalise views as transformers' torchvision backend does (as the
  # released evaluation runs), or as its Pillow backend ("pil").
  c.data.image_backend = "torchvision"
  c.data.query_text = "modification_text_short"
  c.data.lengths = (64, 128, 192, 256, 384, 512, 768, 1024)
  c.data.patches = (64, 144, 256, 400, 576, 784, 1024)

  # The four switches of the paper's ablation.
  c.procir = ml_collections.ConfigDict(dict(two_stage=True, align=True, cot=True,
                                            sft=True))

  c.loss = ml_collections.ConfigDict(dict(
      retrieval=1.0, align_source=0.5, align_document=0.5, cot=0.2,
      temperature=0.05, learn_temperature=True, lm_chunk_tokens=32))

  c.train = ml_collections.ConfigDict(dict(
      steps=300, lr=1e-3, warmup_steps=30, final_lr_fraction=0.05,
      weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0, grad_accum=1,
      freeze=(), log_every=10, eval_every=0, checkpoint_every=100, max_to_keep=2,
      skip_nonfinite=False,
      # Resuming: a checkpoint that fails to restore is moved aside (never deleted)
      # and the next newest one restored; False stops with the error instead.
      fall_back_on_bad_checkpoint=True,
      # Resuming with a changed schedule length, batch size, seed, data or model is
      # refused (every change is listed); True resumes anyway.
      allow_resume_changes=False,
      # "A,B": trace steps A to B with jax.profiler into <workdir>/profile/<stage>/.
      profile_steps=""))

  c.sft = ml_collections.ConfigDict(dict(steps=20, lr=1e-3, warmup_steps=5))

  # mode=export: the trained model as a Hugging Face directory (procir_jax/export.py);
  # dir empty: <workdir>/hf_export; checkpoint: best (by validation, when kept) or
  # latest; dtype: bfloat16 (as Qwen3.5 ships) or float32.
  c.export = ml_collections.ConfigDict(dict(
      dir="", checkpoint="best", dtype="bfloat16", max_shard_gb=5.0))

  # mode=embed (README "Embedding a catalogue"). collection "products": every product
  # of `split` of the TFDS dataset `dataset` in `data_dir` (empty: data.data_dir, the
  # run's FashionMV; a catalogue packaged with the fashionmv builder works alike),
  # only `sources` when given (e.g. "deepfashion,f200k"), encoded as gallery
  # documents (eval.max_views views, data.eval_batch_size per step) into
  # <workdir>/embeddings/<name>/ (name empty: the split and the sources, e.g.
  # "validation"): `shard_size` products per shard file, stored as `dtype` (float32
  # or float16), each process writing its own shards; rerunning finishes an
  # interrupted collection; read it with procir_jax.eval.collection.open_collection.
  # Which record holds each product is read first, `key_block_records` records per
  # block spread over the processes, and kept in <workdir>/product_keys/ for reruns.
  # collection "evaluation": the evaluation's galleries and queries (eval.split,
  # eval.sources) as <workdir>/embeddings/<source>.npz, as the evaluation writes them.
  c.embed = ml_collections.ConfigDict(dict(
      collection="products", split="validation", sources=(), data_dir="",
      dataset="fashionmv/products", name="", shard_size=10000, dtype="float32",
      key_block_records=250_000))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Several hosts (procir_jax/main.py, README "Sharding and hosts"): coordinator_address
  # "" runs alone, "auto" lets JAX find the cluster (TPU pod slice, Slurm, ...),
  # "HOST:PORT" with num_processes and process_id names it. A process silent for
  # heartbeat_timeout_s (dead, or its host lost) stops all the others; they wait up to
  # initialization_timeout_s for each other at start.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=1, process_id=0, heartbeat_timeout_s=100,
      initialization_timeout_s=300))

  # backends: exact search (the released protocol's numbers) and, beside it, ScaNN
  # with its top-10 overlap with exact; validation during training uses exact only.
  c.eval = ml_collections.ConfigDict(dict(
      split="validation", sources=("deepfashion", "f200k", "fashiongen"),
      backends=("exact", "scann"), validation_sources=("deepfashion",),
      # Views encoded per product, as the released evaluation does (up to 5, in file
      # name order), whatever training uses.
      max_views=5))
  return c
