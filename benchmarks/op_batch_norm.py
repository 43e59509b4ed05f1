"""BatchNorm op benchmark: normjax vs flax.linen.BatchNorm, forward and forward+backward.

Shapes are the BatchNorm inputs of ResNet-50 (NHWC). For each shape, dtype and variant it times, in one
process on the same random inputs:

  * normjax (`normjax.batch_norm` with the variant's options),
  * flax.linen.BatchNorm with its defaults (use_fast_variance=True, the baseline),
  * flax.linen.BatchNorm(use_fast_variance=False) (two-pass variance),

for `fwd` (y and the new running statistics) and `fwd+bwd` (y, new statistics, dx, dscale, dbias via
`jax.vjp` with a fixed random dy). Throughput is reported against the memory floor: N = bytes of x;
forward floor 2N (read x, write y), forward+backward floor 5N (read x, write y, read x, read dy,
write dx). `ratio` = normjax time / flax default time (< 1: normjax faster).

Variants: default; ghost (ghost_batch_size = batch/2); renorm; sync (axis_name over a 1-device mesh under
shard_map, flax with the same axis_name); masked (random (N,H,W,1) mask, ~90% valid, flax with the same
mask). flax has no ghost or renorm option, so those rows compare against plain flax BatchNorm.

Usage:
  python -m benchmarks.op_batch_norm                       # CPU default: batch 8, all shapes and variants
  python -m benchmarks.op_batch_norm --batch 128 --dtypes bfloat16 --variants default   # GPU-sized
  python -m benchmarks.op_batch_norm --quick               # smoke test
"""

import functools


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import normjax
from benchmarks import _common
from normjax._src import batch_norm as batch_norm_lib

SHAPES = [
  (56, 56, 64),
  (56, 56, 256),
  (28, 28, 128),
  (28, 28, 512),
  (14, 14, 256),
  (14, 14, 1024),
  (7, 7, 512),
  (7, 7, 2048),
]
VARIANTS = ("default", "ghost", "renorm", "sync", "masked")
AXIS = "batch"


def _options(variant, batch):
  return {
    "default": {},
    "ghost": {"ghost_batch_size": max(2, batch // 2)},
    "renorm": {"renorm": True},
    "sync": {"axis_name": AXIS},
    "masked": {},
  }[variant]


def autodiff_apply(bn, options, params, state, x, mask=None):
  """`bn.apply(..., training=True)` differentiated by plain autodiff through `moments` (the previous
  path): the core's own training step with `closed_form=False`."""
  del bn  # the options say everything
  config = batch_norm_lib.BatchNormConfig(**options)
  y, new_state, _ = batch_norm_lib.apply_with_batch_moments(
    config, params, state, x, training=True, mask=mask, closed_form=False
  )
  return y, new_state


def autodiff_output(options, params, state, x, mask=None):
  """The output of `autodiff_apply`."""
  return autodiff_apply(None, options, params, state, x, mask)[0]


def _normjax_fns(variant, batch, x, closed_form=True):
  options = _options(variant, batch)
  bn = normjax.batch_norm(**options)
  params, state = bn.init(x)
  if closed_form:
    apply = lambda p, state, x, mask: bn.apply(p, state, x, training=True, mask=mask)
  else:
    apply = functools.partial(autodiff_apply, bn, options)

  def fwd(params, state, x, dy, mask):
    del dy
    return apply(params, state, x, mask)

  def fwd_bwd(params, state, x, dy, mask):
    f = lambda p, x: apply(p, state, x, mask)
    y, vjp, new_state = jax.vjp(f, params, x, has_aux=True)
    dparams, dx = vjp(dy)
    return y, new_state, dx, dparams["scale"], dparams["bias"]

  return fwd, fwd_bwd, params, state


def _flax_fns(variant, x, fast_variance):
  layer = nn.BatchNorm(
    use_running_average=False,
    momentum=0.99,
    epsilon=1e-5,
    use_fast_variance=fast_variance,
    axis_name=AXIS if variant == "sync" else None,
    dtype=x.dtype,
  )  # same output dtype as normjax (flax would promote bf16 to f32)
  variables = layer.init(jax.random.key(0), x)  # init does not need the axis bound
  params, state = variables["params"], variables["batch_stats"]

  def fwd(params, state, x, dy, mask):
    del dy
    return layer.apply(
      {"params": params, "batch_stats": state}, x, mask=mask, mutable=["batch_stats"]
    )

  def fwd_bwd(params, state, x, dy, mask):
    def f(p, x):
      y, updates = layer.apply(
        {"params": p, "batch_stats": state}, x, mask=mask, mutable=["batch_stats"]
      )
      return y, updates

    y, vjp, new_state = jax.vjp(f, params, x, has_aux=True)
    dparams, dx = vjp(dy)
    return y, new_state, dx, dparams["scale"], dparams["bias"]

  return fwd, fwd_bwd, params, state


def _compile(fn, variant, masked, mode):
  """jit, under a 1-device shard_map for `sync`; the mask argument is None unless masked."""
  if variant == "sync":
    mesh = jax.make_mesh(
      (1,), (AXIS,), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )
    fn = jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS) if masked else None),
      out_specs=(P(AXIS), P()) if mode == "fwd" else (P(AXIS), P(), P(AXIS), P(), P()),
      check_vma=False,
    )
  return jax.jit(fn)


def run(shapes, batch, dtypes, variants, repeats, input_sets, impls):
  rows = []
  key = jax.random.key(42)
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for shape in shapes:
      full = (batch,) + tuple(shape)
      key, kx, kd, km = jax.random.split(key, 4)
      xs = _common.random_inputs(kx, full, dtype, input_sets)
      xs = [x * 2.0 + 0.5 for x in xs]  # nonzero mean and unit-ish spread, as real activations
      dy = jax.random.normal(kd, full, jnp.float32).astype(dtype)
      mask = jax.random.bernoulli(km, 0.9, full[:-1] + (1,))
      nbytes = int(np.prod(full)) * dtype.itemsize
      for variant in variants:
        m = mask if variant == "masked" else None
        builders = {
          "normjax": lambda x: _normjax_fns(variant, batch, x),
          "normjax_autodiff": lambda x: _normjax_fns(variant, batch, x, closed_form=False),
          "flax": lambda x: _flax_fns(variant, x, True),
          "flax_two_pass": lambda x: _flax_fns(variant, x, False),
        }
        for mode in ("fwd", "fwd+bwd"):
          row = {
            "shape": "x".join(map(str, full)),
            "dtype": dtype_name,
            "variant": variant,
            "mode": mode,
            "MB": nbytes / 1e6,
          }
          floor = (2 if mode == "fwd" else 5) * nbytes
          fns = {}
          for impl in impls:
            fwd, fwd_bwd, params, state = builders[impl](xs[0])
            compiled = _compile(fwd if mode == "fwd" else fwd_bwd, variant, m is not None, mode)
            fns[impl] = functools.partial(compiled, params, state)
          times = _common.time_interleaved(fns, [(x, dy, m) for x in xs], repeats)
          for impl in impls:
            median, fastest = times[impl]
            row[f"{impl}_ms"] = median * 1e3
            row[f"{impl}_min_ms"] = fastest * 1e3
            row[f"{impl}_GBps"] = floor / median / 1e9
          if "normjax" in impls and "flax" in impls:
            row["ratio"] = row["normjax_ms"] / row["flax_ms"]
            row["ratio_min"] = row["normjax_min_ms"] / row["flax_min_ms"]
          if "normjax_autodiff" in impls and "flax" in impls:
            row["ratio_autodiff"] = row["normjax_autodiff_ms"] / row["flax_ms"]
          if "normjax" in impls and "flax_two_pass" in impls:
            row["ratio_two_pass"] = row["normjax_ms"] / row["flax_two_pass_ms"]
          rows.append(row)
          print(
            " ".join(
              f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
          )
  return rows


def main():
  p = _common.parser("op_batch_norm", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument(
    "--shapes", default=None, help="e.g. 56x56x64,7x7x2048 (default: all ResNet-50 shapes)"
  )
  p.add_argument(
    "--impls",
    default="normjax,flax,flax_two_pass,normjax_autodiff",
    help="normjax_autodiff: normjax differentiated by plain autodiff through the statistics "
    "(closed_form=False, the previous code path)",
  )
  args = p.parse_args()
  shapes = (
    SHAPES
    if args.shapes is None
    else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
  )
  batch, repeats = args.batch, args.repeats or 20
  dtypes, variants = args.dtypes.split(","), args.variants.split(",")
  if args.quick:
    shapes, batch, repeats, dtypes, variants = (
      [(7, 7, 64)],
      4,
      args.repeats or 2,
      ["float32"],
      ["sync"],
    )
  rows = run(shapes, batch, dtypes, variants, repeats, args.input_sets, args.impls.split(","))
  print()
  cols = [
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("variant", "variant", "{}"),
    ("mode", "mode", "{}"),
    ("normjax_ms", "normjax ms", "{:.3f}"),
    ("flax_ms", "flax ms", "{:.3f}"),
    ("flax_two_pass_ms", "flax 2-pass ms", "{:.3f}"),
    ("normjax_GBps", "normjax GB/s", "{:.2f}"),
    ("flax_GBps", "flax GB/s", "{:.2f}"),
    ("ratio", "nj/flax", "{:.3f}"),
    ("ratio_min", "nj/flax(min)", "{:.3f}"),
    ("ratio_two_pass", "nj/flax2p", "{:.3f}"),
    ("normjax_autodiff_ms", "nj autodiff ms", "{:.3f}"),
    ("ratio_autodiff", "nj-autodiff/flax", "{:.3f}"),
  ]
  _common.print_table(rows, cols)
  _common.write_json(
    args.out,
    {
      "benchmark": "op_batch_norm",
      "batch": batch,
      "repeats": repeats,
      "input_sets": args.input_sets,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
