"""Synchronized vs per-device BatchNorm on 8 (virtual) CPU devices under shard_map, normjax vs flax.

Each device holds `batch` examples of an NHWC activation; forward+backward (y, dx, dscale, dbias, new
statistics) is timed for: normjax unsynchronized (no axis_name), normjax synchronized (axis_name),
flax unsynchronized and flax synchronized (axis_name). On one CPU host the 8 devices share the cores,
so this measures the overhead of the cross-device reductions, not a real interconnect.

Usage:
  python -m benchmarks.multi_device            # 8 CPU devices (set here, before jax is imported)
  python -m benchmarks.multi_device --quick
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

import normjax
from benchmarks import _common

AXIS = "devices"


def _normjax(sync, x):
  bn = normjax.batch_norm(axis_name=AXIS if sync else None)
  params, state = bn.init(x)

  def fwd_bwd(params, state, x, dy):
    y, vjp, new_state = jax.vjp(
      lambda p, x: bn.apply(p, state, x, training=True), params, x, has_aux=True
    )
    dparams, dx = vjp(dy)
    return y, new_state, dx, dparams

  return fwd_bwd, params, state


def _flax(sync, x):
  layer = nn.BatchNorm(use_running_average=False, axis_name=AXIS if sync else None, dtype=x.dtype)
  variables = layer.init(jax.random.key(0), x)

  def fwd_bwd(params, state, x, dy):
    f = lambda p, x: layer.apply({"params": p, "batch_stats": state}, x, mutable=["batch_stats"])
    y, vjp, new_state = jax.vjp(f, params, x, has_aux=True)
    dparams, dx = vjp(dy)
    return y, new_state, dx, dparams

  return fwd_bwd, variables["params"], variables["batch_stats"]


def main():
  p = _common.parser("multi_device", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4, help="examples per device")
  p.add_argument("--shapes", default="28x28x128,14x14x256,7x7x512")
  p.add_argument("--dtypes", default="float32,bfloat16")
  args = _common.parse_args(p)
  shapes = _common.parse_shapes(args.shapes)
  batch, repeats, dtypes = args.batch, args.repeats or 10, args.dtypes.split(",")
  if args.quick:
    shapes, batch, repeats, dtypes = [(7, 7, 32)], 2, 2, ["float32"]
  devices = jax.devices()
  mesh = jax.make_mesh(
    (len(devices),), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
  )
  rows = []
  for dtype_name in dtypes:
    for shape in shapes:
      full = (batch * len(devices),) + shape
      keys = jax.random.split(jax.random.key(0), args.input_sets + 1)
      xs = [(jax.random.normal(k, full) * 2 + 1).astype(dtype_name) for k in keys[1:]]
      dy = jax.random.normal(keys[0], full).astype(dtype_name)
      fns = {}
      for name, builder, sync in (
        ("normjax", _normjax, False),
        ("normjax_sync", _normjax, True),
        ("flax", _flax, False),
        ("flax_sync", _flax, True),
      ):
        fwd_bwd, params, state = builder(sync, xs[0][:batch])

        # Parameter gradients are summed over devices, as a data-parallel trainer does.
        def per_device(params, state, x, dy, fwd_bwd=fwd_bwd):
          y, new_state, dx, dparams = fwd_bwd(params, state, x, dy)
          return y, jax.lax.pmean(new_state, AXIS), dx, jax.lax.psum(dparams, AXIS)

        mapped = jax.jit(
          jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS), P(), P(AXIS), P()),
            check_vma=False,
          )
        )
        fns[name] = (lambda f, p, s: lambda x, dy: f(p, s, x, dy))(mapped, params, state)
      times = _common.time_interleaved(fns, [(x, dy) for x in xs], repeats)
      row = {"shape": "x".join(map(str, full)), "dtype": dtype_name, "devices": len(devices)}
      for name, (median, fastest) in times.items():
        row[f"{name}_ms"], row[f"{name}_min_ms"] = median * 1e3, fastest * 1e3
      row["sync_overhead_normjax"] = row["normjax_sync_ms"] / row["normjax_ms"]
      row["sync_overhead_flax"] = row["flax_sync_ms"] / row["flax_ms"]
      row["ratio_sync"] = row["normjax_sync_ms"] / row["flax_sync_ms"]
      rows.append(row)
      print(row, flush=True)
  print()
  _common.print_table(
    rows,
    [
      ("shape", "global shape", "{}"),
      ("dtype", "dtype", "{}"),
      ("normjax_ms", "nj ms", "{:.2f}"),
      ("normjax_sync_ms", "nj sync ms", "{:.2f}"),
      ("flax_ms", "flax ms", "{:.2f}"),
      ("flax_sync_ms", "flax sync ms", "{:.2f}"),
      ("sync_overhead_normjax", "nj sync/unsync", "{:.3f}"),
      ("sync_overhead_flax", "flax sync/unsync", "{:.3f}"),
      ("ratio_sync", "nj sync/flax sync", "{:.3f}"),
    ],
  )
  _common.write_json(
    args.out,
    {"benchmark": "multi_device", "batch_per_device": batch, "repeats": repeats, "rows": rows},
  )


if __name__ == "__main__":
  main()
