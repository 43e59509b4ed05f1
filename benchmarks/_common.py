"""Shared helpers of the benchmark scripts: timing, throughput against the memory floor, output.

Timing rules (every script): the compiled function is called once per input set before timing
(compilation and warm-up excluded), then `repeats` timed calls rotate over the input sets, each ended by
`jax.block_until_ready`; the median is reported. normjax and flax run in the same process on the same
inputs.

`time_paired` (the op benchmarks) adds two rules that the JAX performance guides' "measure what you
mean" asks for on a shared CPU: before every timed call a buffer twice the size of the last-level cache
is rewritten, so no implementation reads an input another one has just pulled into the cache (cold
inputs, as a layer sees activations that left the cache long ago); and the order of the
implementations rotates each round. A ratio is the median over rounds of the per-round ratio to the
baseline, so a slow round (the machine's other tenants) counts against both sides of the ratio.

Host memory (`--allocator`, CPU scripts): XLA:CPU takes its buffers from glibc's malloc, which by
default maps a large block afresh and returns it to the kernel when freed, adapting its thresholds to
the sizes it has seen (`mallopt(3)`). A call then page-faults its output in again, page by page: on
this VM 12.8 MB of faults cost ~3-4 ms, more than the BatchNorm itself (1.6-1.8 ms), added equally to
every implementation, and whether a row pays it changed from one row to the next within a run. `keep`
(the default) fixes glibc's thresholds so freed memory stays in the process and the programs are
timed, not the page faults; `fault` maps every block of 128 KiB or more afresh (each call pays the
faults); `glibc` leaves glibc's adaptive defaults, as runs before this option had.

Each ratio comes with a distribution-free 95 % confidence interval for that median (`median_interval`:
order statistics of the per-round ratios, from the binomial distribution; no assumption about the shape
of the noise). On the 2-core VM of BENCHMARKS.md one round's ratio of two identical programs spreads
0.84-1.17 (10th-90th percentile) with cold caches, so a row's median over 30 rounds is known to about
+-5 %: a row is *slower* than the baseline only when its whole interval lies above 1.
"""

import argparse
import ctypes
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import time

import jax
import numpy as np

try:
  import resource  # POSIX only: the page-fault counts of `time_paired`
except ImportError:  # pragma: no cover
  resource = None


def parser(name: str, description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(__file__), "results", f"{name}.json"),
    help="where to write the JSON results (default benchmarks/results/%(prog)s.json)",
  )
  p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
  p.add_argument("--input-sets", type=int, default=3, help="random input sets rotated while timing")
  p.add_argument(
    "--allocator",
    default="keep",
    choices=ALLOCATOR_MODES,
    help="host memory: keep freed blocks in the process (default), map every block afresh "
    "(fault), or glibc's adaptive defaults; see benchmarks/_common.py",
  )
  return p


ALLOCATOR_MODES = ("keep", "fault", "glibc")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_ALLOCATOR = {"mode": "glibc"}


def pin_allocator(mode: str) -> str:
  """Sets how glibc's malloc maps host memory for this process (see the module docstring).

  Returns the mode in force: `mode`, or "glibc" where this is not glibc (nothing changed).
  """
  if mode not in ALLOCATOR_MODES:
    raise ValueError(f"allocator mode={mode!r} must be one of {ALLOCATOR_MODES}")
  if mode == "glibc" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return _ALLOCATOR["mode"]
  libc = ctypes.CDLL(None)
  keep = mode == "keep"  # map blocks below 1 GiB from the heap, and never trim it (INT_MAX bytes)
  ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30 if keep else 1 << 17)
  ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1 if keep else 1 << 17)
  if not ok:
    raise RuntimeError(f"mallopt refused allocator mode {mode!r}")
  _ALLOCATOR["mode"] = mode
  return mode


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """`p.parse_args(argv)`, with `--allocator` put in force (`pin_allocator`)."""
  args = p.parse_args(argv)
  args.allocator = pin_allocator(args.allocator)
  return args


def parse_shapes(text: str) -> list:
  """Shapes from the command line: "8x28x28x128,4x7x7x64" -> [(8, 28, 28, 128), (4, 7, 7, 64)]."""
  return [tuple(int(d) for d in s.split("x")) for s in text.split(",")]


def time_fn(fn, input_sets, repeats: int) -> float:
  """Median seconds of `fn(*inputs)` over `repeats` calls rotating through `input_sets`."""
  for inputs in input_sets:  # compile + warm up
    jax.block_until_ready(fn(*inputs))
  times = []
  for i in range(repeats):
    inputs = input_sets[i % len(input_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_interleaved(fns, input_sets, repeats: int) -> dict:
  """Like `time_fn` for several functions of the same inputs, timed round-robin (call by call), so a
  change of machine load during the run affects them alike. Returns {name: (median, min) seconds}; on
  a shared, loaded machine the minimum is the better estimate of the unloaded time."""
  for fn in fns.values():
    for inputs in input_sets:
      jax.block_until_ready(fn(*inputs))
  times = {name: [] for name in fns}
  for i in range(repeats):
    inputs = input_sets[i % len(input_sets)]
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


_FLUSH = {}


def last_level_cache_bytes() -> int:
  """The size of the largest CPU cache (sysfs), or 32 MiB when it cannot be read."""
  sizes = []
  for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
    try:
      text = open(path).read().strip().upper()
      sizes.append(
        int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
      )
    except (OSError, ValueError):
      pass
  return max(sizes, default=32 * 2**20)


def flush_caches() -> None:
  """Rewrites a float32 buffer of twice the last-level cache on the host (CPU backends only)."""
  if jax.default_backend() != "cpu":
    return
  if "fn" not in _FLUSH:
    _FLUSH["buffer"] = jax.numpy.zeros((2 * last_level_cache_bytes() // 4,), np.float32)
    _FLUSH["fn"] = jax.jit(lambda b: b + 1.0)
  jax.block_until_ready(_FLUSH["fn"](_FLUSH["buffer"]))


def time_paired(fns, input_sets, repeats: int, baseline: str, flush: bool = True) -> dict:
  """Round-robin timing with cold caches and rotating order; ratios paired by round.

  Returns:
    {name: {"median_s", "min_s", "ratio", "ratio_lo", "ratio_hi", "faults"}} with `ratio` the median
    over rounds of time(name) / time(baseline) in the same round (1.0 for the baseline),
    [`ratio_lo`, `ratio_hi`] its 95 % confidence interval (`median_interval`), and `faults` the
    median number of the process's minor page faults during a timed call (None where unknown).
  """
  names = list(fns)
  for fn in fns.values():
    for inputs in input_sets:
      jax.block_until_ready(fn(*inputs))
  times = {name: [] for name in names}
  faults = {name: [] for name in names}
  for i in range(repeats):
    inputs = input_sets[i % len(input_sets)]
    for name in names[i % len(names) :] + names[: i % len(names)]:
      if flush:
        flush_caches()
      before = minor_page_faults()
      start = time.perf_counter()
      jax.block_until_ready(fns[name](*inputs))
      times[name].append(time.perf_counter() - start)
      faults[name].append(None if before is None else minor_page_faults() - before)
  out = {}
  for name, t in times.items():
    ratios = [a / b for a, b in zip(t, times[baseline])]
    lo, hi = median_interval(ratios)
    out[name] = {
      "median_s": statistics.median(t),
      "min_s": min(t),
      "ratio": statistics.median(ratios),
      "faults": None if None in faults[name] else statistics.median(faults[name]),
    }
    out[name].update(ratio_lo=lo, ratio_hi=hi)
  return out


def minor_page_faults():
  """This process's minor page faults so far (all threads), or None where `resource` is missing."""
  if resource is None:
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_interval(values, confidence: float = 0.95) -> tuple:
  """Distribution-free confidence interval of the median of `values` (order statistics).

  With n values sorted, the interval [v_(k), v_(n+1-k)] (1-based) covers the median with probability
  1 - 2 P(Binomial(n, 1/2) < k); k is the largest rank that keeps that at least `confidence`. Fewer
  than 6 values cannot give a 95 % interval; the whole range is returned then.

  Example:
    >>> median_interval([0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 1.0, 0.98, 1.02, 1.01])
    (0.95, 1.1)
  """
  v, n = sorted(values), len(values)
  below = 0.0  # P(Binomial(n, 1/2) < k) for the current k
  outcomes = 1 << n  # an exact integer: 2.0**n overflows past n = 1023
  k = 0
  while k < n // 2:
    below_next = below + math.comb(n, k) / outcomes
    if 1.0 - 2.0 * below_next < confidence:
      break
    below, k = below_next, k + 1
  k = max(k, 1)
  return v[k - 1], v[n - k]


def machine() -> dict:
  info = {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "allocator": _ALLOCATOR["mode"],
  }
  try:
    import flax

    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        info["cpu_model"] = line.split(":", 1)[1].strip()
  except OSError:
    pass
  if jax.default_backend() == "gpu":
    info["gpu"] = jax.devices()[0].device_kind
  return info


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = {"machine": machine(), **payload}
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  print(f"\nwrote {path}")


def print_table(rows, columns) -> None:
  """Prints a list of dicts as an aligned text table; `columns` is a list of (key, header, format)."""
  cells = [[h for _, h, _ in columns]]
  for r in rows:
    cells.append([("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns])
  widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
  for j, row in enumerate(cells):
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if j == 0:
      print("  ".join("-" * w for w in widths))


def random_inputs(key, shape, dtype, count):
  keys = jax.random.split(key, count)
  return [jax.random.normal(k, shape, np.float32).astype(dtype) for k in keys]
