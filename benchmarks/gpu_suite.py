"""One command for a GPU host: BatchNorm at ResNet-50 shapes, a ResNet-18 step, the numerics; JSON + MD.

`python -m benchmarks.gpu_suite` writes `benchmarks/results/gpu_suite.json` and `.md` (`--out PREFIX`
for other paths) with the device, its driver where visible, and the jax/jaxlib/flax/python versions.
It needs only jax, flax, optax and numpy (and normjax on PYTHONPATH); no network, no dataset.

Sections (`--sections`, default all; run in this order, cheapest first, so that the time budget can
only cut the tail of the op rows):

  numerics  `benchmarks.numerics` at (8, 56, 56, 64): relative error of the batch variance vs float64
            for means 0, 1e2, 1e3, 1e4 (std 1), float32 and bf16: normjax's default on the first step
            of a fresh layer (shift = running mean = 0: E[x²] − E[x]² precision on GPU and TPU; the CPU
            lowering repeats the pass) and on the second step, `stats_shift="batch"`, flax fast and
            two-pass.
  resnet    `benchmarks.model_resnet18`: CIFAR ResNet-18 train step, batch 512, bf16 compute,
            normjax.linen.BatchNorm vs flax.linen.BatchNorm, images/s (synthetic batches).
  op        `benchmarks.op_batch_norm`'s functions at the ResNet-50 BatchNorm shapes, batch 256, bf16
            and float32, variants default / ghost / renorm / masked, fwd+bwd then fwd; normjax, flax
            (fast variance, the baseline) and flax two-pass, timed by `_common.time_paired`; each row
            against the memory floors at the copy bandwidth measured in the same run (a jitted
            `x * 1.0001` over 1 GB: read + write).

Floors (N = bytes of x; `frac` = floor time / measured time, 1.0 = at the floor):
  fwd+bwd  5N: read x, write y, read x and dy, write dx (statistics for free);
           8N: one statistics pass per direction (read x; read x, write y; read x and dy; read x
           and dy, write dx).
  fwd      2N (read x, write y) and 3N (a statistics pass, then read x, write y).

Robustness: every section runs under try/except (the error goes into the JSON, the next section
runs); a failing op row is recorded and the next row runs; `--budget-s` (default 420 s from start)
stops starting op rows when it is spent (the JSON counts the rows left out); the JSON and Markdown
are rewritten after each section and every few op rows, so a run its host kills still leaves what it
measured. `--tiny` is a smoke run at tiny sizes (CPU, well under a minute; the test uses it).

`--compile-only` (`benchmarks.gpu_compile`) compiles instead for an H100 from a host without a GPU
(with a CUDA jaxlib) and writes `gpu_compile.json` / `.md`: compiler figures, not timings.

Usage:
  python -m benchmarks.gpu_suite                                  # on the GPU host (~6-7 min, H100)
  python -m benchmarks.gpu_suite --sections op --budget-s 300
  python -m benchmarks.gpu_suite --tiny --out /tmp/gpu_suite      # smoke run, any host
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 /work/venvs/cuda/bin/python -m benchmarks.gpu_suite --compile-only
  ... --compile-only --batch 32 --out /tmp/gpu_compile_b32      # a data-parallel per-device batch
  python -m benchmarks.gpu_suite --render benchmarks/results/gpu_suite.json   # JSON -> .md again
  python -m benchmarks.tables                                     # BENCHMARKS.md from the JSON
"""

import argparse
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import gpu_compile
from benchmarks import model_resnet18
from benchmarks import numerics
from benchmarks import op_batch_norm
from benchmarks import tables

SECTIONS = ("numerics", "resnet", "op")  # the order they run in
IMPLS = ("normjax", "flax", "flax_two_pass")
FLOORS = {"fwd+bwd": (5, 8), "fwd": (2, 3)}  # (low, high) floors in units of N = bytes of x
RESULTS = os.path.join(os.path.dirname(__file__), "results")


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes and repeats of a run; `TINY` is the smoke-test one."""

  batch: int = 256
  shapes: tuple = tuple(op_batch_norm.RESNET50_SHAPES)
  dtypes: tuple = ("bfloat16", "float32")
  variants: tuple = ("default", "ghost", "renorm", "masked")
  modes: tuple = ("fwd+bwd", "fwd")
  repeats: int = 25
  input_sets: int = 2
  copy_bytes: int = 2**30
  copy_repeats: int = 30
  resnet_batch: int = 512
  resnet_steps: int = 30
  resnet_dtypes: tuple = ("bfloat16",)
  resnet_stages: tuple = (64, 128, 256, 512)
  numerics_shape: tuple = (8, 56, 56, 64)
  numerics_dtypes: tuple = numerics.DTYPES
  numerics_means: tuple = numerics.MEANS
  compile_variants: tuple = gpu_compile.VARIANTS
  save_every: int = 16  # op rows between two writes of the JSON


TINY = Config(
  batch=8,
  shapes=((4, 4, 16),),
  dtypes=("bfloat16",),
  variants=("default", "masked"),
  repeats=2,
  input_sets=1,
  copy_bytes=2**22,
  copy_repeats=2,
  resnet_batch=4,
  resnet_steps=2,
  resnet_stages=(8,),
  numerics_shape=(2, 8, 8, 8),
  numerics_dtypes=("float32", "bfloat16"),
  numerics_means=(0.0, 1e4),
  compile_variants=("default", "sync"),
)


class Clock:
  """Seconds since the start of the run, against a budget."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s = time.perf_counter(), budget_s

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()


# -- host description ---------------------------------------------------------------------------------


def versions() -> dict:
  """Python, jax, jaxlib, flax, optax, numpy and any CUDA plugin versions installed."""
  out = {"python": platform.python_version(), "jax": jax.__version__}
  names = ("jaxlib", "flax", "optax", "numpy")
  names += tuple(f"jax-cuda{v}-{k}" for v in (12, 13) for k in ("plugin", "pjrt"))
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  if "jaxlib" not in out:
    import jaxlib  # pylint: disable=g-import-not-at-top

    out["jaxlib"] = getattr(jaxlib, "__version__", "?")
  return out


def _nvidia_smi() -> dict:
  """name, driver version, memory and clocks from `nvidia-smi` where it exists (never required)."""
  if shutil.which("nvidia-smi") is None:
    return {}
  fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit"
  try:
    out = subprocess.run(
      ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=20,
      check=False,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return {}
  if not out:
    return {}
  values = [v.strip() for v in out.splitlines()[0].split(",")]
  return {f"nvidia_smi_{k.replace('.', '_')}": v for k, v in zip(fields.split(","), values)}


def device_info() -> dict:
  """The first device: kind, platform, count, what its attributes tell, the driver where visible."""
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind, "count": jax.device_count()}
  for attr in ("compute_capability", "core_count", "device_vendor"):
    if getattr(dev, attr, None) is not None:
      info[attr] = str(getattr(dev, attr))
  try:
    from jax.extend import backend  # pylint: disable=g-import-not-at-top

    info["platform_version"] = backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except  # informative only
    pass
  try:
    with open("/proc/driver/nvidia/version") as f:
      info["nvidia_kernel_module"] = f.readline().strip()
  except OSError:
    pass
  info.update(_nvidia_smi())
  info["driver_version"] = info.get("nvidia_smi_driver_version") or _driver_from(info)
  return info


def _driver_from(info):
  text = info.get("nvidia_kernel_module", "")
  for word in text.split():
    if word.count(".") >= 1 and word.replace(".", "").isdigit():
      return word
  return None


# -- sections -----------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int, repeats: int) -> dict:
  """Read + write GB/s of a jitted `x * 1.0001` over a float32 array of `nbytes`."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  fn = jax.jit(lambda x: x * 1.0001)
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  median, best = statistics.median(times), min(times)
  return {
    "bytes": nbytes,
    "repeats": repeats,
    "median_ms": median * 1e3,
    "GBps": 2 * nbytes / median / 1e9,
    "best_GBps": 2 * nbytes / best / 1e9,
  }


_BUILD = {
  "normjax": lambda variant, batch, x: op_batch_norm.normjax_fns(variant, batch, x),
  "flax": lambda variant, batch, x: op_batch_norm.flax_fns(variant, x, True),
  "flax_two_pass": lambda variant, batch, x: op_batch_norm.flax_fns(variant, x, False),
}


def _op_data(full, dtype, count, key):
  """Inputs of one shape as op_batch_norm makes them: x (mean 0.5, std 2), dy, a ~90% mask."""
  kx, kd, km = jax.random.split(key, 3)
  xs = [x * 2.0 + 0.5 for x in _common.random_inputs(kx, full, dtype, count)]
  dy = jax.random.normal(kd, full, jnp.float32).astype(dtype)
  mask = jax.random.bernoulli(km, 0.9, full[:-1] + (1,))
  return xs, dy, mask


def op_row(full, dtype, variant, mode, data, cache, repeats, gbps) -> dict:
  """One (shape, dtype, variant, mode) row: every impl timed round-robin, floors at `gbps`."""
  xs, dy, mask = data
  m = mask if variant == "masked" else None
  fns = {}
  for impl in IMPLS:
    key = (impl, variant, full, dtype.name)
    if key not in cache:  # normjax's warm-up step compiles: build once for both modes
      cache[key] = _BUILD[impl](variant, full[0], xs[0])
    mode_fns, params, state = cache[key]
    compiled = op_batch_norm.compile_mode(mode_fns[mode], variant, m is not None, mode)
    fns[impl] = functools.partial(compiled, params, state)
  timed = _common.time_paired(fns, [(x, dy, m) for x in xs], repeats, baseline="flax")
  nbytes = math.prod(full) * dtype.itemsize
  row = {"shape": "x".join(map(str, full)), "dtype": dtype.name, "variant": variant, "mode": mode}
  row["MB"] = nbytes / 1e6
  for impl in IMPLS:
    row[f"{impl}_ms"] = timed[impl]["median_s"] * 1e3
    row[f"{impl}_min_ms"] = timed[impl]["min_s"] * 1e3
  row["ratio"] = timed["normjax"]["ratio"]
  row["ratio_min"] = timed["normjax"]["min_s"] / timed["flax"]["min_s"]
  row["flax_two_pass_vs_flax"] = timed["flax_two_pass"]["ratio"]
  row["ratio_two_pass"] = row["normjax_ms"] / row["flax_two_pass_ms"]
  return {**row, **floors(mode, nbytes, gbps, row)}


def floors(mode, nbytes, gbps, row) -> dict:
  """Floor times at `gbps` and each impl's fraction of them (floor / measured)."""
  lo, hi = FLOORS[mode]
  out = {"floors": f"{lo}N / {hi}N", "floor_lo_N": lo, "floor_hi_N": hi}
  out["floor_lo_ms"] = lo * nbytes / (gbps * 1e9) * 1e3
  out["floor_hi_ms"] = hi * nbytes / (gbps * 1e9) * 1e3
  for impl in IMPLS:
    out[f"{impl}_frac_lo"] = out["floor_lo_ms"] / row[f"{impl}_ms"]
    out[f"{impl}_frac_hi"] = out["floor_hi_ms"] / row[f"{impl}_ms"]
  return out


def op_section(cfg: Config, clock: Clock, progress) -> dict:
  """The op rows, most wanted first (fwd+bwd, then fwd), until the budget is spent."""
  bandwidth = copy_bandwidth(cfg.copy_bytes, cfg.copy_repeats)
  print(f"copy bandwidth: {bandwidth['GBps']:.1f} GB/s (best {bandwidth['best_GBps']:.1f})")
  result = {"bandwidth": bandwidth, "repeats": cfg.repeats, "input_sets": cfg.input_sets}
  result.update({"rows": [], "skipped_rows": 0, "batch": cfg.batch})
  data, cache = {}, {}
  grid = itertools.product(cfg.modes, cfg.variants, cfg.dtypes, cfg.shapes)
  for i, (mode, variant, dtype_name, shape) in enumerate(grid):
    if clock.left() <= 0:
      result["skipped_rows"] += 1
      continue
    full, dtype = (cfg.batch,) + tuple(shape), jnp.dtype(dtype_name)
    try:
      if (full, dtype_name) not in data:
        data[(full, dtype_name)] = _op_data(full, dtype, cfg.input_sets, jax.random.key(i))
      row = op_row(
        full, dtype, variant, mode, data[(full, dtype_name)], cache, cfg.repeats, bandwidth["GBps"]
      )
    except Exception as e:  # pylint: disable=broad-except  # recorded, never fatal
      row = {"shape": "x".join(map(str, full)), "dtype": dtype_name, "variant": variant}
      row.update({"mode": mode, "error": f"{type(e).__name__}: {e}"[:2000]})
    result["rows"].append(row)
    print(tables.row_line(_short(row)), flush=True)
    if len(result["rows"]) % cfg.save_every == 0:
      progress(result)
  return result


def _short(row):
  keys = ("shape", "dtype", "variant", "mode", "normjax_ms", "flax_ms", "flax_two_pass_ms", "ratio")
  return {k: row[k] for k in keys + ("normjax_frac_lo", "error") if k in row}


def resnet_section(cfg: Config, clock: Clock, progress) -> dict:
  del clock, progress
  rows = []
  for dtype_name in cfg.resnet_dtypes:
    row = model_resnet18.time_train_steps(
      cfg.resnet_batch, cfg.resnet_steps, dtype_name, cfg.input_sets, cfg.resnet_stages
    )
    rows.append({**row, "stages": list(cfg.resnet_stages)})
    print(rows[-1], flush=True)
  return {"rows": rows}


def numerics_section(cfg: Config, clock: Clock, progress) -> dict:
  del clock, progress
  rows = numerics.run(cfg.numerics_shape, cfg.numerics_dtypes, cfg.numerics_means)
  return {"shape": list(cfg.numerics_shape), "rows": rows}


def run_section(name, fn, payload, save):
  """Runs one section; its result or its error goes into `payload["sections"][name]`."""
  start = time.perf_counter()
  print(f"\n== {name}", flush=True)

  def progress(partial):
    payload["sections"][name] = {**partial, "status": "running"}
    save(payload)

  try:
    result = {**fn(progress), "status": "ok"}
  except Exception as e:  # pylint: disable=broad-except  # recorded, never fatal
    result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:4000]}
    result["traceback"] = traceback.format_exc()[-6000:]
    print(result["traceback"], file=sys.stderr)
  result["elapsed_s"] = time.perf_counter() - start
  payload["sections"][name] = result
  print(f"== {name}: {result['status']} in {result['elapsed_s']:.1f} s", flush=True)
  save(payload)


# -- Markdown -----------------------------------------------------------------------------------------

OP_COLUMNS = [
  ("shape", "shape", "{}"),
  ("dtype", "dtype", "{}"),
  ("variant", "variant", "{}"),
  ("mode", "mode", "{}"),
  ("normjax_ms", "normjax ms", "{:.3f}"),
  ("flax_ms", "flax ms", "{:.3f}"),
  ("flax_two_pass_ms", "flax 2-pass ms", "{:.3f}"),
  ("ratio", "normjax / flax", "{:.3f}"),
  ("ratio_two_pass", "normjax / flax 2-pass", "{:.3f}"),
  ("floors", "floors", "{}"),
  ("floor_lo_ms", "floor ms (low)", "{:.3f}"),
  ("floor_hi_ms", "floor ms (high)", "{:.3f}"),
  ("normjax_frac_lo", "normjax frac (low)", "{:.2f}"),
  ("normjax_frac_hi", "normjax frac (high)", "{:.2f}"),
  ("flax_frac_lo", "flax frac (low)", "{:.2f}"),
  ("error", "error", "{}"),
]
OP_SUMMARY_COLUMNS = [
  ("mode", "mode", "{}"),
  ("dtype", "dtype", "{}"),
  ("variant", "variant", "{}"),
  ("rows", "shapes", "{}"),
  ("geo", "normjax / flax (geo mean)", "{:.3f}"),
  ("max", "worst shape", "{:.3f}"),
  ("above_1", "shapes > 1.00", "{}"),
  ("normjax_frac_hi", "normjax frac of high floor (geo)", "{:.2f}"),
  ("flax_frac_hi", "flax frac of high floor (geo)", "{:.2f}"),
]
RESNET_COLUMNS = [
  ("dtype", "compute dtype", "{}"),
  ("batch", "batch", "{}"),
  ("steps", "steps", "{}"),
  ("normjax_ms", "normjax ms/step", "{:.2f}"),
  ("flax_ms", "flax ms/step", "{:.2f}"),
  ("normjax_img_s", "normjax img/s", "{:.0f}"),
  ("flax_img_s", "flax img/s", "{:.0f}"),
  ("ratio", "normjax / flax (time)", "{:.3f}"),
  ("ratio_min", "normjax / flax (min)", "{:.3f}"),
]


def _geo(values):
  values = [v for v in values if v is not None and v > 0]
  return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def op_summary(rows):
  """`tables.op_summary` plus the geometric means of the fractions of the high floor."""
  rows = [r for r in rows if "ratio" in r]
  out = tables.op_summary(rows)
  for entry in out:
    key = (entry["mode"], entry["dtype"], entry["variant"])
    group = [r for r in rows if (r["mode"], r["dtype"], r["variant"]) == key]
    entry["normjax_frac_hi"] = _geo(r["normjax_frac_hi"] for r in group)
    entry["flax_frac_hi"] = _geo(r["flax_frac_hi"] for r in group)
  return out


def host_line(payload) -> str:
  """One sentence naming the device, driver, versions and the measured copy bandwidth."""
  dev, ver = payload.get("device", {}), payload.get("versions", {})
  parts = [dev.get("device_kind", "?")]
  if dev.get("driver_version"):
    parts.append(f"driver {dev['driver_version']}")
  parts += [f"{k} {v}" for k, v in ver.items()]
  bandwidth = payload.get("sections", {}).get("op", {}).get("bandwidth")
  line = "Measured on: " + ", ".join(parts) + "."
  if bandwidth:
    line += f" Copy bandwidth (jitted `x * 1.0001`, read + write): {bandwidth['GBps']:.0f} GB/s."
  if payload.get("tiny"):
    line = "**Smoke run at tiny sizes (`--tiny`): not a measurement.** " + line
  return line


def used_columns(rows, columns):
  """`columns` without the `error` column when no row has an error."""
  return [c for c in columns if c[0] != "error" or any("error" in r for r in rows)]


def numerics_markdown(rows) -> str:
  """The numerics rows; a relative error where the true variance is 0 reads "n/a (var 0)"."""
  columns = [c for c in numerics.COLUMNS if c[0] != "true_var"]
  shown = []
  for row in rows:
    cells = {}
    for key, _, fmt in columns:
      value = row.get(key)
      if value is None and key.endswith("_rel_err") and row.get("true_var") == 0:
        cells[key] = "n/a (var 0)"
      elif value is not None:
        cells[key] = fmt.format(value)
    shown.append(cells)
  return tables.markdown(shown, [(key, title, "{}") for key, title, _ in columns])


def markdown(payload) -> str:
  """The whole gpu_suite.md."""
  sections = payload.get("sections", {})
  parts = ["# GPU suite (`python -m benchmarks.gpu_suite`)", host_line(payload)]
  for name in ("op", "resnet", "numerics"):
    section = sections.get(name)
    if section is None:
      continue
    title = {"op": "BatchNorm op", "resnet": "ResNet-18 train step", "numerics": "Numerics"}[name]
    parts.append(f"## {title} ({section.get('status')}, {section.get('elapsed_s', 0):.0f} s)")
    if section.get("error"):
      parts.append(f"Failed: `{section['error']}`")
    if name == "op" and section.get("rows"):
      parts.append(_op_note(section))
      parts += [tables.markdown(op_summary(section["rows"]), OP_SUMMARY_COLUMNS)]
      parts += [tables.markdown(section["rows"], used_columns(section["rows"], OP_COLUMNS))]
    elif name == "resnet" and section.get("rows"):
      parts.append(tables.markdown(section["rows"], RESNET_COLUMNS))
    elif name == "numerics" and section.get("rows"):
      parts.append(
        f"Input shape {tuple(section['shape'])}: max relative error of the batch variance."
      )
      parts.append(numerics_markdown(section["rows"]))
  return "\n\n".join(parts) + "\n"


def _op_note(section) -> str:
  note = (
    f"Batch {section.get('batch')}, {section.get('repeats')} paired rounds per row; ratios are "
    "medians of per-round ratios (< 1: normjax faster). Floors: fwd+bwd 5N / 8N, fwd 2N / 3N "
    "(N = bytes of x) at the measured copy bandwidth; frac = floor time / measured time."
  )
  if section.get("skipped_rows"):
    note += f" **{section['skipped_rows']} rows left out: the time budget was spent.**"
  return note


# -- BENCHMARKS.md tables (`python -m benchmarks.tables`) ---------------------------------------------


class MissingResults(FileNotFoundError):
  """No results for a table: `tables.rewrite` then leaves that table as it is."""


def _section(name, json_name="gpu_suite"):
  path = os.path.join(tables.RESULTS, f"{json_name}.json")
  with open(path) as f:
    payload = json.load(f)
  section = payload.get("sections", {}).get(name, {})
  if not section.get("rows"):
    raise MissingResults(f"{path} has no rows for section {name!r}")
  return payload, section


@tables.register("gpu_op_summary")
def _gpu_op_summary_table():
  payload, section = _section("op")
  body = tables.markdown(op_summary(section["rows"]), OP_SUMMARY_COLUMNS)
  return host_line(payload) + "\n\n" + _op_note(section) + "\n\n" + body


@tables.register("gpu_op")
def _gpu_op_table():
  _, section = _section("op")
  rows = [r for r in section["rows"] if r["variant"] == "default"]
  return tables.markdown(rows, used_columns(rows, OP_COLUMNS))


@tables.register("gpu_resnet18")
def _gpu_resnet18_table():
  payload, section = _section("resnet")
  return host_line(payload) + "\n\n" + tables.markdown(section["rows"], RESNET_COLUMNS)


@tables.register("gpu_numerics")
def _gpu_numerics_table():
  payload, section = _section("numerics")
  return host_line(payload) + "\n\n" + numerics_markdown(section["rows"])


@tables.register("gpu_compile")
def _gpu_compile_table():
  payload, section = _section("op", "gpu_compile")
  body = tables.markdown(gpu_compile.summary(section["rows"]), gpu_compile.SUMMARY_COLUMNS)
  return gpu_compile.header(payload) + "\n\n" + body


@tables.register("gpu_compile_resnet18")
def _gpu_compile_resnet18_table():
  _, section = _section("resnet", "gpu_compile")
  return tables.markdown(section["rows"], gpu_compile.RESNET_COLUMNS)


# -- entry point --------------------------------------------------------------------------------------


def _writer(prefix, render):
  def save(payload):
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
      json.dump(payload, f, indent=1, default=float)
    with open(prefix + ".md", "w") as f:
      f.write(render(payload))

  return save


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt("SIGTERM")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
  p.add_argument(
    "--sections", default=",".join(SECTIONS), help="comma separated: op,resnet,numerics"
  )
  p.add_argument("--tiny", action="store_true", help="tiny sizes, 2 repeats (smoke run, any host)")
  p.add_argument("--budget-s", type=float, default=420.0, help="stop starting op rows after this")
  p.add_argument("--repeats", type=int, default=None, help="paired rounds per op row")
  p.add_argument("--batch", type=int, default=None, help="batch of the op rows (default 256)")
  p.add_argument("--compile-only", action="store_true", help="compile for an H100, run nothing")
  p.add_argument("--target-config", default=gpu_compile.TARGET_CONFIG, help="with --compile-only")
  p.add_argument("--hlo-dir", default=None, help="with --compile-only: also write each HLO here")
  p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md of this JSON")
  args = p.parse_args(argv)
  chosen = args.sections.split(",")
  unknown = sorted(set(chosen) - set(SECTIONS))
  if unknown:
    p.error(f"unknown sections {unknown}; choose from {SECTIONS}")
  args.sections = [s for s in SECTIONS if s in chosen]
  if args.compile_only:  # nothing runs there: the numerics need a device
    args.sections = [s for s in args.sections if s != "numerics"]
  return args


def _prefix(args):
  if args.out:
    return args.out[: -len(".json")] if args.out.endswith(".json") else args.out
  name = "gpu_compile" if args.compile_only else "gpu_suite"
  return os.path.join(RESULTS, name + ("_tiny" if args.tiny else ""))


def render_json(path):
  """Rewrites the Markdown beside a gpu_suite or gpu_compile JSON (e.g. after the renderer changed)."""
  with open(path) as f:
    payload = json.load(f)
  text = (gpu_compile.markdown if payload.get("benchmark") == "gpu_compile" else markdown)(payload)
  md = path[: -len(".json")] + ".md" if path.endswith(".json") else path + ".md"
  with open(md, "w") as f:
    f.write(text)
  print(f"wrote {md}")


def main(argv=None):
  args = parse_args(argv)
  if args.render:
    return render_json(args.render)
  cfg = TINY if args.tiny else Config()
  if args.repeats:
    cfg = dataclasses.replace(cfg, repeats=args.repeats)
  if args.batch:
    cfg = dataclasses.replace(cfg, batch=args.batch)
  signal.signal(signal.SIGTERM, _interrupt)
  clock = Clock(args.budget_s)
  payload = {"benchmark": "gpu_compile" if args.compile_only else "gpu_suite", "tiny": args.tiny}
  payload.update({"config": dataclasses.asdict(cfg), "versions": versions(), "sections": {}})
  payload["budget_s"] = args.budget_s
  prefix = _prefix(args)
  if args.compile_only:
    try:
      render, sections = _compile_only_sections(args, payload)
    except Exception as e:  # pylint: disable=broad-except  # no CUDA jaxlib, or a config it rejects
      return _no_target(prefix, payload, e)
  else:
    payload["device"] = device_info()
    render = markdown
    sections = {"numerics": numerics_section, "resnet": resnet_section, "op": op_section}
  save = functools.partial(_save_with_machine, _writer(prefix, render))
  print(
    f"device: {payload.get('device') or payload.get('target')}\nversions: {payload['versions']}"
  )
  try:
    for name in args.sections:
      run_section(name, functools.partial(sections[name], cfg, clock), payload, save)
  except KeyboardInterrupt as e:
    payload["interrupted"] = f"{e!r} after {clock.elapsed():.0f} s"
    save(payload)
    print(f"interrupted; partial results in {prefix}.json", file=sys.stderr)
    sys.exit(130)
  payload["elapsed_s"] = clock.elapsed()
  save(payload)
  print(f"\ntotal {payload['elapsed_s']:.1f} s; wrote {prefix}.json and {prefix}.md")


def _no_target(prefix, payload, error):
  """Records why no compile-only H100 device could be made, and exits with status 1."""
  payload["error"] = f"{type(error).__name__}: {error}"[:4000]
  payload["hint"] = (
    "--compile-only needs a CUDA-enabled jaxlib (e.g. pip install 'jax[cuda12]' in a separate "
    "environment) and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a host without a GPU"
  )
  _save_with_machine(_writer(prefix, gpu_compile.markdown), payload)
  print(f"no compile-only H100 device: {payload['error']}\n{payload['hint']}", file=sys.stderr)
  sys.exit(1)


def _save_with_machine(save, payload):
  payload.setdefault("machine", _common.machine())
  save(payload)


def _compile_only_sections(args, payload):
  """The compile-only run: an H100 mesh, and op / resnet sections that compile instead of timing."""
  mesh, payload["target"] = gpu_compile.h100_mesh(args.target_config)

  def op(cfg, clock, progress):
    del clock
    rows = gpu_compile.op_rows(
      mesh,
      cfg.batch,
      cfg.shapes,
      cfg.dtypes,
      cfg.compile_variants,
      hlo_dir=args.hlo_dir,
      progress=lambda rows: progress({"rows": rows}),
    )
    return {"rows": rows}

  def resnet(cfg, clock, progress):
    del clock, progress
    rows = gpu_compile.resnet_rows(
      mesh, cfg.resnet_batch, cfg.resnet_dtypes, cfg.resnet_stages, args.hlo_dir
    )
    return {"rows": rows}

  return gpu_compile.markdown, {"op": op, "resnet": resnet}


if __name__ == "__main__":
  main()
