"""ProCIR at paper scale: Qwen3.5-0.8B on the FashionMV release.

One host (GPU or TPU VM), from the repository root:

  python -m procir_jax.main --config=configs/procir_0_8b.py --workdir=runs/procir_0_8b \
      --config.model.hf_dir=/path/to/Qwen3.5-0.8B \
      --config.data.manual_dir=/path/to/FashionMV

Mechanisms: two-stage dialogue, caption alignment and chain-of-thought guidance, no SFT
stage. The release presents SFT pre-training and chain of thought as two alternative
knowledge-injection paths (its README: "SFT pre-training or Chain-of-Thought (CoT)"),
the paper finds them partially redundant and names SFT an optional stage beside ProCIR's
three core mechanisms; so this config takes the core path. `--config.procir.sft=True
--config.procir.cot=False` takes the other (`configs/ablation.py` runs any of the 16).

`model.hf_dir` is a local Qwen3.5-0.8B directory (config.json, safetensors, tokenizer,
preprocessor_config.json); `data.manual_dir` is the FashionMV release laid out as the
README's TFDS section says (data/*.jsonl and images/). The first run builds the TFDS
dataset into <workdir>/tfds (or `data.data_dir`), then trains the contrastive stage,
validating on DeepFashion every `train.eval_every` steps and keeping the best
checkpoints by Average_R@10, and ends with the full evaluation
(<workdir>/eval/results.json). Rerunning the same command resumes from the latest
checkpoint.

On a TPU VM pod slice, run the same command on every host at once, e.g.

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all \
      --command="cd procir-jax && \
      python -m procir_jax.main --config=configs/procir_0_8b.py \
      --workdir=gs://BUCKET/procir_0_8b \
      --config.model.hf_dir=/mnt/disks/data/Qwen3.5-0.8B \
      --config.data.manual_dir=/mnt/disks/data/FashionMV \
      --config.data.data_dir=gs://BUCKET/tfds \
      --config.distributed.coordinator_address=auto"

With `coordinator_address=auto` JAX discovers the slice's hosts on Cloud TPU; elsewhere
set `--config.distributed.coordinator_address=HOST:PORT
--config.distributed.num_processes=N --config.distributed.process_id=I` on each host.
Build the TFDS data once beforehand (`tfds build ...`, see README) when many hosts share
`data.data_dir`. Expect the released checkpoint's numbers (R@10: DeepFashion 95.1,
Fashion200K 86.6, FashionGen-val 85.3) only after the full schedule.

Memory: `model.remat="full"` keeps only each layer's input for the backward pass, so
global_batch_size=128 fits on 16 v5e chips (8 triplets each) as well as on 4 v5p chips.
On v5p, `--config.model.remat=none` fits 32 triplets per chip and runs the step with
about a fifth fewer FLOPs and bytes. Check any change of batch, views or chip before
renting it (README, "Will it fit?"):

  python -m bench.tpu_compile --config=configs/procir_0_8b.py --topology=v5p:2x2x1 \
      --per_chip_batch=32 --config.model.remat=none
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.tiny_preset = ""  # no stand-in model: model.hf_dir is required
  c.data.use_synthetic = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.global_batch_size = 128
  c.data.eval_batch_size = 256
  c.data.worker_count = 8
  c.data.max_views = 5
  # Captions are ~50 tokens, queries and documents of 5 views a few hundred.
  c.data.lengths = (64, 128, 256, 320, 384, 512, 768, 1024, 1536)
  c.data.patches = (64, 144, 256, 400, 576, 784, 1024)
  c.procir.update(dict(two_stage=True, align=True, cot=True, sft=False))
  c.loss.update(dict(align_source=1.0, align_document=1.0, cot=1.0, lm_chunk_tokens=64))
  c.train.update(dict(steps=6000, lr=2e-5, warmup_steps=300, weight_decay=0.05,
                      log_every=50, eval_every=1000, checkpoint_every=500,
                      max_to_keep=3, freeze=()))
  c.sft.update(dict(steps=1500, lr=2e-5, warmup_steps=100))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return c
