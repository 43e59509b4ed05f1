"""Accuracy of the batch variance: normjax default vs flax.linen.BatchNorm (fast and two-pass).

Inputs: N(mean, 1) activations of shape (batch, 56, 56, channels) for mean in {0, 1e2, 1e3, 1e4}, in
float32 and bfloat16. The batch variance each library computes is read from its running variance after
one training step with momentum 0 (both use the biased batch variance there), and compared with the
float64 variance of the same (already rounded) input, so only the algorithm's error is measured. Also
reported: the error of normjax.moments (identical to the layer's) and of the normalized output
`y` (max abs error vs float64).

Usage:
  python -m benchmarks.numerics
  python -m benchmarks.numerics --quick
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import normjax
from benchmarks import _common

MEANS = (0.0, 1e2, 1e3, 1e4)


def _normjax_var(x):
  bn = normjax.batch_norm(momentum=0.0)
  params, state = bn.init(x)
  y, state = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=True))(params, state, x)
  return np.asarray(state.var, np.float64), y


def _flax_var(x, fast):
  layer = nn.BatchNorm(
    use_running_average=False, momentum=0.0, use_fast_variance=fast, dtype=x.dtype
  )
  variables = layer.init(jax.random.key(0), x)
  y, updates = jax.jit(lambda v, x: layer.apply(v, x, mutable=["batch_stats"]))(variables, x)
  return np.asarray(updates["batch_stats"]["var"], np.float64), y


def main():
  p = _common.parser("numerics", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--channels", type=int, default=64)
  args = p.parse_args()
  shape = (2, 8, 8, 8) if args.quick else (args.batch, 56, 56, args.channels)
  rows = []
  for dtype_name in ("float32", "bfloat16"):
    for mean in MEANS:
      x = (mean + jax.random.normal(jax.random.key(1), shape, jnp.float32)).astype(dtype_name)
      x64 = np.asarray(x.astype(jnp.float32), np.float64)
      want = x64.var(axis=(0, 1, 2))
      want_y = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(want + 1e-5)
      row = {"dtype": dtype_name, "mean": mean, "true_var": float(want.mean())}
      for name, fn in (
        ("normjax", _normjax_var),
        ("flax", lambda x: _flax_var(x, True)),
        ("flax_two_pass", lambda x: _flax_var(x, False)),
      ):
        var, y = fn(x)
        err = np.abs(var - want)
        row[f"{name}_rel_err"] = float(np.max(err / want)) if np.all(want > 0) else None
        row[f"{name}_abs_err"] = float(np.max(err))
        row[f"{name}_y_err"] = float(np.max(np.abs(np.asarray(y, np.float64) - want_y)))
      rows.append(row)
      print(row, flush=True)
  print()
  fmt = "{:.2e}"
  _common.print_table(
    rows,
    [
      ("dtype", "dtype", "{}"),
      ("mean", "mean", "{:g}"),
      ("true_var", "float64 var", "{:.4f}"),
      ("normjax_rel_err", "normjax rel err", fmt),
      ("flax_rel_err", "flax (fast) rel err", fmt),
      ("flax_two_pass_rel_err", "flax 2-pass rel err", fmt),
      ("normjax_y_err", "normjax y err", fmt),
      ("flax_y_err", "flax y err", fmt),
    ],
  )
  _common.write_json(args.out, {"benchmark": "numerics", "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
