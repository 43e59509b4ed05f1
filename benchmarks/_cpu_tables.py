"""BENCHMARKS.md tables of the CPU scripts (numerics, memory, multi_device, model_resnet18, warm op rows).

Registered into `benchmarks.tables` on import; each reads its script's JSON in `benchmarks/results/`.
Only the standard library is imported, so `python -m benchmarks.tables` needs no JAX for these.
"""

from benchmarks import tables


def _rows(name):
  return tables._load(name)["rows"]  # pylint: disable=protected-access


@tables.register("op_batch_norm_warm_summary")
def _op_warm_summary():
  payload = tables._load("op_batch_norm_warm")  # pylint: disable=protected-access
  caches = "flushed" if payload.get("cold_caches", True) else "not flushed"
  rows = tables.op_summary(payload["rows"])
  faults = tables.FAULT_COLUMNS if all("flax_faults" in r for r in rows) else []
  summary = tables.markdown(rows, tables.SUMMARY_COLUMNS + faults)
  head = tables._machine_line(payload)  # pylint: disable=protected-access
  return f"{head} Caches {caches}.\n\n{summary}"


@tables.register("op_batch_norm_fault_summary")
def _op_fault_summary():
  payload = tables._load("op_batch_norm_fault")  # pylint: disable=protected-access
  columns = tables.SUMMARY_COLUMNS + tables.FAULT_COLUMNS
  summary = tables.markdown(tables.op_summary(payload["rows"]), columns)
  return tables._machine_line(payload) + "\n\n" + summary  # pylint: disable=protected-access


def _relative_error(value):
  return "n/a (var 0)" if value is None else f"{value:.2e}"


@tables.register("cpu_numerics")
def _numerics():
  rows = []
  for r in _rows("numerics"):
    row = {"dtype": r["dtype"], "mean": r["mean"], "var": r["true_var"]}
    for key in ("normjax", "normjax_step2", "normjax_batch", "flax", "flax_two_pass"):
      row[key] = _relative_error(r[f"{key}_rel_err"])
    row.update(normjax_y=r["normjax_y_err"], flax_y=r["flax_y_err"])
    rows.append(row)
  columns = [
    ("dtype", "dtype", "{}"),
    ("mean", "mean", "{:g}"),
    ("var", "float64 var", "{:.4f}"),
    ("normjax", "normjax 1st step", "{}"),
    ("normjax_step2", "normjax 2nd step", "{}"),
    ("normjax_batch", 'normjax stats_shift="batch"', "{}"),
    ("flax", "flax (fast)", "{}"),
    ("flax_two_pass", "flax two-pass", "{}"),
    ("normjax_y", "normjax y err", "{:.1e}"),
    ("flax_y", "flax y err", "{:.1e}"),
  ]
  return tables.markdown(rows, columns)


@tables.register("cpu_memory")
def _memory():
  columns = [
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("impl", "impl", "{}"),
    ("x_MB", "x MB", "{:.2f}"),
    ("residual_MB", "kept for the backward MB", "{:.2f}"),
    ("fwd_bwd_temp_MB", "fwd+bwd temp MB", "{:.2f}"),
  ]
  return tables.markdown(_rows("memory"), columns)


@tables.register("cpu_multi_device")
def _multi_device():
  columns = [
    ("shape", "global shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("devices", "devices", "{}"),
    ("normjax_ms", "normjax ms", "{:.2f}"),
    ("normjax_sync_ms", "normjax sync ms", "{:.2f}"),
    ("flax_ms", "flax ms", "{:.2f}"),
    ("flax_sync_ms", "flax sync ms", "{:.2f}"),
    ("ratio_sync", "normjax sync / flax sync", "{:.3f}"),
  ]
  return tables.markdown(_rows("multi_device"), columns)


@tables.register("cpu_resnet18")
def _resnet18():
  columns = [
    ("dtype", "compute dtype", "{}"),
    ("batch", "batch", "{}"),
    ("steps", "timed steps", "{}"),
    ("normjax_ms", "normjax ms/step", "{:.1f}"),
    ("flax_ms", "flax ms/step", "{:.1f}"),
    ("normjax_img_s", "normjax img/s", "{:.1f}"),
    ("flax_img_s", "flax img/s", "{:.1f}"),
    ("ratio", "normjax / flax", "{:.3f}"),
    ("ratio_min", "normjax / flax (min)", "{:.3f}"),
  ]
  return tables.markdown(_rows("model_resnet18"), columns)
