"""Study 7: the train/inference discrepancy of BatchNorm — EMA vs precise statistics (Wu & Johnson 2021).

Wu & Johnson (arXiv:2105.07576) show that the EMA of batch moments lags the current weights, so a model
evaluated with EMA statistics is worse than the same weights evaluated with precise (population)
statistics, most visibly early in training and with large learning rates; "precise BN" recomputes the
statistics with the final weights. Study 1's BN runs evaluate both at every evaluation: EMA running
statistics (momentum 0.9) and statistics recalibrated with `normjax.linen.recalibrate_batch_stats` on
`recalibrate_steps` training batches.
"""

import numpy as np

from experiments.studies import bn_cifar_cnn
from experiments.studies import common

TITLE = (
  "Study 7: EMA vs precise BatchNorm statistics at evaluation, over training (seeds' CIFAR-10 CNN)"
)
CLAIM = (
  "EMA statistics lag the weights; precise (recalibrated) statistics evaluate the same weights better, "
  "especially early in training (Wu & Johnson 2021, arXiv:2105.07576)."
)
RUN = "cifar_cnn_bn"


def runs(scale: str):
  return {RUN: bn_cifar_cnn.base_config(scale)}


def _both(results):
  rs = results[RUN]
  steps_e, ema = common.curves(rs, "eval", "eval_accuracy")
  steps_p, precise = common.curves(rs, "recalibrated", "eval_accuracy")
  common_steps = sorted(set(steps_e) & set(steps_p))
  pick = lambda steps, v: v[:, [list(steps).index(s) for s in common_steps]]  # noqa: E731
  return np.array(common_steps), pick(steps_e, ema) * 100, pick(steps_p, precise) * 100


def summarize(study, results):
  steps, ema, precise = _both(results)
  rows = [
    "Test accuracy (%) with EMA running statistics and with precise (recalibrated) statistics, same "
    "weights; mean ± std over seeds.",
    "",
    "| step | EMA statistics | precise statistics | precise − EMA |",
    "|---|---|---|---|",
  ]
  for i, s in enumerate(steps):
    rows.append(
      f"| {s} | {common.mean_std(ema[:, i], 1)} | {common.mean_std(precise[:, i], 1)} | "
      f"{common.mean_std(precise[:, i] - ema[:, i], 1, 2)} |"
    )
  return "\n".join(rows)


def plot(study, results, out_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from experiments.studies import plots  # pylint: disable=g-import-not-at-top

  steps, ema, precise = _both(results)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (label, v) in enumerate((("EMA statistics", ema), ("precise statistics", precise))):
    axes[0].errorbar(
      steps, v.mean(0), yerr=v.std(0), marker="o", capsize=3, color=f"C{i}", label=label
    )
  d = precise - ema
  axes[1].errorbar(
    steps, d.mean(0), yerr=d.std(0), marker="o", capsize=3, color="C2", label="precise − EMA"
  )
  axes[1].axhline(0, color="k", lw=0.8)
  axes[0].set(xlabel="step", ylabel="test accuracy (%)")
  axes[1].set(xlabel="step", ylabel="accuracy difference (points)")
  axes[0].legend(fontsize=8)
  plots.finish(fig, axes, out_path, study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "precise_bn",
    TITLE,
    CLAIM,
    bn_cifar_cnn.REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
