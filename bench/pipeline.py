"""Input pipeline speed: contrastive examples per second per CPU core.

  python -m bench.pipeline [--examples=96] [--model_examples_per_s=N]

On synthetic FashionMV products of 4 views at 256x256 it measures, on one core:
* this project's path (array_record read, OpenCV decode, NumPy patching, dialogue
  rendering, bucketed collation), stage by stage;
* the transformers path a PyTorch reference uses for the same examples (PIL decode,
  transformers' Qwen3.5 image processor, chat template + tokenizer);
and prints both and their ratio. With --model_examples_per_s (the training step's
measured examples per second on an accelerator) it prints how many cores the pipeline
needs to keep that accelerator fed.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

_EXAMPLES = flags.DEFINE_integer("examples", 96, "Contrastive examples to time.")
_MODEL_RATE = flags.DEFINE_float(
    "model_examples_per_s", 0.0,
    "Training examples per second of the model step on the accelerator; when set, "
    "the cores needed to feed it are printed.")


def _prepare(root: str):
  """Synthetic release -> TFDS -> tiny tokenizer directory."""
  import tensorflow_datasets as tfds
  import tfds_fashionmv  # noqa: F401
  from procir_jax import tiny_model
  from tfds_fashionmv import synthetic

  release = os.path.join(root, "release")
  synthetic.generate(release, synthetic.SyntheticConfig(
      train_products=40, train_triplets=60, val_products=4, val_triplets=4,
      image_size=256, min_views=4, max_views=4))
  data_dir = os.path.join(root, "tfds")
  for config in ("products", "triplets"):
    tfds.builder(f"fashionmv/{config}", data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=release))
  model_dir = os.path.join(root, "model")
  tiny_model.write_tokenizer_files(model_dir, "small")
  return data_dir, model_dir


def _ours(records, config, n):
  """Seconds per stage for n contrastive examples (and one collated batch each 8)."""
  from procir_jax.data import examples, pipeline

  builder, pad_id = pipeline.make_builder(config)
  stages = dict.fromkeys(("read", "decode", "patching", "tokenisation", "collate"), 0.0)
  collate = pipeline.make_collate("contrastive", config, pad_id, 8)
  pending = []
  for i in range(n):
    t0 = time.perf_counter()
    joined = records[i % len(records)]
    t1 = time.perf_counter()
    decoded = {}
    for side in ("source", "target"):
      product = getattr(joined, side)
      decoded[side] = [examples.decode_image(v, side) for v in product.views]
    t2 = time.perf_counter()
    patches = {side: builder.processor.patchify(images)
               for side, images in decoded.items()}
    t3 = time.perf_counter()
    counts = {side: [builder.processor.num_image_tokens(*im.shape[:2]) for im in images]
              for side, images in decoded.items()}
    d = builder.dialogues
    query = d.two_stage_query(counts["source"],
                              joined.triplet.texts["modification_text_short"])
    document = d.document(counts["target"])
    captions = (d.caption(joined.source.caption_long),
                d.caption(joined.target.caption_long))
    t4 = time.perf_counter()
    pending.append({"sequences": {
        "query": builder.sequence(query, patches["source"].patches,
                                  patches["source"].image_grid_thw),
        "document": builder.sequence(document, patches["target"].patches,
                                     patches["target"].image_grid_thw),
        "source_caption": builder.sequence(captions[0]),
        "target_caption": builder.sequence(captions[1]),
        "has_source_caption": True, "has_target_caption": True},
        "ids": {}, "error": None, "index": i})
    if len(pending) == 8:
      collate(pending)
      pending = []
    t5 = time.perf_counter()
    for stage, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
      stages[stage] += dt
  return stages


def _transformers(records, model_dir, n):
  """The same work through PIL and transformers' processor and tokenizer."""
  from PIL import Image
  import transformers

  from procir_jax.data.image_processing import PROCIR_MAX_PIXELS, PROCIR_MIN_PIXELS

  image_processor = transformers.AutoImageProcessor.from_pretrained(
      model_dir, min_pixels=PROCIR_MIN_PIXELS, max_pixels=PROCIR_MAX_PIXELS)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  think = "<think>\n\n</think>\n\n"

  def render(messages, grid):
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    text = text.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n" + think)
    for t, h, w in grid:  # the processor's pad expansion, one image at a time
      text = text.replace("<|image_pad|>", "<|placeholder|>" * int(t * h * w // 4), 1)
    return tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]

  start = time.perf_counter()
  for i in range(n):
    joined = records[i % len(records)]
    grids = {}
    for side in ("source", "target"):
      images = [Image.open(io.BytesIO(v)).convert("RGB")
                for v in getattr(joined, side).views]
      out = image_processor(images=images, return_tensors="np")
      grids[side] = out["image_grid_thw"]
    views = lambda k: [{"type": "image"}] * k  # noqa: E731
    render([{"role": "user", "content": views(len(grids["source"]))},
            {"role": "assistant", "content": "<emb_all>"},
            {"role": "user",
             "content": joined.triplet.texts["modification_text_short"]},
            {"role": "assistant", "content": "<emb_all>"}], grids["source"])
    render([{"role": "user", "content": views(len(grids["target"]))},
            {"role": "assistant", "content": "<emb_all>"}], grids["target"])
    for caption in (joined.source.caption_long, joined.target.caption_long):
      render([{"role": "user", "content": caption},
              {"role": "assistant", "content": "<emb_all>"}], [])
  return time.perf_counter() - start


def main(argv):
  del argv
  try:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, honestly
  except (AttributeError, OSError):
    pass
  from procir_jax.data import pipeline

  with tempfile.TemporaryDirectory() as root:
    print("Preparing synthetic FashionMV (4 views of 256x256 per product)...",
          file=sys.stderr)
    data_dir, model_dir = _prepare(root)
    config = pipeline.DataConfig(data_dir=data_dir, model_dir=model_dir,
                                 global_batch_size=8)
    records = pipeline.records_for("contrastive", config, "train")
    n = _EXAMPLES.value
    _ours(records, config, 8)  # warm caches and imports
    stages = _ours(records, config, n)
    _transformers(records, model_dir, 4)
    peer = _transformers(records, model_dir, n)
  ours = sum(stages.values())
  print(f"\nContrastive examples (query + document of 4 views each, 2 captions), "
        f"{n} examples, one CPU core:")
  print(f"  procir_jax     {n / ours:8.1f} examples/s/core")
  print(f"  transformers   {n / peer:8.1f} examples/s/core")
  print(f"  ratio          {peer / ours:8.2f}x")
  print("  procir_jax time by stage:")
  for stage, seconds in stages.items():
    print(f"    {stage:14s} {seconds / ours:6.1%}  "
          f"({1e3 * seconds / n:.2f} ms/example)")
  if _MODEL_RATE.value:
    cores = _MODEL_RATE.value / (n / ours)
    print(f"  cores to feed {_MODEL_RATE.value:.0f} examples/s: {cores:.1f}")


if __name__ == "__main__":
  app.run(main)
