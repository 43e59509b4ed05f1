"""Why normjax's CPU training forward trails flax with cold caches: small kernels between the passes.

XLA:CPU runs every top-level fusion as its own kernel, and does not fuse `select` or small reductions
into their neighbours, so the per-feature epilogue of a BatchNorm step (statistics, running averages,
checks) becomes several tiny kernels between the statistics and the normalize pass. With cold caches
(as for a layer inside a model) that costs far more than their own work. This script measures it two
ways, per activation shape:

  * `minimal`: a plain-JAX BatchNorm forward (two sums, normalize: flax's program) with `r` tiny
    per-feature reductions inserted on its variance (`var * (1 + 0 * max(var))`, values unchanged;
    XLA:CPU makes separate kernels of each reduction and its use), r = 0, 2, 4, 6.
  * `ablation`: normjax's training forward (y and the new state) against flax.linen's, and normjax
    with the precision check of the CPU lowering (`lax.cond` for the shifted second pass) and/or the
    finiteness guard of the running statistics (`running.select_finite`) removed by patching them at
    trace time — what those two pieces of semantics cost in kernels and time.

Both are timed with `_common.time_paired`, cold (caches flushed before each call) and warm.

Usage:
  python -m benchmarks.cpu_kernels                  # 8x28x28x128 and 128x14x14x128, float32
  python -m benchmarks.cpu_kernels --shapes 8x7x7x512
"""

import contextlib
import functools
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import hlo_stats
from benchmarks import op_batch_norm
from benchmarks import tables
from normjax._src import running


def minimal_program(reductions: int):
  """flax's forward in plain JAX, with `reductions` tiny per-feature reductions on the variance."""

  def forward(x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)
    for _ in range(
      reductions
    ):  # values unchanged; XLA:CPU makes kernels of each reduction and its use
      var = var * (1.0 + 0.0 * jnp.max(var))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5)

  return jax.jit(forward)


@contextlib.contextmanager
def _ablated(no_check: bool, no_guard: bool):
  with contextlib.ExitStack() as stack:
    if no_check:  # the CPU lowering's `lax.cond(plain_ok, keep, second_pass)` always keeps
      stack.enter_context(
        mock.patch.object(jax.lax, "cond", lambda p, keep, other, *ops: keep(*ops))
      )
    if no_guard:
      select = lambda old, new, valid: (new, jnp.ones((), bool))
      stack.enter_context(mock.patch.object(running, "select_finite", select))
    yield


def ablation_programs(x):
  """name -> compiled training forward of (params, state, x, dy, mask), traced under each ablation,
  with its (params, state)."""
  mode_fns, params, state = op_batch_norm.flax_fns("default", x, True)
  compile_fwd = lambda fn, p, s: jax.jit(fn).lower(p, s, x, x, None).compile()
  programs = {"flax.linen": (compile_fwd(mode_fns["fwd"], params, state), params, state)}
  for name, no_check, no_guard in (
    ("normjax", False, False),
    ("normjax, no precision check", True, False),
    ("normjax, no finiteness guard", False, True),
    ("normjax, neither", True, True),
  ):
    with _ablated(no_check, no_guard):
      mode_fns, params, state = op_batch_norm.normjax_fns("default", x.shape[0], x)
      programs[name] = (compile_fwd(mode_fns["fwd"], params, state), params, state)
  return programs


def _kernels(compiled):
  return hlo_stats.analyze(compiled.as_text())["kernels"]


def _timed_rows(fns, inputs, repeats, kernels, part):
  rows = {name: {"part": part, "program": name, "kernels": kernels[name]} for name in fns}
  baseline = next(iter(fns))
  for flush, label in ((True, "cold"), (False, "warm")):
    timed = _common.time_paired(fns, [inputs], repeats, baseline=baseline, flush=flush)
    for name, t in timed.items():
      rows[name][f"{label}_us"] = t["median_s"] * 1e6
      rows[name][f"{label}_ratio"] = t["ratio"]
  return list(rows.values())


def run(shape, repeats):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0 + 0.5
  minimal = {f"minimal + {r} reductions": minimal_program(r) for r in (0, 2, 4, 6)}
  kernels = {name: _kernels(fn.lower(x).compile()) for name, fn in minimal.items()}
  rows = _timed_rows(minimal, (x,), repeats, kernels, "minimal")
  shape_text = "x".join(map(str, shape))
  programs = ablation_programs(x)
  kernels = {name: _kernels(compiled) for name, (compiled, _, _) in programs.items()}
  fns = {name: functools.partial(c, p, s) for name, (c, p, s) in programs.items()}
  rows += _timed_rows(fns, (x, x, None), repeats, kernels, "ablation")
  return [{"shape": shape_text, **row} for row in rows]


COLUMNS = [
  ("shape", "shape", "{}"),
  ("part", "part", "{}"),
  ("program", "program", "{}"),
  ("kernels", "kernels", "{}"),
  ("cold_us", "cold µs", "{:.0f}"),
  ("cold_ratio", "cold / first row", "{:.3f}"),
  ("warm_us", "warm µs", "{:.0f}"),
  ("warm_ratio", "warm / first row", "{:.3f}"),
]


@tables.register("cpu_kernels")
def _table():
  payload = tables._load("cpu_kernels")  # pylint: disable=protected-access
  head = tables._machine_line(payload)  # pylint: disable=protected-access
  return f"{head} float32.\n\n" + tables.markdown(payload["rows"], COLUMNS)


def main():
  p = _common.parser("cpu_kernels", __doc__.splitlines()[0])
  p.add_argument("--shapes", default="8x28x28x128,128x14x14x128", help="NHWC, comma separated")
  args = p.parse_args()
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  repeats = args.repeats or (20 if args.quick else 300)
  if args.quick:
    shapes = [(4, 7, 7, 64)]
  rows = [row for shape in shapes for row in run(shape, repeats)]
  print(tables.text(rows, COLUMNS))
  payload = {"benchmark": "cpu_kernels", "rows": rows}
  payload["repeats"] = repeats
  _common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
