"""`python -m benchmarks.gpu_suite`: the tiny run end to end on the CPU, its JSON, Markdown and tables.

The suite is meant for a GPU host, where nothing can be fixed during the run: these tests run the same
code at tiny sizes (`--tiny`) in a subprocess and check the numbers it writes. The compile-only mode
needs a CUDA jaxlib in a separate environment (`NORMJAX_CUDA_PYTHON`, default
/work/venvs/cuda/bin/python); its test is skipped where that interpreter does not exist.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import gpu_suite  # noqa: E402
from benchmarks import hlo_stats  # noqa: E402
from benchmarks import tables  # noqa: E402

CUDA_PYTHON = os.environ.get("NORMJAX_CUDA_PYTHON", "/work/venvs/cuda/bin/python")


def run_suite(args, python=sys.executable, env=None, timeout=600):
  """Runs `python -m benchmarks.gpu_suite ARGS` from the repository root; fails with its output."""
  env = {**os.environ, **(env or {})}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [python, "-m", "benchmarks.gpu_suite", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert proc.returncode == 0, (
    f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
  )
  return proc


def load(prefix):
  with open(prefix + ".json") as f:
    payload = json.load(f)
  with open(prefix + ".md") as f:
    return payload, f.read()


def positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_end_to_end(tmp_path, monkeypatch):
  """One `--tiny` subprocess run (one test, so pytest-xdist runs it once), then every check on it."""
  run_suite(["--tiny", "--out", str(tmp_path / "gpu_suite")])
  payload, md = load(str(tmp_path / "gpu_suite"))
  check_sections(payload)
  check_op(payload["sections"]["op"])
  check_resnet(payload["sections"]["resnet"])
  check_numerics(payload["sections"]["numerics"])
  check_markdown(md)
  monkeypatch.setattr(tables, "RESULTS", str(tmp_path))
  check_benchmarks_md_tables()


def check_sections(payload):
  assert payload["tiny"] is True
  assert {"python", "jax", "jaxlib", "flax"} <= set(payload["versions"])
  assert payload["device"]["device_kind"]
  for name in ("op", "resnet", "numerics"):
    section = payload["sections"][name]
    assert section["status"] == "ok", section.get("traceback")
    assert positive(section["elapsed_s"])
  assert positive(payload["elapsed_s"])


def check_op(op):
  assert positive(op["bandwidth"]["GBps"])
  rows = op["rows"]
  assert {(r["mode"], r["variant"]) for r in rows} == {
    (m, v) for m in ("fwd+bwd", "fwd") for v in ("default", "masked")
  }
  assert op["skipped_rows"] == 0
  for row in rows:
    assert "error" not in row, row
    for impl in gpu_suite.IMPLS:
      assert positive(row[f"{impl}_ms"]) and positive(row[f"{impl}_frac_lo"])
    assert positive(row["ratio"]) and positive(row["ratio_two_pass"])
    low, high = gpu_suite.FLOORS[row["mode"]]
    assert row["floor_hi_ms"] == pytest.approx(row["floor_lo_ms"] * high / low)


def check_resnet(resnet):
  (row,) = resnet["rows"]
  assert row["dtype"] == "bfloat16"
  for key in ("normjax_img_s", "flax_img_s", "ratio"):
    assert positive(row[key]), key
  assert math.isfinite(row["normjax_loss"]) and math.isfinite(row["flax_loss"])


def check_numerics(numerics):
  rows = {(r["dtype"], r["mean"]): r for r in numerics["rows"]}
  far = rows[("float32", 1e4)]
  assert far["normjax_step2_rel_err"] <= 1e-4
  assert far["normjax_batch_rel_err"] <= 1e-4
  assert far["normjax_rel_err"] <= 1e-4  # CPU: the lowering repeats the pass on the first step
  assert far["flax_rel_err"] >= 1e-2  # E[x²] − E[x]² at mean 1e4, std 1
  assert far["flax_two_pass_rel_err"] <= 1e-3
  near = rows[("float32", 0.0)]
  for impl in ("normjax", "normjax_step2", "normjax_batch", "flax", "flax_two_pass"):
    assert near[f"{impl}_rel_err"] <= 1e-4, impl
  assert rows[("bfloat16", 1e4)]["normjax_rel_err"] is None  # every sample rounds to 1e4: var 0


def check_markdown(md):
  assert "Smoke run at tiny sizes" in md
  for title in ("## BatchNorm op (ok", "## ResNet-18 train step (ok", "## Numerics (ok"):
    assert title in md
  assert "| 8x4x4x16 | bfloat16 | default | fwd+bwd |" in md
  assert "n/a (var 0)" in md
  assert "Failed:" not in md and "| error |" not in md


def check_benchmarks_md_tables():
  text = "".join(
    f"<!-- table: {name} -->\nold {name}\n<!-- end table -->\n"
    for name in ("gpu_op_summary", "gpu_op", "gpu_resnet18", "gpu_numerics", "gpu_compile")
  )
  new = tables.rewrite(text)
  assert "old gpu_op_summary" not in new and "normjax / flax (geo mean)" in new
  assert "old gpu_op\n" not in new and "| 8x4x4x16 | bfloat16 | default | fwd |" in new
  assert "old gpu_resnet18" not in new and "normjax img/s" in new
  assert "old gpu_numerics" not in new and 'normjax stats_shift="batch"' in new
  assert "old gpu_compile" in new  # no gpu_compile.json there: the table is left as it is


def test_failing_section_is_recorded_and_the_next_runs(tmp_path):
  payload = {"sections": {}}
  saved = []

  def broken(progress):
    raise RuntimeError("no GPU here")

  gpu_suite.run_section("op", broken, payload, saved.append)
  gpu_suite.run_section("resnet", lambda progress: {"rows": [{"x": 1}]}, payload, saved.append)
  assert payload["sections"]["op"]["status"] == "error"
  assert "RuntimeError: no GPU here" in payload["sections"]["op"]["error"]
  assert payload["sections"]["resnet"]["status"] == "ok"
  assert len(saved) == 2
  assert "Failed: `RuntimeError: no GPU here`" in gpu_suite.markdown(payload)


def test_sections_are_checked():
  assert gpu_suite.parse_args(["--sections", "op,numerics"]).sections == ["numerics", "op"]
  assert gpu_suite.parse_args(["--compile-only"]).sections == ["resnet", "op"]
  with pytest.raises(SystemExit):
    gpu_suite.parse_args(["--sections", "op,nope"])


HLO = """HloModule m

%fused_reduce (p0: f32[8,4]) -> f32[4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %r = f32[4]{0} reduce(%p0, %c), dimensions={0}, to_apply=%add
}

ENTRY %main (x: bf16[8,4], s: f32[4]) -> (bf16[8,4], f32[4]) {
  %x = bf16[8,4]{1,0} parameter(0), metadata={op_name="x (a, b)"}
  %s = f32[4]{0} parameter(1)
  %f = (f32[8,4]{1,0}, /*index=1*/bf16[8,4]{1,0}) fusion(%x, /*index=1*/%s), kind=kLoop, calls=%fl
  %g0 = f32[8,4]{1,0} get-tuple-element(%f), index=0
  %g1 = bf16[8,4]{1,0} get-tuple-element(%f), index=1
  %red = f32[4]{0} fusion(%g0), kind=kInput, calls=%fused_reduce
  %conv = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(%g1), custom_call_target="__cudnn$convForward"
  ROOT %t = (bf16[8,4]{1,0}, f32[4]{0}) tuple(%g1, %red)
}
"""


def test_hlo_stats_counts_kernels_bytes_and_intermediates():
  stats = hlo_stats.analyze(HLO, full_numel=32)
  assert stats["kernels"] == 3
  assert stats["by_kind"] == {
    "fusion:kLoop": 1,
    "fusion:kInput": 1,
    "custom-call:__cudnn$convForward": 1,
  }
  # f: reads x (64) and s (16), writes 128 + 64; red: reads 128, writes 16; conv: 64 in, 64 out.
  assert stats["bytes"] == (64 + 16 + 192) + (128 + 16) + (64 + 64)
  assert stats["full_reads"] == 3 and stats["full_writes"] == 3
  assert [(i["producer"], i["index"], i["shape"]) for i in stats["intermediates"]] == [
    ("f", 0, "f32[8,4]"),
    ("f", 1, "bf16[8,4]"),
  ]
  assert hlo_stats.analyze(HLO)["kernels"] == 3


@pytest.mark.skipif(not os.path.exists(CUDA_PYTHON), reason=f"no CUDA jaxlib at {CUDA_PYTHON}")
def test_compile_only_for_an_h100(tmp_path, monkeypatch):
  prefix = str(tmp_path / "gpu_compile")
  env = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "JAX_PLATFORMS": "", "XLA_FLAGS": ""}
  run_suite(["--compile-only", "--tiny", "--sections", "op", "--out", prefix], CUDA_PYTHON, env)
  payload, md = load(prefix)
  assert "H100" in payload["target"]["device_kind"]
  rows = payload["sections"]["op"]["rows"]
  assert {(r["variant"], r["impl"]) for r in rows} == {
    (v, i) for v in ("default", "sync") for i in ("normjax", "flax", "flax_two_pass")
  }
  for row in rows:
    assert "error" not in row, row
    assert row["kernels"] >= 2 and row["bytes_over_N"] >= 3  # reads x and dy, writes y and dx
  assert "Compiler figures, not timings" in md
  monkeypatch.setattr(tables, "RESULTS", str(tmp_path))
  new = tables.rewrite("<!-- table: gpu_compile -->\nold\n<!-- end table -->\n")
  assert "old" not in new and "| default | bfloat16 | normjax | 1 |" in new
