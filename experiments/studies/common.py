"""What a study is (named runs × seeds, a table, a plot) and the helpers the study files share.

A study is a claim from the literature plus the runs that test it. Each `experiments/studies/<name>.py`
defines `get_study(scale)`, with `scale`:

* `"cpu"`: the reduced runs reported in RESULTS.md (made on a 2-core CPU; each study says what it reduced);
* `"full"`: the setting the paper (or the seeds' recipe) describes, for a GPU;
* `"smoke"`: two steps per run on a few examples, one seed; what the tests run.

Runs are named; two studies that name the same run with the same config share it (run once, in
`<workdir>/runs/<run name>/seed_<k>`), so e.g. the EMA-vs-precise study reads the curves of study 1's runs.
"""

import copy
import dataclasses
import json
import os
from typing import Callable, Dict, List, Mapping, Sequence

import ml_collections
import numpy as np

SCALES = ("cpu", "full", "smoke")
SEEDS = (0, 1, 2)


@dataclasses.dataclass
class Study:
  """A claim and the runs that test it.

  Attributes:
    name: the study's file name, e.g. "small_batch".
    title: one line for RESULTS.md.
    claim: what the literature says, with the reference.
    reduced: what the "cpu" scale changed from the "full" one ("" for the full scale).
    runs: run name → config (its `seed` is set per run by the runner).
    summarize: `(study, results) -> (markdown table, {key: value})`; `results` maps run name → list of
      `RunResult`, one per seed.
    plot: `(study, results, out_path) -> None`, writes a PNG.
    seeds: the seeds every run is repeated with.
    scale: "cpu", "full" or "smoke".
  """

  name: str
  title: str
  claim: str
  reduced: str
  runs: Dict[str, ml_collections.ConfigDict]
  summarize: Callable[..., str]
  plot: Callable[..., None]
  seeds: Sequence[int] = SEEDS
  scale: str = "cpu"


@dataclasses.dataclass
class RunResult:
  """One finished run: its final metrics (final_metrics.json) and its work directory (for the CSV curves)."""

  run: str
  seed: int
  workdir: str
  final: Dict[str, float]


def check_scale(scale: str) -> None:
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r}: expected one of {SCALES}")


def with_overrides(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A deep copy of `config` with `overrides` (dotted keys as `a__b`) applied."""
  c = copy.deepcopy(config)
  c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return c


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` cut to two steps of at most 16 examples, evaluated on 32 test images: for the tests."""
  c = copy.deepcopy(config)
  c.num_steps = 2
  c.batch_size = min(c.batch_size, 16)
  c.ghost_batch_size = min(c.ghost_batch_size, c.batch_size)
  if c.renorm_ghost_batch_size:
    c.renorm_ghost_batch_size = min(c.renorm_ghost_batch_size, c.batch_size)
  c.eval_batch_size = 16
  c.eval_examples = 32
  c.eval_every = 1 if c.eval_every else 0
  c.log_every = 1
  c.probe_examples = 8
  c.recalibrate_steps = min(c.recalibrate_steps, 1)
  c.checkpoint_every = 0
  c.progress_bar = False
  return c


def metric(results: Sequence[RunResult], key: str) -> np.ndarray:
  return np.array([r.final.get(key, np.nan) for r in results], np.float64)


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
  """ "m ± s" (sample std over seeds) of `values * scale`."""
  v = np.asarray(values, np.float64) * scale
  s = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():.{digits}f} ± {s:.{digits}f}"


def curves(results: Sequence[RunResult], csv_name: str, key: str):
  """(steps, values[seed, step]) of column `key` in each seed's `<csv_name>.csv` (common steps only)."""
  from experiments import metrics  # pylint: disable=g-import-not-at-top

  per_seed = []
  for r in results:
    path = os.path.join(r.workdir, f"{csv_name}.csv")
    rows = metrics.read_csv(path) if os.path.exists(path) else []
    per_seed.append({int(row["step"]): float(row[key]) for row in rows if row.get(key, "") != ""})
  steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
  return np.array(steps), np.array([[d[s] for s in steps] for d in per_seed])


def accuracy_table(
  study: Study, results: Mapping[str, List[RunResult]], labels: Mapping[str, str]
) -> str:
  """Rows of test accuracy (%), test loss and train loss, mean ± std over seeds, for the runs in `labels`."""
  lines = [
    "| run | test accuracy (%) | test loss | final train loss | seeds | time per run (s) |",
    "|---|---|---|---|---|---|",
  ]
  for run, label in labels.items():
    rs = results[run]
    lines.append(
      f"| {label} | {mean_std(metric(rs, 'eval_accuracy'))} | "
      f"{mean_std(metric(rs, 'eval_loss'), 1, 3)} | {mean_std(metric(rs, 'train_loss'), 1, 3)} | "
      f"{len(rs)} | {np.mean(metric(rs, 'time_s')):.0f} |"
    )
  return "\n".join(lines)


def save_json(path: str, value) -> None:
  """Writes atomically (a temporary file, then `os.replace`): a killed run never leaves half a file,
  which `run_study` would take for a finished run."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def seeds_for(scale: str) -> Sequence[int]:
  """Three seeds, or one at the smoke scale."""
  return (0,) if scale == "smoke" else SEEDS
