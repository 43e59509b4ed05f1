"""Study 8: internal covariate shift, measured — how a hidden layer's pre-activations drift in training.

Ioffe & Szegedy (2015, Fig. 1b-c) motivate BN by internal covariate shift: the distribution of a unit's
input to the nonlinearity keeps moving as earlier layers change, and BN holds it steady. Santurkar et al.
(2018, arXiv:1805.11604) argue that BN's benefit is not a reduction of this shift (BN with injected
noise still trains well; in their gradient-based measure BN networks show as much shift or more) but a
smoother loss landscape. Here we measure the Ioffe quantity on study 1's runs (with / without BN): the
input to the second conv layer's ReLU on 256 fixed test images, every 20 steps, in training mode — the
15th / 50th / 85th percentiles of one unit (channel 0), and over all channels the mean |channel mean| and
mean channel std. Santurkar et al.'s gradient-based measure is not computed here.
"""

import numpy as np

from experiments.studies import bn_cifar_cnn
from experiments.studies import common

TITLE = "Study 8: internal covariate shift, measured (inputs to a hidden ReLU, with and without BN)"
CLAIM = (
  "BN reduces internal covariate shift (Ioffe & Szegedy 2015); Santurkar et al. 2018 "
  "(arXiv:1805.11604) argue this is not why BN helps."
)
LAYER = "NormAct_1"
LABELS = {"cifar_cnn_bn": "BN", "cifar_cnn_none": "no normalization"}


def runs(scale: str):
  r = bn_cifar_cnn.runs(scale)
  return {k: r[k] for k in LABELS}


def _series(results, run, stat):
  return common.curves(results[run], "activations", f"{LAYER}/{stat}")


def drift(values: np.ndarray) -> np.ndarray:
  """Per seed: the mean absolute change of a statistic between consecutive probes."""
  return np.abs(np.diff(values, axis=1)).mean(1)


def summarize(study, results):
  rows = [
    f"Input to the ReLU after the 2nd conv ({LAYER}), on 256 fixed test images, probed every "
    f"{study.runs['cifar_cnn_bn'].probe_every} steps; mean ± std over seeds. 'Drift' is the mean absolute "
    "change between consecutive probes; 'relative' divides by the mean channel std at that probe.",
    "",
    "| run | unit 0 median: start → end | unit 0 (p85 − p15): start → end | mean channel std: start → end | "
    "drift of unit-0 median | relative drift of channel means |",
    "|---|---|---|---|---|---|",
  ]
  for run, label in LABELS.items():
    _, p50 = _series(results, run, "unit0_p50")
    _, p15 = _series(results, run, "unit0_p15")
    _, p85 = _series(results, run, "unit0_p85")
    _, means = _series(results, run, "mean_of_channel_means")
    _, stds = _series(results, run, "mean_of_channel_stds")
    if not p50.size:
      continue
    spread = p85 - p15
    rel = np.abs(np.diff(means, axis=1)) / stds[:, 1:]
    rows.append(
      f"| {label} | {common.mean_std(p50[:, 0], 1, 3)} → {common.mean_std(p50[:, -1], 1, 3)} | "
      f"{common.mean_std(spread[:, 0], 1, 3)} → {common.mean_std(spread[:, -1], 1, 3)} | "
      f"{common.mean_std(stds[:, 0], 1, 3)} → {common.mean_std(stds[:, -1], 1, 3)} | "
      f"{common.mean_std(drift(p50), 1, 4)} | {common.mean_std(rel.mean(1), 1, 4)} |"
    )
  return "\n".join(rows)


def plot(study, results, out_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from experiments.studies import plots  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
  for ax, (run, label) in zip(axes, LABELS.items()):
    for j, stat in enumerate(("unit0_p15", "unit0_p50", "unit0_p85")):
      steps, v = _series(results, run, stat)
      if len(steps):
        ax.plot(steps, v[0], color=f"C{j}", label=f"{stat[-3:]} (seed 0)")
        for k in range(1, len(v)):
          ax.plot(steps, v[k], color=f"C{j}", alpha=0.35, lw=0.8)
    ax.set(title=f"{label}: input to a ReLU, unit 0 ({LAYER})", xlabel="step", ylabel="value")
  plots.finish(
    fig, axes, out_path, study.title + "\n(15th / 50th / 85th percentiles; faint: other seeds)"
  )


def get_study(scale: str) -> common.Study:
  return common.Study(
    "covariate_shift",
    TITLE,
    CLAIM,
    bn_cifar_cnn.REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
