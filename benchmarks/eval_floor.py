"""How much faster than flax.linen an evaluation BatchNorm could be on XLA:CPU, as minimal programs.

BatchNorm's evaluation is `y = (x − mean)·(scale·rsqrt(var + ε)) + bias` with the running statistics.
normjax compiles it to exactly flax.linen's program (`tests/test_lowering.py`): one small fusion for
`rsqrt(var + ε)` and one loop fusion that reads `x` once and writes `y` once. This script times that
program against programs that do strictly less, on the same inputs:

  * `flax`: `flax.linen.BatchNorm(use_running_average=True)` (the baseline).
  * `normjax`: `normjax.batch_norm().apply(..., training=False)`.
  * `one pass, no rsqrt`: `(x − mean)·scale + bias` in float32, rounded once to `x`'s dtype: the same
    loop without the per-feature `rsqrt` (one kernel). Not a BatchNorm; a floor for one.
  * `one pass, one multiply`: `x·scale` rounded to `x`'s dtype: the least work a program that reads
    `x` and writes `y` can do.

If even these programs are not clearly faster than flax's, no evaluation program can be, and an
evaluation row of `benchmarks/op_batch_norm.py` can only tie. Timing as there (`_common.time_paired`:
cold caches, rotating order, per-round ratios to flax with a 95 % interval), at the op benchmark's
evaluation shapes (ResNet-50's BatchNorm inputs at batch 8, and the 12.8 MB sweep).

Usage:
  python -m benchmarks.eval_floor                 # 24 rows, 60 rounds (~2 min)
  python -m benchmarks.eval_floor --quick         # smoke test
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import normjax
from benchmarks import _common
from benchmarks import hlo_stats
from benchmarks import op_batch_norm
from benchmarks import tables

EPSILON = 1e-5


def programs(x):
  """name -> (jitted f(params, stats, x), params, stats); `stats` the running statistics."""
  features = x.shape[-1]
  flax_layer = nn.BatchNorm(momentum=0.99, epsilon=EPSILON, dtype=x.dtype)
  params = {  # float32, as flax's and normjax's parameters; not all ones and zeros
    "scale": jnp.linspace(0.5, 1.5, features, dtype=jnp.float32),
    "bias": jnp.linspace(-1.0, 1.0, features, dtype=jnp.float32),
  }
  # float32, not weakly typed (flax would then subtract the mean in x's dtype: an extra kernel)
  mean = jnp.linspace(0.0, 1.0, features, dtype=jnp.float32)
  stats = {"mean": mean, "var": jnp.linspace(1.0, 4.0, features, dtype=jnp.float32)}
  bn = normjax.batch_norm(momentum=0.99, epsilon=EPSILON)
  state = bn.init(x)[1]._replace(mean=stats["mean"], var=stats["var"])

  def flax_eval(p, s, x):
    return flax_layer.apply({"params": p, "batch_stats": s}, x, use_running_average=True)

  def normjax_eval(p, s, x):
    return bn.apply(p, state._replace(mean=s["mean"], var=s["var"]), x, training=False)[0]

  def no_rsqrt(p, s, x):
    return ((x.astype(jnp.float32) - s["mean"]) * p["scale"] + p["bias"]).astype(x.dtype)

  def one_multiply(p, s, x):
    del s
    return (x.astype(jnp.float32) * p["scale"]).astype(x.dtype)

  fns = {
    "flax": flax_eval,
    "normjax": normjax_eval,
    "one pass, no rsqrt": no_rsqrt,
    "one pass, one multiply": one_multiply,
  }
  return {name: jax.jit(fn) for name, fn in fns.items()}, params, stats


def run_shape(shape, dtype, repeats, input_sets):
  """One row per program at (shape, dtype), each timed against flax."""
  keys = jax.random.split(jax.random.key(sum(shape)), input_sets)
  xs = [(jax.random.normal(k, shape, jnp.float32) * 2.0 + 0.5).astype(dtype) for k in keys]
  fns, params, stats = programs(xs[0])
  compiled = {name: fn.lower(params, stats, xs[0]).compile() for name, fn in fns.items()}
  timed = _common.time_paired(
    {name: (lambda c: lambda x: c(params, stats, x))(c) for name, c in compiled.items()},
    [(x,) for x in xs],
    repeats,
    baseline="flax",
  )
  rows = []
  for name, c in compiled.items():
    t = timed[name]
    rows.append(
      {
        "shape": "x".join(map(str, shape)),
        "dtype": jnp.dtype(dtype).name,
        "program": name,
        "kernels": hlo_stats.analyze(c.as_text())["kernels"],
        "us": t["median_s"] * 1e6,
        "ratio": t["ratio"],
        "ratio_lo": t["ratio_lo"],
        "ratio_hi": t["ratio_hi"],
      }
    )
  return rows


def summary(rows):
  """Per (dtype, program): rows, geometric mean of the ratios, rows whose interval lies below 1."""
  out = []
  for dtype in sorted({r["dtype"] for r in rows}, reverse=True):
    for program in dict.fromkeys(r["program"] for r in rows):
      group = [r for r in rows if r["dtype"] == dtype and r["program"] == program]
      if not group:
        continue
      out.append(
        {
          "dtype": dtype,
          "program": program,
          "kernels": group[0]["kernels"],
          "rows": len(group),
          "geo": tables._geo([r["ratio"] for r in group]),  # pylint: disable=protected-access
          "min": min(r["ratio"] for r in group),
          "max": max(r["ratio"] for r in group),
          "faster": sum(r["ratio_hi"] < 1.0 for r in group),
          "slower": sum(r["ratio_lo"] > 1.0 for r in group),
        }
      )
  return out


SUMMARY_COLUMNS = [
  ("dtype", "dtype", "{}"),
  ("program", "program", "{}"),
  ("kernels", "kernels", "{}"),
  ("rows", "rows", "{}"),
  ("geo", "/ flax (geo mean)", "{:.3f}"),
  ("min", "lowest row", "{:.3f}"),
  ("max", "highest row", "{:.3f}"),
  ("faster", "rows faster (interval < 1)", "{}"),
  ("slower", "rows slower (interval > 1)", "{}"),
]


@tables.register("cpu_eval_floor")
def _table():
  payload = tables._load("eval_floor")  # pylint: disable=protected-access
  head = tables._machine_line(payload)  # pylint: disable=protected-access
  note = f"{payload['repeats']} rounds per row, caches flushed before every call."
  return f"{head} {note}\n\n" + tables.markdown(summary(payload["rows"]), SUMMARY_COLUMNS)


def main():
  p = _common.parser("eval_floor", __doc__.splitlines()[0])
  args = _common.parse_args(p)
  repeats = args.repeats or (5 if args.quick else 60)
  shapes = [(2, 4, 4, 8)] if args.quick else op_batch_norm.shapes_for("all", 8)
  dtypes = (jnp.float32, jnp.bfloat16)
  rows = []
  for dtype in dtypes:
    for shape in shapes:
      new = run_shape(shape, dtype, repeats, args.input_sets)
      for r in new:
        print(f"{r['shape']} {r['dtype']} {r['program']}: {r['ratio']:.3f}", flush=True)
      rows += new
  print(tables.text(summary(rows), SUMMARY_COLUMNS))
  _common.write_json(args.out, {"benchmark": "eval_floor", "rows": rows, "repeats": repeats})


if __name__ == "__main__":
  main()
