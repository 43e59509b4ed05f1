"""Study 4: BatchNorm permits higher learning rates and reaches a target accuracy in fewer steps.

Ioffe & Szegedy 2015 (arXiv:1502.03167, §3.3, §4.2): with BN, training tolerates much larger learning
rates and reaches the baseline's accuracy in a fraction of the steps. We sweep the SGD learning rate
(momentum 0.9, constant) with and without BN and count the steps until the test accuracy first reaches
the target. A run whose loss becomes NaN/Inf is recorded as diverged.
"""

import numpy as np

from experiments.configs import cifar10_cnn
from experiments.configs import default
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 4: learning-rate sweep with and without BatchNorm (steps to a target accuracy)"
CLAIM = "BN permits higher learning rates and converges in fewer steps (Ioffe & Szegedy 2015, arXiv:1502.03167)."
REDUCED = (
  "CPU scale: the seeds' MNIST CNN on scikit-learn's 8x8 digits (1,437 train / 360 test images) "
  "instead of the CIFAR-10 CNN; 300 steps of batch 32; target 95% test accuracy."
)
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)
TARGET = {"cpu": 0.95, "smoke": 0.0, "full": 0.70}


def runs(scale: str):
  common.check_scale(scale)
  if scale == "full":
    c = cifar10_cnn.get_config()
    c.num_epochs, c.eval_every = 20, 195
  else:
    c = default.get_config()
    c.dataset, c.batch_size, c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = (
      "digits",
      32,
      300,
      10,
      10,
      0,
    )
  c.optimizer, c.momentum, c.schedule, c.weight_decay = "sgd", 0.9, "constant", 0.0
  if scale == "smoke":
    c = common.smoke(c)
  out = {}
  for lr in LEARNING_RATES:
    for norm in ("batch_norm", "none"):
      out[f"lr_sweep_{c.dataset}_{norm}_lr{lr:g}"] = common.with_overrides(
        c, norm=norm, learning_rate=lr
      )
  return out


def steps_to_target(result, target: float) -> float:
  """The first evaluated step at which the test accuracy reached `target` (inf if never)."""
  steps, acc = common.curves([result], "eval", "eval_accuracy")
  hit = np.nonzero(acc[0] >= target)[0] if len(steps) else []
  return float(steps[hit[0]]) if len(hit) else np.inf


def _run(study, norm, lr):
  return next(r for r in study.runs if r.endswith(f"_{norm}_lr{lr:g}"))


def summarize(study, results):
  target = TARGET[study.scale]
  lines = [
    f"Steps to {target:.0%} test accuracy (median over seeds; 'never' if not reached in the run, "
    "'diverged' if the loss became non-finite) and final test accuracy (%, mean ± std).",
    "",
    "| learning rate | BN: steps to target | BN: final accuracy | no norm: steps to target | "
    "no norm: final accuracy |",
    "|---|---|---|---|---|",
  ]
  for lr in LEARNING_RATES:
    cells = []
    for norm in ("batch_norm", "none"):
      rs = results[_run(study, norm, lr)]
      diverged = [r for r in rs if r.final.get("diverged")]
      if diverged:
        rest = [r for r in rs if not r.final.get("diverged")]
        cells += [
          f"diverged ({len(diverged)}/{len(rs)} seeds)",
          "; ".join(f"{100 * r.final['eval_accuracy']:.1f} (seed {r.seed})" for r in rest) or "—",
        ]
        continue
      steps = np.median([steps_to_target(r, target) for r in rs])
      cells += [
        "never" if np.isinf(steps) else f"{steps:.0f}",
        common.mean_std(common.metric(rs, "eval_accuracy")),
      ]
    lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(study, results, out_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  target = TARGET[study.scale]
  lines = {}
  for norm, label in (("batch_norm", "BN"), ("none", "no normalization")):
    lines[label] = [
      [r for r in results[_run(study, norm, lr)] if not r.final.get("diverged")] or None
      for lr in LEARNING_RATES
    ]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  plots.against(
    axes[0],
    LEARNING_RATES,
    lines,
    lambda rs: common.metric(rs, "eval_accuracy") * 100,
    xlabel="SGD learning rate (momentum 0.9)",
    ylabel="final test accuracy (%)",
    base=10,
  )
  plots.against(
    axes[1],
    LEARNING_RATES,
    lines,
    lambda rs: [steps_to_target(r, target) for r in rs],
    xlabel="SGD learning rate (momentum 0.9)",
    ylabel=f"steps to {target:.0%} test accuracy",
    base=10,
  )
  plots.finish(
    fig,
    axes,
    out_path,
    study.title + "\n(diverged seeds left out; missing points: all diverged "
    "or target never reached)",
  )


def get_study(scale: str) -> common.Study:
  return common.Study(
    "learning_rate",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
