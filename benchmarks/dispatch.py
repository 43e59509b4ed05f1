"""The per-call cost of each framework's variables: where the evaluation rows' offset came from.

BatchNorm's evaluation compiles to exactly flax.linen's program (`tests/test_lowering.py`,
`test_cpu_evaluation_compiles_to_flax_linens_program`: the optimized HLO is identical up to names),
yet `op_batch_norm`'s evaluation rows had put normjax 1-3 % above flax. A jitted call also flattens
its arguments and looks up the compiled program by their structure, and with the caches flushed
before every call (as `op_batch_norm` does) that host-side work is slow: about 0.25 ms for a call
whose program takes a few µs. This script calls the evaluation of a tiny activation (8×1×1×64: the
program's own time is negligible) with each framework's variables and times the calls as
`op_batch_norm` does (`_common.time_paired`, 1000 rounds, caches flushed before every call, and
again without flushing):

  * `flax`: `layer.apply({"params": ..., "batch_stats": {"mean", "var"}}, x)`;
  * `normjax`: `bn.apply(params, state, x, training=False)` with `state` a `BatchNormState(mean, var,
    count)`, a NamedTuple registered with JAX by its fields (`normjax/_src/state_types.py`), so
    jaxlib finds it by one lookup of its type;
  * `normjax, state as an unregistered NamedTuple`: the same three arrays in a NamedTuple JAX does
    not know, which jaxlib recognizes by probing for `_fields` on every call (what `BatchNormState`
    was before `state_types`);
  * `normjax, state as a tuple`: the same program, the state's three arrays passed as a plain tuple;
  * `normjax, no count`: the same program, the state as a dict of `mean` and `var` only.

Usage:
  python -m benchmarks.dispatch                # about two minutes
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import _common
from benchmarks import tables
import normjax
from normjax._src.batch_norm import BatchNormState

COLUMNS = [
  ("caches", "caches", "{}"),
  ("impl", "called with", "{}"),
  ("us", "µs per call (median)", "{:.1f}"),
  ("ratio", "/ flax (median of per-round ratios)", "{:.3f}"),
  ("interval", "95 % interval", "{}"),
  ("delta_us", "− flax µs", "{:+.1f}"),
]

SHAPE = (8, 1, 1, 64)


class UnregisteredState(NamedTuple):
  """`BatchNormState`'s fields in a NamedTuple that JAX identifies by probing for `_fields`."""

  mean: jax.Array  # f32[C]
  var: jax.Array  # f32[C]
  count: jax.Array  # i32[]


def calls():
  """name -> a zero-argument call of the evaluation, with that framework's variables bound."""
  x = jnp.ones(SHAPE, jnp.float32)
  bn = normjax.batch_norm(momentum=0.9)
  params, state = bn.init(x)
  layer = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = layer.init(jax.random.key(0), x, use_running_average=True)
  flax_eval = jax.jit(lambda v, x: layer.apply(v, x, use_running_average=True))
  normjax_eval = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=False)[0])
  # the state's arrays in another container, rebuilt into a BatchNormState inside: the same program
  rebuilt = jax.jit(lambda p, s, x: bn.apply(p, BatchNormState(*s), x, training=False)[0])
  no_count = jax.jit(
    lambda p, s, x: bn.apply(
      p, BatchNormState(s["mean"], s["var"], jnp.zeros((), jnp.int32)), x, training=False
    )[0]
  )
  return {
    "flax": functools.partial(flax_eval, variables, x),
    "normjax": functools.partial(normjax_eval, params, state, x),
    "normjax, state as an unregistered NamedTuple": functools.partial(
      rebuilt, params, UnregisteredState(*state), x
    ),
    "normjax, state as a tuple": functools.partial(rebuilt, params, tuple(state), x),
    "normjax, no count": functools.partial(
      no_count, params, {"mean": state.mean, "var": state.var}, x
    ),
  }


def run(repeats: int, flush: bool):
  fns = calls()
  timed = _common.time_paired(fns, [()], repeats, baseline="flax", flush=flush)
  base = timed["flax"]["median_s"]
  rows = []
  for name, t in timed.items():
    rows.append(
      {
        "caches": "flushed" if flush else "not flushed",
        "impl": name,
        "us": t["median_s"] * 1e6,
        "ratio": t["ratio"],
        "interval": f"{t['ratio_lo']:.3f}-{t['ratio_hi']:.3f}",
        "delta_us": (t["median_s"] - base) * 1e6,
      }
    )
  return rows


@tables.register("cpu_dispatch")
def _table():
  return tables.measured_rows("dispatch", COLUMNS)


def main():
  p = _common.parser("dispatch", __doc__.splitlines()[0])
  args = _common.parse_args(p)
  repeats = args.repeats or (10 if args.quick else 1000)
  rows = [row for flush in (True, False) for row in run(repeats, flush)]
  print(tables.text(rows, COLUMNS))
  _common.write_json(args.out, {"benchmark": "dispatch", "rows": rows, "repeats": repeats})


if __name__ == "__main__":
  main()
