"""Metric logging (CSV and TensorBoard event files) and PNG plots of training and evaluation curves."""

import csv
import os
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top


class MetricWriter:
  """Appends rows to `{workdir}/{name}.csv` and scalars to TensorBoard events in `{workdir}/tensorboard`.

  On resume (`start_step > 0`) rows logged after the restored checkpoint are dropped first, so the CSV of
  a killed-and-resumed run equals that of an uninterrupted one.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    for name in sorted(f[:-4] for f in os.listdir(workdir) if f.endswith(".csv")):
      path = self.path(name)
      if os.path.getsize(path):
        rows = [r for r in read_csv(path) if int(r["step"]) <= start_step]
        _write_rows(path, rows)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    self._tb = SummaryWriter(
      os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None
    )

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, f"{name}.csv")

  def write(self, name: str, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one row `{"step": step, **scalars}` to `{name}.csv` and to TensorBoard as `{name}/{key}`."""
    if not self.enabled:
      return
    path = self.path(name)
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(row))
      if new:
        w.writeheader()
      w.writerow(row)
    for k, v in scalars.items():
      self._tb.add_scalar(f"{name}/{k}", float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_csv(path: str) -> List[Dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _write_rows(path: str, rows: Sequence[Dict[str, str]]) -> None:
  with open(path, "w", newline="") as f:
    if rows:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)


def _column(rows, key):
  return [float(r["step"]) for r in rows], [float(r[key]) for r in rows]


def plot_runs(runs: Mapping[str, str], out_path: str, title: Optional[str] = None) -> str:
  """Plots train/eval loss and accuracy against the step for each run's work directory; returns `out_path`.

  Args:
    runs: label → work directory holding `train.csv` and `eval.csv`.
    out_path: the PNG file to write.
    title: an optional figure title.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (label, workdir) in enumerate(runs.items()):
    color = f"C{i}"
    for name, style in (("train", "-"), ("eval", "o--")):
      path = os.path.join(workdir, f"{name}.csv")
      if not os.path.exists(path):
        continue
      rows = read_csv(path)
      if not rows:
        continue
      prefix = "" if name == "train" else "eval_"
      for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(
          *_column(rows, prefix + key), style, color=color, label=f"{label} ({name})", markersize=3
        )
  for ax, key in zip(axes, ("loss", "accuracy")):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path
