"""BatchNorm op benchmark: normjax vs flax.linen.BatchNorm; training forward, forward+backward, evaluation.

For each shape, dtype and variant it times, in one process on the same random inputs:

  * normjax (`normjax.batch_norm` with the variant's options),
  * flax.linen.BatchNorm with its defaults (use_fast_variance=True, the baseline),
  * flax.linen.BatchNorm(use_fast_variance=False) (two-pass variance),
  * normjax with its CPU kernel switched off (`normjax_xla`: the XLA program; on a CPU only the plain
    training step differs, see `normjax/_src/cpu_kernel.py`),
  * optionally normjax differentiated by plain autodiff through the statistics (`normjax_autodiff`),

in three modes: `fwd` (training forward: y and the new running statistics), `fwd+bwd` (also dx,
dscale, dbias via `jax.vjp` with a fixed random dy) and `eval` (y from the running statistics; the same
program for every variant, so it is timed for the default variant only). normjax's state is the one
after a training step on data of the same distribution (count 1), the state every later step sees.
Throughput is reported against the memory floor: N = bytes of x; floors 2N (fwd and eval: read x,
write y) and 5N (fwd+bwd: read x, write y, read x, read dy, write dx).

Timing (`_common.time_paired`): round-robin, cold caches, rotating order; `ratio` is the median over
rounds of normjax's time / flax's time in the same round (< 1: normjax faster), with its distribution-
free 95 % interval [`ratio_lo`, `ratio_hi`] and a `verdict`: "slower" / "faster" when the interval lies
wholly above / below 1, "tie" otherwise. `--warm-caches` skips
the cache flush before each call (what a tight loop over one layer sees; the default flush is closer to
a layer inside a model, whose other layers evict its code and data).

Grids (`--grid`): `resnet50`: the BatchNorm inputs of ResNet-50 (NHWC) at `--batch` (default 8);
`sweep`: batch sizes 32 to 256 at 12.8 MB float32 activations (32x28x28x128, 64x28x28x64, 128x14x14x128,
256x7x7x256); `all` (default): both.

Variants: default; ghost (ghost_batch_size = batch/2); renorm; sync (axis_name over a 1-device mesh under
shard_map, flax with the same axis_name; an axis of one device runs normjax's local program, so the
cross-device path is timed by `benchmarks.multi_device`); masked (random (N,H,W,1) mask, ~90% valid, flax with the same
mask). flax has no ghost or renorm option, so those rows compare against plain flax BatchNorm.

Usage:
  python -m benchmarks.op_batch_norm                        # CPU: every grid, variant, dtype and mode
  python -m benchmarks.op_batch_norm --grid sweep --variants default --dtypes float32
  python -m benchmarks.op_batch_norm --batch 256 --grid resnet50 --dtypes bfloat16   # GPU-sized
  python -m benchmarks.op_batch_norm --quick                # smoke test
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import normjax
from benchmarks import _common
from benchmarks import tables
from normjax._src import batch_norm as batch_norm_lib
from normjax._src import cpu_kernel

RESNET50_SHAPES = [
  (56, 56, 64),
  (56, 56, 256),
  (28, 28, 128),
  (28, 28, 512),
  (14, 14, 256),
  (14, 14, 1024),
  (7, 7, 512),
  (7, 7, 2048),
]
SWEEP = [(32, 28, 28, 128), (64, 28, 28, 64), (128, 14, 14, 128), (256, 7, 7, 256)]
VARIANTS = ("default", "ghost", "renorm", "sync", "masked")
MODES = ("fwd", "fwd+bwd", "eval")
AXIS = "batch"
FLOOR = {"fwd": 2, "fwd+bwd": 5, "eval": 2}  # in units of N = bytes of x


def variant_options(variant, batch):
  """normjax's options for a benchmark variant."""
  return {
    "default": {},
    "ghost": {"ghost_batch_size": max(2, batch // 2)},
    "renorm": {"renorm": True},
    "sync": {"axis_name": AXIS},
    "masked": {},
  }[variant]


def autodiff_apply(options, params, state, x, mask=None):
  """`apply(..., training=True)` differentiated by plain autodiff through `moments` (the previous
  path): the core's own training step with `closed_form=False`."""
  config = batch_norm_lib.BatchNormConfig(**options)
  y, new_state, _ = batch_norm_lib.apply_with_batch_moments(
    config, params, state, x, training=True, mask=mask, closed_form=False
  )
  return y, new_state


def _mode_fns(apply, evaluate):
  """(fwd, fwd+bwd, eval) functions of (params, state, x, dy, mask) from a training `apply(params,
  state, x, mask) -> (y, new_state)` and `evaluate(params, state, x) -> y`."""

  def fwd(params, state, x, dy, mask):
    del dy
    return apply(params, state, x, mask)

  def fwd_bwd(params, state, x, dy, mask):
    y, vjp, new_state = jax.vjp(lambda p, x: apply(p, state, x, mask), params, x, has_aux=True)
    dparams, dx = vjp(dy)
    return y, new_state, dx, dparams["scale"], dparams["bias"]

  def eval_(params, state, x, dy, mask):
    del dy, mask
    return evaluate(params, state, x)

  return {"fwd": fwd, "fwd+bwd": fwd_bwd, "eval": eval_}


def normjax_fns(variant, batch, x, closed_form=True, xla_program=False):
  """Mode functions and (params, state) for normjax; the state has seen one training step.
  `xla_program`: traced with the CPU kernel switched off (`cpu_kernel.switched(False)`)."""
  options = variant_options(variant, batch)
  bn = normjax.batch_norm(**options)
  params, state = bn.init(x)
  warm = normjax.batch_norm(**{k: v for k, v in options.items() if k != "axis_name"})
  state = jax.jit(lambda p, s, x: warm.apply(p, s, x, training=True)[1])(params, state, x * 0.9)
  if closed_form:
    apply = lambda p, state, x, mask: bn.apply(p, state, x, training=True, mask=mask)
  else:
    apply = functools.partial(autodiff_apply, options)
  evaluate = lambda p, state, x: bn.apply(p, state, x, training=False)[0]
  if xla_program:
    apply = _without_cpu_kernel(apply)
  return _mode_fns(apply, evaluate), params, state


def _without_cpu_kernel(fn):
  def traced(*args):
    with cpu_kernel.switched(False):
      return fn(*args)

  return traced


def flax_fns(variant, x, fast_variance):
  """Mode functions and (params, batch_stats) for flax.linen.BatchNorm."""
  layer = nn.BatchNorm(
    momentum=0.99,
    epsilon=1e-5,
    use_fast_variance=fast_variance,
    axis_name=AXIS if variant == "sync" else None,
    dtype=x.dtype,
  )  # same output dtype as normjax (flax would promote bf16 to f32)
  variables = layer.init(jax.random.key(0), x, use_running_average=True)
  params, state = variables["params"], variables["batch_stats"]

  def apply(p, state, x, mask):
    return layer.apply(
      {"params": p, "batch_stats": state},
      x,
      use_running_average=False,
      mask=mask,
      mutable=["batch_stats"],
    )

  def evaluate(p, state, x):
    return layer.apply({"params": p, "batch_stats": state}, x, use_running_average=True)

  return _mode_fns(apply, evaluate), params, state


def compile_mode(fn, variant, masked, mode):
  """jit, under a 1-device shard_map for `sync`; the mask argument is None unless masked."""
  if variant == "sync" and mode != "eval":
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


def _builders(variant, batch):
  return {
    "normjax": lambda x: normjax_fns(variant, batch, x),
    "normjax_autodiff": lambda x: normjax_fns(variant, batch, x, closed_form=False),
    "normjax_xla": lambda x: normjax_fns(variant, batch, x, xla_program=True),
    "flax": lambda x: flax_fns(variant, x, True),
    "flax_two_pass": lambda x: flax_fns(variant, x, False),
  }


def time_row(full, dtype, variant, mode, xs, dy, mask, impls, repeats, flush=True):
  """One row: every implementation of (shape, dtype, variant, mode), timed with `time_paired`."""
  nbytes = int(np.prod(full)) * dtype.itemsize
  m = mask if variant == "masked" else None
  fns = {}
  for impl in impls:
    mode_fns, params, state = _builders(variant, full[0])[impl](xs[0])
    compiled = compile_mode(mode_fns[mode], variant, m is not None, mode)
    fns[impl] = functools.partial(compiled, params, state)
  baseline_name = "flax" if "flax" in fns else impls[0]
  timed = _common.time_paired(
    fns, [(x, dy, m) for x in xs], repeats, baseline=baseline_name, flush=flush
  )
  row = {"shape": "x".join(map(str, full)), "batch": full[0], "dtype": dtype.name}
  row.update({"variant": variant, "mode": mode, "MB": nbytes / 1e6})
  baseline = timed["flax"] if "flax" in timed else None
  for impl in impls:
    t = timed[impl]
    row[f"{impl}_ms"], row[f"{impl}_min_ms"] = t["median_s"] * 1e3, t["min_s"] * 1e3
    row[f"{impl}_GBps"] = FLOOR[mode] * nbytes / t["median_s"] / 1e9
    row[f"{impl}_faults"] = t["faults"]  # median minor page faults per timed call
    if baseline is not None:
      row[f"{impl}_vs_flax"] = t["ratio"]
  if baseline is not None and "normjax" in timed:
    row["ratio"] = row["normjax_vs_flax"]
    row["ratio_lo"], row["ratio_hi"] = timed["normjax"]["ratio_lo"], timed["normjax"]["ratio_hi"]
    row["verdict"] = verdict(row["ratio_lo"], row["ratio_hi"])
    row["ratio_min"] = timed["normjax"]["min_s"] / baseline["min_s"]
  return row


def verdict(lo, hi) -> str:
  """The row's verdict from normjax / flax's 95 % interval: "slower" / "faster" when it lies wholly
  above / below 1, else "tie" (no difference this measurement can resolve)."""
  return "slower" if lo > 1.0 else "faster" if hi < 1.0 else "tie"


def shapes_for(grid, batch):
  """Full NHWC shapes of a grid."""
  resnet = [(batch,) + s for s in RESNET50_SHAPES]
  return {"resnet50": resnet, "sweep": list(SWEEP), "all": resnet + list(SWEEP)}[grid]


def run(shapes, dtypes, variants, modes, repeats, input_sets, impls, flush=True):
  rows = []
  key = jax.random.key(42)
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for full in shapes:
      key, kx, kd, km = jax.random.split(key, 4)
      xs = _common.random_inputs(kx, full, dtype, input_sets)
      xs = [x * 2.0 + 0.5 for x in xs]  # nonzero mean and unit-ish spread, as real activations
      dy = jax.random.normal(kd, full, jnp.float32).astype(dtype)
      mask = jax.random.bernoulli(km, 0.9, full[:-1] + (1,))
      for variant in variants:
        for mode in modes:
          if mode == "eval" and variant != "default":
            continue
          row = time_row(full, dtype, variant, mode, xs, dy, mask, impls, repeats, flush)
          rows.append(row)
          print(tables.row_line(row), flush=True)
  return rows


def main():
  p = _common.parser("op_batch_norm", __doc__.splitlines()[0])
  p.add_argument("--grid", default="all", choices=("resnet50", "sweep", "all"))
  p.add_argument("--batch", type=int, default=8, help="batch size of the resnet50 grid")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--shapes", default=None, help="e.g. 8x56x56x64,256x7x7x256 (overrides --grid)")
  p.add_argument(
    "--impls",
    default="normjax,normjax_xla,flax_two_pass,flax",
    help="normjax_xla: normjax traced with the CPU kernel switched off (the XLA program a host "
    "without a C++ compiler runs); normjax_autodiff: normjax differentiated by plain autodiff "
    "through the statistics (closed_form=False, the previous code path); ratios are to flax",
  )
  p.add_argument(
    "--warm-caches", action="store_true", help="do not flush the caches before each timed call"
  )
  args = _common.parse_args(p)
  shapes = (
    shapes_for(args.grid, args.batch) if args.shapes is None else _common.parse_shapes(args.shapes)
  )
  repeats = args.repeats or 15
  dtypes, variants = args.dtypes.split(","), args.variants.split(",")
  modes, impls = args.modes.split(","), args.impls.split(",")
  if args.quick:
    shapes, repeats, dtypes = [(4, 7, 7, 64)], args.repeats or 2, ["float32"]
  flush = not args.warm_caches
  rows = run(shapes, dtypes, variants, modes, repeats, args.input_sets, impls, flush)
  print()
  tables.print_op_table(rows)
  _common.write_json(
    args.out,
    {
      "benchmark": "op_batch_norm",
      "repeats": repeats,
      "input_sets": args.input_sets,
      "cold_caches": flush,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
