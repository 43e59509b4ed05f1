"""Memory of BatchNorm training: residuals kept for the backward, and XLA's buffers for fwd+bwd.

For each implementation, from `jax.jit(...).lower(...).compile().memory_analysis()`:
  * residual MB: output size of a jitted forward that returns `jax.vjp`'s backward closure, i.e. the
    arrays kept from the forward for the backward (x itself included when kept), minus nothing;
  * fwd+bwd temp MB: XLA's temporary buffers for one function returning (y, new stats, dx, dscale, dbias);
  * argument / output MB of that function.
Implementations: normjax (closed-form derivative), normjax with plain autodiff through the statistics
(`closed_form=False`, the previous code path),
flax.linen.BatchNorm default (fast variance) and two-pass. N = bytes of x is printed alongside.

Usage:
  python -m benchmarks.memory
  python -m benchmarks.memory --batch 128 --dtypes bfloat16     # GPU-sized (sizes are per device)
  python -m benchmarks.memory --quick
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import normjax
from benchmarks import _common
from benchmarks import op_batch_norm

SHAPES = [(56, 56, 64), (28, 28, 512), (7, 7, 2048)]


def _normjax_apply(x, closed_form=True):
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  if closed_form:
    return (lambda p, x: bn.apply(p, state, x, training=True)), params
  return (lambda p, x: op_batch_norm.autodiff_apply({}, p, state, x)), params


def _flax_apply(x, fast):
  layer = nn.BatchNorm(use_running_average=False, use_fast_variance=fast, dtype=x.dtype)
  variables = layer.init(jax.random.key(0), x)
  state = variables["batch_stats"]
  return (
    lambda p, x: layer.apply({"params": p, "batch_stats": state}, x, mutable=["batch_stats"])
  ), variables["params"]


def _analyse(apply, params, x):
  dy = jnp.ones(x.shape, x.dtype)

  def residuals(p, x):
    return jax.vjp(lambda p, x: apply(p, x)[0], p, x)[1]

  def fwd_bwd(p, x, dy):
    y, vjp, new_state = jax.vjp(apply, p, x, has_aux=True)
    return (y, new_state) + vjp(dy)

  res = jax.jit(residuals).lower(params, x).compile().memory_analysis()
  full = jax.jit(fwd_bwd).lower(params, x, dy).compile().memory_analysis()
  mb = 1e6
  return {
    "residual_MB": res.output_size_in_bytes / mb,
    "fwd_bwd_temp_MB": full.temp_size_in_bytes / mb,
    "fwd_bwd_argument_MB": full.argument_size_in_bytes / mb,
    "fwd_bwd_output_MB": full.output_size_in_bytes / mb,
  }


def main():
  p = _common.parser("memory", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtypes", default="float32,bfloat16")
  args = _common.parse_args(p)
  shapes, batch = SHAPES, args.batch
  if args.quick:
    shapes, batch = [(7, 7, 64)], 2
  rows = []
  for dtype_name in args.dtypes.split(","):
    for shape in shapes:
      x = jnp.zeros((batch,) + shape, dtype_name)
      impls = {
        "normjax": lambda: _normjax_apply(x),
        "normjax_autodiff": lambda: _normjax_apply(x, closed_form=False),
        "flax": lambda: _flax_apply(x, True),
        "flax_two_pass": lambda: _flax_apply(x, False),
      }
      for name, build in impls.items():
        apply, params = build()
        stats = _analyse(apply, params, x)
        row = {
          "shape": "x".join(map(str, x.shape)),
          "dtype": dtype_name,
          "impl": name,
          "x_MB": x.size * x.dtype.itemsize / 1e6,
          **stats,
        }
        rows.append(row)
        print(row, flush=True)
  print()
  _common.print_table(
    rows,
    [
      ("shape", "shape", "{}"),
      ("dtype", "dtype", "{}"),
      ("impl", "impl", "{}"),
      ("x_MB", "x MB", "{:.2f}"),
      ("residual_MB", "residual MB", "{:.2f}"),
      ("fwd_bwd_temp_MB", "fwd+bwd temp MB", "{:.2f}"),
      ("fwd_bwd_argument_MB", "args MB", "{:.2f}"),
      ("fwd_bwd_output_MB", "outputs MB", "{:.2f}"),
    ],
  )
  _common.write_json(args.out, {"benchmark": "memory", "batch": batch, "rows": rows})


if __name__ == "__main__":
  main()
