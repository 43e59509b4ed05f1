"""The XLA:CPU reduction facts behind normjax's CPU lowering, each as a minimal program.

`normjax/_src/lowering.py` states what XLA:CPU's reductions (YNNPACK "ynn fusions", jaxlib ≥ 0.10) do
with the sums of a BatchNorm training forward. Each fact is a minimal jitted program over one
activation `x` (NHWC, the sums over N, H, W; `K` a runtime per-feature vector):

  * `single`: one reduction of `x`, of `x * x`, of `x - K`, of `(x - K)**2`. A reduction whose
    operand subtracts a broadcast per-feature vector runs slower than one of `x` or `x * x`.
  * `shared`: the two sums of the shifted one pass, `Σ(x - K)` and `Σ(x - K)²`, written plainly (one
    `x - K` for both) and with a private alias of `x` and `K` per sum (`lowering.private_copies`, an
    optimization barrier): plainly, XLA writes `x - K` to memory in float32 and reads it back twice
    (`full-size intermediates` = 1); the aliases fuse the subtraction into each reduction.
  * `plain`: the CPU lowering's first pass, `Σx` and `Σx²` (flax's sums too), plainly and with aliases.
  * bfloat16 input, `Σx` and `Σx²` after `astype(float32)`: the shared convert is materialized too.

The columns: kernels (top-level fusions and calls of the optimized HLO), full-size intermediates
(`hlo_stats.analyze`: results of one kernel, of x's size, read by another), the median time with
caches flushed before every call and without (`_common.time_paired`, order rotating), the throughput in GB/s
of the bytes of `x` (each program reads `x` once at best; `/ Σx` compares with the first row).

Usage:
  python -m benchmarks.cpu_reductions                    # 64x28x28x128 (25.7 MB float32)
  python -m benchmarks.cpu_reductions --shapes 8x56x56x64 --repeats 50
"""

import functools

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import hlo_stats
from benchmarks import tables
from normjax._src import lowering


def single_programs():
  """name -> f(x, k): one reduction each."""
  return {
    "Σx": lambda x, k, axes: jnp.sum(x, axes),
    "Σx²": lambda x, k, axes: jnp.sum(x * x, axes),
    "Σ(x − K)": lambda x, k, axes: jnp.sum(x - k, axes),
    "Σ(x − K)²": lambda x, k, axes: jnp.sum(jnp.square(x - k), axes),
  }


def _pair(x, k, axes, *, shift, private):
  """Σ(x − K) and Σ(x − K)² (or Σx and Σx² without `shift`), in float32, with or without aliases."""
  copies = lowering.private_copies((x, k), 2) if private else ((x, k), (x, k))
  a, b = (v.astype(jnp.float32) - (kv if shift else 0.0) for v, kv in copies)
  return jnp.sum(a, axes), jnp.sum(b * b, axes)


def pair_programs():
  """name -> f(x, k): the two sums of one pass."""
  return {
    "Σ(x − K), Σ(x − K)²: one x − K": functools.partial(_pair, shift=True, private=False),
    "Σ(x − K), Σ(x − K)²: an alias each": functools.partial(_pair, shift=True, private=True),
    "Σx, Σx²: plain": functools.partial(_pair, shift=False, private=False),
    "Σx, Σx²: an alias each": functools.partial(_pair, shift=False, private=True),
  }


def compile_program(fn, x, k):
  """`fn(x, k, axes)` compiled for this backend, the sums over every axis but the last."""
  axes = tuple(range(x.ndim - 1))
  return jax.jit(functools.partial(fn, axes=axes)).lower(x, k).compile()


def run_group(part, fns, x, k, repeats, flush=True):
  """Rows of one group of programs, timed against each other (the first is the baseline)."""
  compiled = {name: compile_program(fn, x, k) for name, fn in fns.items()}
  first = next(iter(compiled))
  timed = _common.time_paired(compiled, [(x, k)], repeats, baseline=first, flush=flush)
  rows = []
  for name, c in compiled.items():
    stats = hlo_stats.analyze(c.as_text(), full_numel=x.size)
    seconds = timed[name]["median_s"]
    rows.append(
      {
        "shape": "x".join(map(str, x.shape)),
        "dtype": jnp.dtype(x.dtype).name,
        "part": part,
        "caches": "cold" if flush else "warm",
        "program": name,
        "kernels": stats["kernels"],
        "intermediates": len(stats["intermediates"]),
        "us": seconds * 1e6,
        "GBps": x.nbytes / seconds / 1e9,
        "ratio": timed[name]["ratio"],
      }
    )
  return rows


def run(shape, repeats, flush=True):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0 + 0.5
  k = jnp.full(shape[-1:], 0.5, jnp.float32)
  rows = run_group("single", single_programs(), x, k, repeats, flush)
  rows += run_group("one pass", pair_programs(), x, k, repeats, flush)
  bf16 = {name: fn for name, fn in pair_programs().items() if name.startswith("Σx")}
  rows += run_group("one pass", bf16, x.astype(jnp.bfloat16), k, repeats, flush)
  return rows


COLUMNS = [
  ("shape", "shape", "{}"),
  ("dtype", "dtype", "{}"),
  ("part", "part", "{}"),
  ("caches", "caches", "{}"),
  ("program", "program", "{}"),
  ("kernels", "kernels", "{}"),
  ("intermediates", "full-size intermediates", "{}"),
  ("us", "µs", "{:.0f}"),
  ("GBps", "GB/s of x", "{:.1f}"),
  ("ratio", "time / group's first", "{:.3f}"),
]


@tables.register("cpu_reductions")
def _table():
  return tables.measured_rows("cpu_reductions", COLUMNS)


def main():
  p = _common.parser("cpu_reductions", __doc__.splitlines()[0])
  p.add_argument("--shapes", default="64x28x28x128", help="NHWC, comma separated")
  args = _common.parse_args(p)
  shapes = _common.parse_shapes(args.shapes)
  repeats = args.repeats or (5 if args.quick else 100)
  if args.quick:
    shapes = [(4, 7, 7, 64)]
  rows = [row for flush in (True, False) for shape in shapes for row in run(shape, repeats, flush)]
  print(tables.text(rows, COLUMNS))
  payload = {"benchmark": "cpu_reductions", "rows": rows, "repeats": repeats}
  _common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
