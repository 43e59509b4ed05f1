"""Accuracy of the batch variance: normjax (first step, second step, stats_shift="batch") vs flax.linen.

Inputs: N(mean, 1) activations of shape (batch, 56, 56, channels) for mean in {0, 1e2, 1e3, 1e4}, in
float32 and bfloat16. The batch variance each library computes is read from its running variance after
a training step with momentum 0 (both use the biased batch variance there), and compared with the
float64 variance of the same (already rounded) input, so only the algorithm's error is measured. Also
reported: the max abs error of the normalized output `y` vs float64.

Columns (`IMPLS`):
  * `normjax`: normjax's default on the first training step of a fresh layer. Its one-pass statistics
    are shifted by the running mean, which is 0 there, so on GPU and TPU this step has the precision of
    E[x²] − E[x]²; the CPU lowering detects |mean| > 3 std and repeats the pass with the batch mean.
  * `normjax_step2`: the default on the second step on the same data (the shift is then the running
    mean of step 1: the state every later step sees).
  * `normjax_batch`: `stats_shift="batch"` on the first step (a probe of this batch: accurate from the
    first step on every platform).
  * `flax` (use_fast_variance=True, its default) and `flax_two_pass` (use_fast_variance=False).

Usage:
  python -m benchmarks.numerics
  python -m benchmarks.numerics --quick
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normjax
from benchmarks import _common

MEANS = (0.0, 1e2, 1e3, 1e4)
DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def _normjax_layer(options):
  """A momentum-0 normjax BatchNorm with `options` (a sorted tuple of items) and its jitted step."""
  bn = normjax.batch_norm(momentum=0.0, **dict(options))
  return bn, jax.jit(lambda p, s, x: bn.apply(p, s, x, training=True))


def _normjax_var(x, steps=1, **options):
  """normjax's batch variance (float64 NumPy) and output `y` after `steps` training steps on `x`."""
  bn, step = _normjax_layer(tuple(sorted(options.items())))
  params, state = bn.init(x)
  for _ in range(steps):
    y, state = step(params, state, x)
  return np.asarray(state.var, np.float64), y


@functools.lru_cache(maxsize=None)
def _flax_layer(fast, dtype_name):
  """A momentum-0 flax.linen.BatchNorm in training mode, its jitted init and its jitted step."""
  layer = nn.BatchNorm(
    use_running_average=False, momentum=0.0, use_fast_variance=fast, dtype=jnp.dtype(dtype_name)
  )
  step = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))
  return jax.jit(layer.init), step


def _flax_var(x, fast):
  init, step = _flax_layer(fast, jnp.dtype(x.dtype).name)
  y, updates = step(init(jax.random.key(0), x), x)
  return np.asarray(updates["batch_stats"]["var"], np.float64), y


IMPLS = {
  "normjax": _normjax_var,
  "normjax_step2": lambda x: _normjax_var(x, steps=2),
  "normjax_batch": lambda x: _normjax_var(x, stats_shift="batch"),
  "flax": lambda x: _flax_var(x, True),
  "flax_two_pass": lambda x: _flax_var(x, False),
}

_FMT = "{:.2e}"
COLUMNS = [
  ("dtype", "dtype", "{}"),
  ("mean", "mean", "{:g}"),
  ("true_var", "float64 var", "{:.4f}"),
  ("normjax_rel_err", "normjax 1st step", _FMT),
  ("normjax_step2_rel_err", "normjax 2nd step", _FMT),
  ("normjax_batch_rel_err", 'normjax stats_shift="batch"', _FMT),
  ("flax_rel_err", "flax (fast)", _FMT),
  ("flax_two_pass_rel_err", "flax two-pass", _FMT),
  ("normjax_y_err", "normjax y err", _FMT),
  ("normjax_step2_y_err", "normjax 2nd step y err", _FMT),
  ("flax_y_err", "flax y err", _FMT),
]


def error_row(x, impls=IMPLS) -> dict:
  """Relative/absolute variance errors and output errors of every implementation on input `x`."""
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  want = x64.var(axis=(0, 1, 2))
  want_y = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(want + 1e-5)
  row = {"true_var": float(want.mean())}
  for name, fn in impls.items():
    var, y = fn(x)
    err = np.abs(var - want)
    row[f"{name}_rel_err"] = float(np.max(err / want)) if np.all(want > 0) else None
    row[f"{name}_abs_err"] = float(np.max(err))
    row[f"{name}_y_err"] = float(np.max(np.abs(np.asarray(y, np.float64) - want_y)))
  return row


def run(shape, dtypes=DTYPES, means=MEANS, verbose=True) -> list:
  """The rows of the table: one per (dtype, mean) at activation `shape` (NHWC)."""
  rows = []
  for dtype_name in dtypes:
    for mean in means:
      x = (mean + jax.random.normal(jax.random.key(1), shape, jnp.float32)).astype(dtype_name)
      row = {"dtype": dtype_name, "mean": mean, **error_row(x)}
      rows.append(row)
      if verbose:
        print(row, flush=True)
  return rows


def main():
  p = _common.parser("numerics", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=64)
  args = _common.parse_args(p)
  shape = (2, 8, 8, 8) if args.quick else (args.batch, 56, 56, args.channels)
  rows = run(shape)
  print()
  _common.print_table(rows, COLUMNS)
  _common.write_json(args.out, {"benchmark": "numerics", "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
