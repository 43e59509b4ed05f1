r"""Runs a study of experiments/studies (its runs × seeds), then writes its table, plot and summary.

  python -m experiments.run_study --study bn_cifar_cnn                 # the reduced CPU scale of RESULTS.md
  python -m experiments.run_study --study small_batch --scale full     # the paper's setting, for a GPU
  python -m experiments.run_study --study all --shard 0/2 --nosummary  # two workers share the runs
  python -m experiments.run_study --study all                          # then summarize every study

Runs live in `<workdir>/runs/<run>/seed_<k>` and are skipped when their `final_metrics.json` exists (an
interrupted run resumes from its checkpoint). Each study writes `<workdir>/<study>/table.md`, `plot.png` and
`summary.json` (its config, seeds, machine and per-run final metrics).
"""

import os
from typing import Dict, List, Tuple

from absl import app
from absl import flags
from absl import logging

_STUDY = flags.DEFINE_string(
  "study", None, "A study name (see experiments/studies/__init__.py) or 'all'."
)
_SCALE = flags.DEFINE_enum(
  "scale", "cpu", ["cpu", "full", "smoke"], "Which scale of the study to run."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/studies", "Where runs, tables and plots go.")
_SHARD = flags.DEFINE_string(
  "shard", "0/1", "i/n: run only every n-th pending run, starting at the i-th."
)
_SUMMARY = flags.DEFINE_bool(
  "summary", True, "Write the tables and plots (needs every run finished)."
)


def parse_shard(value: str) -> Tuple[int, int]:
  """`"i/n"` → `(i, n)` with `0 <= i < n`; raises `app.UsageError` naming the value otherwise."""
  parts = value.split("/")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise app.UsageError(f"--shard={value!r}: expected i/n, e.g. 0/2 and 1/2 for two workers")
  index, count = int(parts[0]), int(parts[1])
  if not 0 <= index < count:
    raise app.UsageError(
      f"--shard={value!r}: expected 0 <= i < n (shards are numbered from 0: "
      f"{', '.join(f'{k}/{count}' for k in range(count)) or 'none for n=0'})"
    )
  return index, count


def run_all(study, workdir: str, shard=(0, 1)):
  """Trains every (run, seed) of `study` not finished yet (this shard's share); returns run → results."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.studies import common  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  jobs = [(run, seed) for run in study.runs for seed in study.seeds]
  results: Dict[str, List] = {run: [] for run in study.runs}
  for i, (run, seed) in enumerate(jobs):
    rundir = os.path.join(workdir, "runs", run, f"seed_{seed}")
    final = os.path.join(rundir, "final_metrics.json")
    if not os.path.exists(final) and i % shard[1] == shard[0]:
      config = common.with_overrides(study.runs[run], seed=seed, name=f"{run}/seed_{seed}")
      print(f"[{study.name}] {run} seed {seed}", flush=True)
      try:
        train.train_and_evaluate(config, rundir)
      except FloatingPointError as e:  # a diverged run is a result (e.g. too high a learning rate)
        print(f"[{study.name}] {run} seed {seed} diverged: {e}", flush=True)
        common.save_json(
          final,
          {
            "diverged": 1,
            "error": str(e),
            "eval_accuracy": float("nan"),
            "eval_loss": float("nan"),
            "train_loss": float("nan"),
            "time_s": float("nan"),
          },
        )
    if os.path.exists(final):
      with open(final) as f:
        results[run].append(common.RunResult(run, seed, rundir, json.load(f)))
  return results


def summarize(study, results, workdir: str) -> str:
  """Writes table.md, plot.png and summary.json into `<workdir>/<study.name>`; returns the table."""
  from experiments import compare  # pylint: disable=g-import-not-at-top
  from experiments.studies import common  # pylint: disable=g-import-not-at-top

  out = os.path.join(workdir, study.name)
  os.makedirs(out, exist_ok=True)
  table = study.summarize(study, results)
  machine = compare.machine_description()
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(f"{study.title}\n\nMachine: {machine}. Seeds: {list(study.seeds)}.\n\n{table}\n")
  study.plot(study, results, os.path.join(out, "plot.png"))
  common.save_json(
    os.path.join(out, "summary.json"),
    {
      "study": study.name,
      "title": study.title,
      "claim": study.claim,
      "reduced": study.reduced,
      "machine": machine,
      "seeds": list(study.seeds),
      "configs": {run: c.to_dict() for run, c in study.runs.items()},
      "final": {run: {str(r.seed): r.final for r in rs} for run, rs in results.items()},
    },
  )
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from experiments import studies  # pylint: disable=g-import-not-at-top

  names = list(studies.STUDIES) if _STUDY.value == "all" else [_STUDY.value]
  shard = parse_shard(_SHARD.value)
  for name in names:
    study = studies.get_study(name, _SCALE.value)
    results = run_all(study, _WORKDIR.value, shard)
    if _SUMMARY.value:
      print(f"\n## {study.title}\n\n{summarize(study, results, _WORKDIR.value)}\n", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("study")
  app.run(main)
