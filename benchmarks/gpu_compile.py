"""Compile-only figures for an NVIDIA H100, built on a host without a GPU (`gpu_suite --compile-only`).

A CUDA-enabled jaxlib can compile for a GPU it does not have: `jax.experimental.topologies` builds a
compile-only H100 device from a `GpuTargetConfigProto` in text form (`h100_target_config.txtpb`, beside
this file), and `jax.jit(f).lower(ShapeDtypeStruct(..., sharding=...)).compile()` then runs XLA's whole
GPU pipeline (fusion, layout, scheduling, PTX and cubin) for it. From the optimized HLO
(`benchmarks.hlo_stats`) every row reports the kernels, the bytes they move (operands + results of
each top-level instruction, in units of N = bytes of x) and the full-size intermediates (fusion
breaks). These are compiler figures, not timings: no kernel runs, `cost_analysis()` is unavailable
there, and the bytes are a map of the traffic the program asks for.

Rows: every BatchNorm variant (default, ghost, renorm, masked, sync over a 1-device mesh under
`shard_map`), bf16 and float32, fwd+bwd at the ResNet-50 BatchNorm shapes (batch 256), for normjax,
flax.linen (fast variance) and flax.linen two-pass; plus the ResNet-18 CIFAR train step (batch 512,
bf16 compute) with each BatchNorm. The functions are those `benchmarks.op_batch_norm` and
`benchmarks.model_resnet18` time, built on the CPU from small inputs of the same feature count (their
parameters and state do not depend on the spatial size) and lowered at the full shapes.

Needs a CUDA jaxlib, which is not a dependency of normjax and never installed by CI:

  python3.11 -m venv /work/venvs/cuda
  /work/venvs/cuda/bin/pip install "jax[cuda12]==0.10.2" flax==0.12.8 optax==0.2.8
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venvs/cuda/bin/python -m benchmarks.gpu_suite --compile-only

(`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`: without a GPU and its driver the plugin's version checks fail.)
"""

import hashlib
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo_stats
from benchmarks import model_resnet18
from benchmarks import op_batch_norm
from benchmarks import tables

TARGET_CONFIG = os.path.join(os.path.dirname(__file__), "h100_target_config.txtpb")
VARIANTS = ("default", "ghost", "renorm", "masked", "sync")
IMPLS = ("normjax", "flax", "flax_two_pass")
AXIS = op_batch_norm.AXIS


def h100_mesh(path: str = TARGET_CONFIG):
  """A 1-device mesh (axis `AXIS`) on a compile-only H100 and a description of that target.

  Raises whatever the CUDA plugin raises where it cannot build the topology (no CUDA jaxlib, a target
  config this jaxlib cannot parse).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  with open(path) as f:
    text = f.read()
  topology = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
  device = topology.devices[0]
  mesh = jax.sharding.Mesh(
    np.asarray(topology.devices[:1]), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )
  target = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "target_config": os.path.relpath(path, os.path.dirname(os.path.dirname(__file__))),
    "target_config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
  }
  for attr in ("compute_capability", "core_count", "device_vendor"):
    if getattr(device, attr, None) is not None:
      target[attr] = str(getattr(device, attr))
  return mesh, target


def _structs(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _jit_on(fn, variant, masked, mesh):
  """`op_batch_norm.compile_mode` for fwd+bwd, with the `sync` shard_map over `mesh`."""
  if variant == "sync":
    fn = jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS) if masked else None),
      out_specs=(P(AXIS), P(), P(AXIS), P(), P()),
      check_vma=False,
    )
  return jax.jit(fn)


def _build(impl, variant, batch, x):
  if impl == "normjax":
    return op_batch_norm.normjax_fns(variant, batch, x)
  return op_batch_norm.flax_fns(variant, x, fast_variance=(impl == "flax"))


def compile_text(jitted, *args):
  """(optimized HLO text, compile seconds) of `jitted` lowered at `args` (structs)."""
  start = time.perf_counter()
  text = jitted.lower(*args).compile().as_text()
  return text, time.perf_counter() - start


def op_row(mesh, impl, variant, dtype_name, full, hlo_dir=None) -> dict:
  """Compiles one fwd+bwd BatchNorm at NHWC shape `full` and returns its HLO figures."""
  dtype = jnp.dtype(dtype_name)
  small = jnp.zeros((full[0], 1, 1, full[-1]), dtype)  # same features and batch; cheap on the CPU
  mode_fns, params, state = _build(impl, variant, full[0], small)
  sharding = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct(full, dtype, sharding=sharding)
  mask = None
  if variant == "masked":
    mask = jax.ShapeDtypeStruct(full[:-1] + (1,), jnp.bool_, sharding=sharding)
  jitted = _jit_on(mode_fns["fwd+bwd"], variant, mask is not None, mesh)
  text, seconds = compile_text(
    jitted, _structs(params, sharding), _structs(state, sharding), x, x, mask
  )
  numel = math.prod(full)
  nbytes = numel * dtype.itemsize
  stats = hlo_stats.analyze(text, full_numel=numel)
  row = {"shape": "x".join(map(str, full)), "dtype": dtype_name, "variant": variant, "impl": impl}
  row.update({"mode": "fwd+bwd", "MB": nbytes / 1e6, "compile_s": seconds, **stats})
  row["bytes_over_N"] = stats["bytes"] / nbytes
  row["intermediate_count"] = len(stats["intermediates"])
  row["intermediate_bytes_over_N"] = sum(i["bytes"] for i in stats["intermediates"]) / nbytes
  if hlo_dir:
    _dump(hlo_dir, f"op_{impl}_{variant}_{dtype_name}_{row['shape']}", text)
  return row


def _dump(folder, name, text):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name + ".hlo.txt"), "w") as f:
    f.write(text)


def op_rows(
  mesh, batch, shapes, dtypes, variants=VARIANTS, impls=IMPLS, hlo_dir=None, progress=None
):
  """Every (variant, dtype, shape, impl) row; a failing row records its error and the rest go on."""
  rows = []
  for variant in variants:
    for dtype_name in dtypes:
      for shape in shapes:
        full = (batch,) + tuple(shape)
        for impl in impls:
          try:
            row = op_row(mesh, impl, variant, dtype_name, full, hlo_dir)
          except Exception as e:  # pylint: disable=broad-except  # recorded, never fatal
            row = {"shape": "x".join(map(str, full)), "dtype": dtype_name, "variant": variant}
            row.update({"impl": impl, "error": f"{type(e).__name__}: {e}"[:2000]})
          rows.append(row)
          print(_progress_line(row), flush=True)
        if progress is not None:
          progress(rows)
  return rows


def _progress_line(row):
  keys = ("shape", "dtype", "variant", "impl", "kernels", "bytes_over_N", "intermediate_count")
  keys += ("compile_s", "error")
  return tables.row_line({k: row[k] for k in keys if k in row})


def resnet_rows(mesh, batch, dtypes=("bfloat16",), stages=(64, 128, 256, 512), hlo_dir=None):
  """The ResNet-18 train step (normjax and flax BatchNorm) compiled for the H100 at `batch`."""
  sharding = NamedSharding(mesh, P())
  images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32, sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)
  tx = model_resnet18.optimizer()
  rows = []
  for dtype_name in dtypes:
    for name, model in model_resnet18.build(jnp.dtype(dtype_name), stages).items():
      state = model_resnet18.init_state(model, tx, jnp.zeros((2, 32, 32, 3)))
      step = model_resnet18.make_step(model, tx)
      text, seconds = compile_text(step, _structs(state, sharding), images, labels)
      stats = hlo_stats.analyze(text)
      row = {"impl": name, "dtype": dtype_name, "batch": batch, "stages": list(stages)}
      row.update({"compile_s": seconds, **stats, "GB": stats["bytes"] / 1e9})
      row["convolutions"] = sum(
        n for k, n in stats["by_kind"].items() if "conv" in k.lower() or "cudnn" in k.lower()
      )
      rows.append(row)
      print(_progress_line(row), flush=True)
      if hlo_dir:
        _dump(hlo_dir, f"resnet18_{name}_{dtype_name}_b{batch}", text)
  flax_rows = {r["dtype"]: r for r in rows if r["impl"] == "flax"}
  for row in rows:
    base = flax_rows.get(row["dtype"])
    if base:
      row["bytes_vs_flax"] = row["bytes"] / base["bytes"]
      row["kernels_vs_flax"] = row["kernels"] - base["kernels"]
  return rows


# -- Markdown -----------------------------------------------------------------------------------------

NOTE = (
  "Compiler figures, not timings: XLA's optimized HLO for {device} (`{config}`), compiled ahead of "
  "time on a host without a GPU; nothing ran. `kernels`: top-level fusions, custom calls and copies. "
  "`bytes`: operand + result bytes of each kernel, in units of N = bytes of x (a map of the traffic "
  "the program asks for; caches and partial reads are ignored). `full-size reads / writes`: kernel "
  "operands / results with as many elements as x. `intermediates`: full-size arrays written by one "
  "kernel and read again by another (fusion breaks)."
)
ROW_COLUMNS = [
  ("shape", "shape", "{}"),
  ("dtype", "dtype", "{}"),
  ("variant", "variant", "{}"),
  ("impl", "impl", "{}"),
  ("kernels", "kernels", "{}"),
  ("bytes_over_N", "bytes / N", "{:.2f}"),
  ("full_reads", "full-size reads", "{}"),
  ("full_writes", "full-size writes", "{}"),
  ("intermediate_count", "intermediates", "{}"),
  ("compile_s", "compile s", "{:.1f}"),
  ("error", "error", "{}"),
]
SUMMARY_COLUMNS = [
  ("variant", "variant", "{}"),
  ("dtype", "dtype", "{}"),
  ("impl", "impl", "{}"),
  ("rows", "shapes", "{}"),
  ("kernels", "kernels (mean)", "{:.1f}"),
  ("bytes_over_N", "bytes / N (geo mean)", "{:.2f}"),
  ("full_reads", "full-size reads (mean)", "{:.1f}"),
  ("full_writes", "full-size writes (mean)", "{:.1f}"),
  ("intermediates", "intermediates (total)", "{}"),
  ("failed", "failed", "{}"),
]
RESNET_COLUMNS = [
  ("impl", "BatchNorm", "{}"),
  ("dtype", "compute dtype", "{}"),
  ("batch", "batch", "{}"),
  ("kernels", "kernels", "{}"),
  ("convolutions", "conv kernels", "{}"),
  ("GB", "GB moved", "{:.2f}"),
  ("bytes_vs_flax", "bytes / flax", "{:.3f}"),
  ("kernels_vs_flax", "kernels − flax", "{:+d}"),
  ("compile_s", "compile s", "{:.1f}"),
]


def summary(rows):
  """Per (variant, dtype, impl): mean kernels, geometric mean of bytes / N, intermediates."""
  out = []
  keys = []
  for r in rows:
    key = (r["variant"], r["dtype"], r["impl"])
    if key not in keys:
      keys.append(key)
  for variant, dtype, impl in keys:
    group = [r for r in rows if (r["variant"], r["dtype"], r["impl"]) == (variant, dtype, impl)]
    ok = [r for r in group if "error" not in r]
    entry = {"variant": variant, "dtype": dtype, "impl": impl, "rows": len(ok)}
    entry["failed"] = len(group) - len(ok)
    if ok:
      entry["kernels"] = statistics.fmean(r["kernels"] for r in ok)
      entry["bytes_over_N"] = math.exp(statistics.fmean(math.log(r["bytes_over_N"]) for r in ok))
      entry["full_reads"] = statistics.fmean(r["full_reads"] for r in ok)
      entry["full_writes"] = statistics.fmean(r["full_writes"] for r in ok)
      entry["intermediates"] = sum(r["intermediate_count"] for r in ok)
    out.append(entry)
  return out


def intermediates_list(rows, limit=40):
  """Markdown bullets: each row's full-size intermediates (producer → consumers)."""
  lines = []
  for r in rows:
    for i in r.get("intermediates", []):
      consumers = ", ".join(i["consumers"])
      lines.append(
        f"- {r['impl']} {r['variant']} {r['dtype']} {r['shape']}: `{i['shape']}` from "
        f"`{i['producer']}` read by `{consumers}`"
      )
  if not lines:
    return (
      "No full-size intermediate in any row: every full-size array a kernel writes is an output."
    )
  more = len(lines) - limit
  return "\n".join(lines[:limit] + ([f"- … and {more} more (see the JSON)"] if more > 0 else []))


def header(payload) -> str:
  target = payload.get("target", {})
  return NOTE.format(
    device=target.get("device_kind", "the target"), config=target.get("target_config", "?")
  )


def markdown(payload) -> str:
  """The whole gpu_compile.md: note, versions, summary, ResNet-18, every row, the intermediates."""
  sections = payload.get("sections", {})
  parts = ["# Compile-only figures for an H100 (`python -m benchmarks.gpu_suite --compile-only`)"]
  parts += [header(payload), _versions_line(payload)]
  if payload.get("error"):
    parts.append(f"**No compile-only H100 device**: `{payload['error']}` ({payload.get('hint')})")
  op = sections.get("op", {})
  resnet = sections.get("resnet", {})
  for name, section in (("op", op), ("resnet", resnet)):
    if section.get("error"):
      parts.append(f"**Section {name} failed**: `{section['error']}`")
  if op.get("rows"):
    parts += [
      "## BatchNorm fwd+bwd, summary",
      tables.markdown(summary(op["rows"]), SUMMARY_COLUMNS),
    ]
  if resnet.get("rows"):
    parts += ["## ResNet-18 train step", tables.markdown(resnet["rows"], RESNET_COLUMNS)]
  if op.get("rows"):
    columns = [c for c in ROW_COLUMNS if c[0] != "error" or any("error" in r for r in op["rows"])]
    parts += ["## BatchNorm fwd+bwd, every row", tables.markdown(op["rows"], columns)]
    parts += ["## Full-size intermediates (fusion breaks)", intermediates_list(op["rows"])]
  return "\n\n".join(parts) + "\n"


def _versions_line(payload) -> str:
  versions = payload.get("versions", {})
  return "Compiled with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."
