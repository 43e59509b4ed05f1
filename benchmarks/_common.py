"""Shared helpers of the benchmark scripts: timing, throughput against the memory floor, output.

Timing rules (every script): the compiled function is called once per input set before timing
(compilation and warm-up excluded), then `repeats` timed calls rotate over the input sets, each ended by
`jax.block_until_ready`; the median is reported. normjax and flax run in the same process on the same
inputs.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import jax
import numpy as np


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
  return p


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


def machine() -> dict:
  info = {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
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
