"""Runs several variants of one config and compares them: a table (accuracy, loss, time) and a plot."""

import copy
import os
import platform
from typing import Dict, Mapping

import jax
import ml_collections

from experiments import metrics
from experiments import train


def variant_configs(config: ml_collections.ConfigDict) -> Dict[str, ml_collections.ConfigDict]:
  """name → `config` with the overrides of `config.compare[name]` applied (and `compare` removed)."""
  base = copy.deepcopy(config)
  with base.unlocked():
    del base["compare"]
  out = {}
  for name, overrides in config.compare.items():
    c = copy.deepcopy(base)
    c.update_from_flattened_dict(overrides.to_dict())
    c.name = f"{config.name}/{name}"
    out[name] = c
  return out


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """A Markdown table of the final metrics of each run."""
  recal = any("eval_accuracy_recalibrated" in r for r in results.values())
  lines = [
    "| run | test accuracy | test loss | "
    + ("test accuracy (precise BN) | " if recal else "")
    + "train accuracy | train loss | steps | time (s) |",
    "|---|---|---|---|---|---|---|" + ("---|" if recal else ""),
  ]
  for name, r in results.items():
    extra = f"{r.get('eval_accuracy_recalibrated', float('nan')):.4f} | " if recal else ""
    lines.append(
      f"| {name} | {r['eval_accuracy']:.4f} | {r['eval_loss']:.4f} | {extra}{r['train_accuracy']:.4f} | "
      f"{r['train_loss']:.4f} | {r['steps']} | {r['time_s']:.1f} |"
    )
  return "\n".join(lines)


def machine_description() -> str:
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "?"
  return (
    f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.process_count()} process(es) x "
    f"{jax.local_device_count()} {jax.default_backend()} device(s) ({kind})"
  )


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Dict[str, float]]:
  """Trains each variant into `workdir/<name>`, prints the table, writes `table.md` and `comparison.png`."""
  results = {}
  for name, c in variant_configs(config).items():
    results[name] = train.train_and_evaluate(c, os.path.join(workdir, name))
  table = format_table(results)
  if jax.process_index() == 0:
    header = (
      f"{config.name} on {config.dataset} (seed {config.seed}); machine: {machine_description()}"
    )
    with open(os.path.join(workdir, "table.md"), "w") as f:
      f.write(header + "\n\n" + table + "\n")
    plot = metrics.plot_runs(
      {n: os.path.join(workdir, n) for n in results},
      os.path.join(workdir, "comparison.png"),
      title=f"{config.model} on {config.dataset}",
    )
    print(header)
    print(table)
    print(f"plot: {plot}")
  return results
