"""Plots shared by the studies: curves as mean ± std over seeds, and a final metric against a swept value."""

from typing import Callable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from experiments.studies import common  # noqa: E402


def band(
  ax, results, csv_name: str, key: str, label: str, color: str, scale: float = 1.0, style: str = "-"
):
  """Mean ± std over seeds of column `key` of `<csv_name>.csv` against the step."""
  steps, values = common.curves(results, csv_name, key)
  if not len(steps):
    return
  mean, std = values.mean(0) * scale, values.std(0) * scale
  ax.plot(steps, mean, style, color=color, label=label, markersize=3)
  ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)


def eval_curves(
  results, labels: Mapping[str, str], out_path: str, title: Optional[str] = None
) -> None:
  """Train loss and test accuracy (mean ± std over seeds) of the runs in `labels`."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (run, label) in enumerate(labels.items()):
    band(axes[0], results[run], "train", "loss", label, f"C{i}")
    band(axes[1], results[run], "eval", "eval_accuracy", label, f"C{i}", 100.0, "o-")
  axes[0].set(xlabel="step", ylabel="train loss", yscale="log")
  axes[1].set(xlabel="step", ylabel="test accuracy (%)")
  finish(fig, axes, out_path, title)


def against(
  ax,
  xs: Sequence[float],
  lines: Mapping[str, Sequence],
  value: Callable,
  *,
  xlabel: str,
  ylabel: str,
  logx: bool = True,
  base: int = 2,
) -> None:
  """On `ax`, `value(results)` (an array over seeds; mean ± std drawn) against `xs`, one line per label.

  `lines[label][i]` is the list of RunResults at `xs[i]`, or None where there is no point (e.g. diverged).
  """
  for i, (label, per_x) in enumerate(lines.items()):
    pts = [(x, np.asarray(value(rs), np.float64)) for x, rs in zip(xs, per_x) if rs]
    pts = [(x, v[np.isfinite(v)]) for x, v in pts if np.isfinite(v).any()]
    if pts:
      ax.errorbar(
        [p[0] for p in pts],
        [p[1].mean() for p in pts],
        yerr=[p[1].std() for p in pts],
        marker="o",
        capsize=3,
        color=f"C{i}",
        label=label,
      )
  if logx:
    ax.set_xscale("log", base=base)
  ax.set(xlabel=xlabel, ylabel=ylabel)


def finish(fig, axes, out_path, title):
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
