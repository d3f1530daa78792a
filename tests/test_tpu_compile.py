"""The TPU planning tool compiles real steps for a TPU slice on a CPU machine and
reports numbers that agree with each other (speed itself is never asserted)."""

import json
import math
import os

import pytest

# Compiling for a TPU needs libtpu, not a TPU; no exclusive hold on it is needed.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu")


def _load_tool():
  from bench import tpu_compile  # imported once: the tool defines absl flags
  return tpu_compile


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
  from configs import base

  tool = _load_tool()
  config = base.get_config()
  config.model.tiny_preset = "test"  # the smallest model with both layer kinds
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return tool, tool.Planner(config, "v5e:2x2", views=2, image_size=128,
                            encode_views=2, encode_image_size=128,
                            scratch=str(tmp_path_factory.mktemp("plan")))


def test_reports_are_complete_and_consistent(planner):
  tool, plan = planner
  assert plan.chips == 4 and plan.shards == 4
  chip = tool.tpu_chip("v5e:2x2")
  assert plan.procir.model.options.attention == "flash"  # "auto" resolved for TPU
  # The SFT step is the trainer's other mode: the contrastive step covers its path.
  for step in ("contrastive", "encode"):
    r = plan.compile(step, 1)
    assert not r.error, r.error
    assert r.step == step and r.per_chip_batch == 1 and r.chips == 4
    for name in ("argument_gib", "flops", "bytes_accessed", "model_flops",
                 "compile_s"):
      value = getattr(r, name)
      assert math.isfinite(value) and value > 0, (step, name, value)
    assert math.isfinite(r.temp_gib) and r.temp_gib >= 0
    assert r.total_gib == pytest.approx(
        r.argument_gib + r.output_gib - r.alias_gib + r.temp_gib)
    assert r.fits == (r.total_gib <= r.hbm_gib * (1 - r.headroom))
    assert r.compute_s == pytest.approx(r.flops / chip.peak_bf16)
    assert r.memory_s == pytest.approx(r.bytes_accessed / chip.hbm_bandwidth)
    assert r.roofline_s == max(r.compute_s, r.memory_s)
    assert r.mfu_ceiling == pytest.approx(r.model_flops / chip.peak_bf16 /
                                          r.roofline_s)
    # Loops unrolled, so XLA's cost analysis saw every step of the program; the
    # compiled count includes rematerialisation and padding, so it exceeds the
    # model's FLOPs over real tokens.
    assert r.loops == 0
    assert not r.compiled_below_model
    assert str(r.per_chip_batch) in r.row()
    if step == "contrastive":
      # Training donates the state: its outputs reuse the arguments' buffers.
      assert r.alias_gib > 0.5 * r.argument_gib


def test_bigger_batches_cost_more_and_find_batch_stops_at_the_limit(planner):
  tool, plan = planner
  seen = []
  best = plan.find_batch("encode", limit=3, log=seen.append)
  assert best is not None and best.per_chip_batch == 3
  # Doubling stops at the limit, then bisection tries what lies between.
  assert [r.per_chip_batch for r in seen] == [1, 2, 3]
  one, two = seen[:2]
  assert two.flops > one.flops and two.model_flops == pytest.approx(
      2 * one.model_flops, rel=0.05)


def test_json_and_oom_summary(tmp_path):
  tool = _load_tool()
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
             "in memory space hbm. Used 96.80G of 95.74G hbm. Exceeded hbm capacity "
             "by 1.06G.\nTotal hbm usage >= 97.86G:\n    reserved 530.00M\n"
             "HLO temporaries (96.80G)")
  summary = tool._oom_summary(message)
  assert "Ran out of memory" in summary and "96.80G of 95.74G" in summary
  report = tool.StepReport(step="encode", topology="v5e:2x2", chip="TPU v5e", chips=4,
                           per_chip_batch=64, shapes="", hbm_gib=16, headroom=0.1,
                           compile_s=1.0, error=summary)
  assert "does not compile" in report.row()
  path = tmp_path / "r.json"
  path.write_text(json.dumps([report.__dict__]))
  assert json.loads(path.read_text())[0]["error"] == summary
