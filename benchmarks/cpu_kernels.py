"""Why a BatchNorm training forward on XLA:CPU is slower than flax's with more than 8 kernels.

XLA:CPU's runtime (`ThunkExecutor`) runs a program of at most 8 kernels ("thunks") one after the
other, and a larger one as a concurrent dataflow graph on its thread pool
(`execute_sequential_num_thunks_threshold = 8`, not configurable). On a 2-core machine the concurrent
mode makes the forward's two big reductions and its normalize pass slower. This script shows it two
ways, per activation shape:

  * `threshold`: flax's forward in plain JAX (two sums, normalize, the two running averages: 6
    kernels) with `k` tiny per-feature outputs added (`sin(var + i)`, one kernel each), k = 0 … 5:
    the time steps up between 8 and 9 kernels and hardly moves otherwise.
  * `extras`: the same forward with a scalar count output (a BatchNorm state's step count), and
    with its per-feature epilogue inside a `lax.cond` on a runtime predicate (the structure of
    normjax's precision check): what these two cost by themselves.
  * `ablation`: normjax's training forward (y and the new state) against flax.linen's: with the CPU
    kernel (`normjax/_src/cpu_kernel.py`, the default where it is built), and as the XLA program
    (the kernel switched off), also with the precision check of the CPU lowering (`lax.cond` for the shifted second pass; its
    per-feature work then lands in the outer program) and/or the finiteness guard of the running
    statistics (`running.select_finite`) removed by patching them at trace time.

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
from normjax._src import cpu_kernel
from normjax._src import lowering
from normjax._src import running


def threshold_program(extra: int):
  """flax's forward in plain JAX (y and the two running averages), with `extra` tiny outputs."""

  def forward(x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)
    outputs = [(x - mean) * jax.lax.rsqrt(var + 1e-5), 0.9 * mean, 0.9 * var]
    return outputs + [jnp.sin(var + i) for i in range(extra)]  # one kernel each on XLA:CPU

  return jax.jit(forward)


def extras_programs(x):
  """flax's forward in plain JAX as `threshold_program(0)`, alone, with a scalar count output, and with
  its per-feature epilogue inside a `lax.cond` (normjax's structure; both branches are the same)."""
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]

  def epilogue(s1, s2):
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean * mean, 0.0)
    return mean, jax.lax.rsqrt(var + 1e-5), 0.9 * mean, 0.9 * var

  def forward(x, count, conditional):
    s1, s2 = jnp.sum(x, axes), jnp.sum(x * x, axes)
    if conditional:
      never = lowering.any_true(s1 > 3e38)  # a runtime predicate, as the precision check's
      mean, rstd, *state = jax.lax.cond(never, epilogue, epilogue, s1, s2)
    else:
      mean, rstd, *state = epilogue(s1, s2)
    outputs = [(x - mean) * rstd] + state
    return outputs + [jnp.int32(1)] if count else outputs

  return {
    "flax's forward": jax.jit(functools.partial(forward, count=False, conditional=False)),
    "+ a count output": jax.jit(functools.partial(forward, count=True, conditional=False)),
    "+ its epilogue in a cond": jax.jit(functools.partial(forward, count=False, conditional=True)),
  }


@contextlib.contextmanager
def _ablated(no_check: bool, no_guard: bool):
  with contextlib.ExitStack() as stack:
    if no_check:  # the CPU lowering's `lax.cond(plain_ok, keep, second_pass, ...)` always keeps
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
  mode_fns, params, state = op_batch_norm.normjax_fns("default", x.shape[0], x)
  programs["normjax: CPU kernel"] = (compile_fwd(mode_fns["fwd"], params, state), params, state)
  for name, no_check, no_guard in (
    ("normjax: XLA program", False, False),
    ("normjax: XLA, no precision check", True, False),
    ("normjax: XLA, no finiteness guard", False, True),
    ("normjax: XLA, neither", True, True),
  ):
    with _ablated(no_check, no_guard), cpu_kernel.switched(False):
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
  threshold = {f"flax's forward + {k} outputs": threshold_program(k) for k in range(6)}
  kernels = {name: _kernels(fn.lower(x).compile()) for name, fn in threshold.items()}
  rows = _timed_rows(threshold, (x,), repeats, kernels, "threshold")
  extras = extras_programs(x)
  kernels = {name: _kernels(fn.lower(x).compile()) for name, fn in extras.items()}
  rows += _timed_rows(extras, (x,), repeats, kernels, "extras")
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
  return tables.measured_rows("cpu_kernels", COLUMNS, note="float32.")


def main():
  p = _common.parser("cpu_kernels", __doc__.splitlines()[0])
  p.add_argument("--shapes", default="8x28x28x128,128x14x14x128", help="NHWC, comma separated")
  args = _common.parse_args(p)
  shapes = _common.parse_shapes(args.shapes)
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
