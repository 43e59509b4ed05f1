"""Tables from the benchmark JSON: progress lines, text tables, and the Markdown that BENCHMARKS.md holds.

BENCHMARKS.md keeps its prose by hand and its tables between markers,

  <!-- table: op_batch_norm_summary -->
  ...generated...
  <!-- end table -->

`python -m benchmarks.tables` rewrites every marked table from `benchmarks/results/*.json` (no number
in a table is typed by hand); `--check` fails when BENCHMARKS.md differs from what the JSON gives.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(__file__)), "BENCHMARKS.md")
_MARKER = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- end table -->)", re.S)


def row_line(row) -> str:
  """One benchmark row as `key=value` pairs (the progress line the scripts print)."""
  return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _fmt(value, spec):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return spec.format(value)


def markdown(rows, columns) -> str:
  """A Markdown table; `columns` is a list of (key, header, format)."""
  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |"]
  lines.append("|" + "---|" * len(columns))
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |")
  return "\n".join(lines)


def text(rows, columns) -> str:
  """An aligned text table."""
  cells = [[h for _, h, _ in columns]]
  cells += [[_fmt(r.get(k), f) for k, _, f in columns] for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
  out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


OP_COLUMNS = [
  ("shape", "shape", "{}"),
  ("dtype", "dtype", "{}"),
  ("variant", "variant", "{}"),
  ("mode", "mode", "{}"),
  ("normjax_ms", "normjax ms", "{:.3f}"),
  ("flax_ms", "flax ms", "{:.3f}"),
  ("flax_two_pass_ms", "flax 2-pass ms", "{:.3f}"),
  ("ratio", "normjax / flax", "{:.3f}"),
  ("ratio_interval", "95 % interval", "{}"),
  ("flax_two_pass_vs_flax", "flax 2-pass / flax", "{:.3f}"),
  ("normjax_GBps", "normjax GB/s (floor)", "{:.1f}"),
  ("normjax_faults", "normjax page faults / call", "{:.0f}"),
  ("flax_faults", "flax page faults / call", "{:.0f}"),
]


def with_interval(rows):
  """Rows with `ratio_interval` ("lo-hi" of normjax / flax's 95 % interval) where the JSON has one."""
  out = []
  for r in rows:
    r = dict(r)
    if r.get("ratio_lo") is not None:
      r["ratio_interval"] = f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}"
    out.append(r)
  return out


def print_op_table(rows) -> None:
  print(text(with_interval(rows), OP_COLUMNS))


def _geo(values):
  values = [v for v in values if v is not None and v > 0]
  return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def _count_verdict(rows, verdict):
  """How many rows have `verdict`; None for results measured before rows had one."""
  if not any("verdict" in r for r in rows):
    return None
  return sum(r.get("verdict") == verdict for r in rows)


def op_summary(rows):
  """Per (mode, dtype, variant): rows, geometric mean, max and count of rows above 1 of the ratio,
  and the rows whose 95 % interval lies wholly above 1 (`slower`) or below 1 (`faster`)."""
  out = []
  keys = sorted({(r["mode"], r["dtype"], r["variant"]) for r in rows if "ratio" in r})
  for mode, dtype, variant in keys:
    group = [r for r in rows if (r["mode"], r["dtype"], r["variant"]) == (mode, dtype, variant)]
    ratios = [r["ratio"] for r in group]
    out.append(
      {
        "mode": mode,
        "dtype": dtype,
        "variant": variant,
        "rows": len(ratios),
        "geo": _geo(ratios),
        "max": max(ratios),
        "above_1": sum(r > 1.0 for r in ratios),
        "slower": _count_verdict(group, "slower"),
        "faster": _count_verdict(group, "faster"),
      }
    )
    if all("normjax_xla_vs_flax" in r for r in group):  # the CPU kernel switched off
      out[-1]["xla_geo"] = _geo([r["normjax_xla_vs_flax"] for r in group])
    for impl in ("normjax", "flax"):  # page faults per call, where the run counted them
      counts = [r.get(f"{impl}_faults") for r in group]
      if None not in counts:
        out[-1][f"{impl}_faults"] = statistics.median(counts)
  return out


FAULT_COLUMNS = [
  ("normjax_faults", "page faults / call, normjax (median row)", "{:.0f}"),
  ("flax_faults", "flax", "{:.0f}"),
]


SUMMARY_COLUMNS = [
  ("mode", "mode", "{}"),
  ("dtype", "dtype", "{}"),
  ("variant", "variant", "{}"),
  ("rows", "rows", "{}"),
  ("geo", "normjax / flax (geo mean)", "{:.3f}"),
  ("max", "worst row", "{:.3f}"),
  ("above_1", "rows > 1.00", "{}"),
  ("slower", "slower (95 %)", "{}"),
  ("faster", "faster (95 %)", "{}"),
]


def _load(name):
  path = os.path.join(RESULTS, f"{name}.json")
  with open(path) as f:
    return json.load(f)


ALLOCATOR_NOTES = {  # `benchmarks/_common.py`'s `--allocator` modes
  "keep": "Host memory kept in the process (`--allocator keep`: freed blocks are reused, not mapped again)",
  "fault": "Every host block mapped afresh (`--allocator fault`: each call page-faults its outputs)",
  "glibc": "glibc's adaptive host memory (`--allocator glibc`)",
}


def _machine_line(payload) -> str:
  m = payload.get("machine", {})
  parts = [m.get("cpu_model") or m.get("gpu") or m.get("backend", "?")]
  parts += [f"{m.get('cpu_count')} CPUs" if m.get("cpu_count") else None]
  parts += [f"jax {m.get('jax')}", f"flax {m.get('flax')}" if m.get("flax") else None]
  line = "Measured on: " + ", ".join(p for p in parts if p) + "."
  allocator = ALLOCATOR_NOTES.get(m.get("allocator"))  # absent before `--allocator` existed
  return f"{line} {allocator}." if allocator else line


def measured_rows(name: str, columns, note: str = "") -> str:
  """The rows of `benchmarks/results/{name}.json` under a "Measured on" line (and `note`)."""
  payload = _load(name)
  head = " ".join(p for p in (_machine_line(payload), note) if p)
  return f"{head}\n\n" + markdown(payload["rows"], columns)


def render(name: str) -> str:
  """The Markdown of table `name` (see `TABLES`)."""
  return TABLES[name]()


def _op_summary_table():
  payload = _load("op_batch_norm")
  summary = op_summary(payload["rows"])
  columns = SUMMARY_COLUMNS
  if all("xla_geo" in r for r in summary):
    columns = columns + [("xla_geo", "XLA program / flax (geo mean)", "{:.3f}")]
  if all("flax_faults" in r for r in summary):
    columns = columns + FAULT_COLUMNS
  return _machine_line(payload) + "\n\n" + markdown(summary, columns)


def _op_rows_table():
  payload = _load("op_batch_norm")
  rows = [r for r in payload["rows"] if r["variant"] == "default"]
  return markdown(with_interval(rows), OP_COLUMNS)


def _op_worst_table():
  payload = _load("op_batch_norm")
  rows = sorted((r for r in payload["rows"] if "ratio" in r), key=lambda r: -r["ratio"])[:12]
  return markdown(with_interval(rows), OP_COLUMNS)


TABLES = {
  "op_batch_norm_summary": _op_summary_table,
  "op_batch_norm_default": _op_rows_table,
  "op_batch_norm_worst": _op_worst_table,
}


def register(name: str):
  """Decorator: adds a table renderer (other modules register theirs on import)."""

  def wrap(fn):
    TABLES[name] = fn
    return fn

  return wrap


def rewrite(text_md: str, available=None) -> str:
  """`text_md` with every marked table whose JSON exists regenerated."""

  def replace(match):
    name = match.group(2)
    if name not in TABLES:
      raise KeyError(f"BENCHMARKS.md names table {name!r}; known: {sorted(TABLES)}")
    try:
      body = render(name)
    except FileNotFoundError:
      return match.group(0)  # no results for it here: keep what is there
    return f"{match.group(1)}{body}\n{match.group(4)}"

  return _MARKER.sub(replace, text_md)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true", help="fail if BENCHMARKS.md is not up to date")
  p.add_argument("--path", default=BENCHMARKS_MD)
  args = p.parse_args(argv)
  _import_registrants()
  with open(args.path) as f:
    old = f.read()
  new = rewrite(old)
  if args.check:
    if new != old:
      print(
        f"{args.path} is not what benchmarks/results/*.json give; run python -m benchmarks.tables"
      )
      sys.exit(1)
    return
  with open(args.path, "w") as f:
    f.write(new)
  print(f"wrote {args.path}")


def _import_registrants():
  """Modules that register tables (imported lazily: they import jax and flax)."""
  import importlib  # pylint: disable=g-import-not-at-top

  for module in (
    "benchmarks._cpu_tables",
    "benchmarks.cpu_kernels",
    "benchmarks.cpu_reductions",
    "benchmarks.dispatch",
    "benchmarks.eval_floor",
    "benchmarks.gpu_suite",
    "benchmarks.tpu_compile",
  ):
    try:
      importlib.import_module(module)
    except ImportError:
      pass


if __name__ == "__main__":
  # Run as a script this file is `__main__`, a second copy beside the `benchmarks.tables` that the
  # registering modules import; run the imported copy, whose TABLES they extend.
  from benchmarks import tables as _imported  # pylint: disable=g-import-not-at-top

  _imported.main()
