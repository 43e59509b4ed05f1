"""Study 6: ghost BatchNorm for large-batch training (Hoffer et al. 2017, arXiv:1705.08741).

With the number of epochs fixed, a large batch generalizes worse than a small one; Hoffer et al. narrow
the gap with ghost batch normalization (statistics over ghost batches of 128 inside the large batch) and
a learning rate scaled by sqrt(large / small). Three arms, the same number of training examples seen:
small batch with BN; large batch with full-batch BN; large batch with ghost BN.
"""

import math

from experiments.configs import cifar10_cnn
from experiments.configs import default
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 6: ghost BatchNorm for a large batch (same number of examples seen)"
CLAIM = (
  "Large-batch training generalizes worse; ghost BN (statistics over small ghost batches) with a "
  "sqrt-scaled learning rate narrows the gap (Hoffer et al. 2017, arXiv:1705.08741)."
)
REDUCED = (
  "CPU scale: the seeds' MNIST CNN on scikit-learn's 8x8 digits instead of CIFAR-10; small batch "
  "32, large batch 512, ghost batch 32 (so the ratio large/ghost is 16 as for 2048/128); "
  "86,400 training examples seen (60 epochs of 1,437 images) in every arm."
)
SIZES = {
  "cpu": (32, 512, 32),
  "smoke": (16, 32, 2),
  "full": (128, 4096, 128),
}  # small, large, ghost


def runs(scale: str):
  common.check_scale(scale)
  small, large, ghost = SIZES[scale]
  if scale == "full":
    c = cifar10_cnn.get_config()
    examples = 50_000 * 30
  else:
    c = default.get_config()
    c.dataset, c.log_every, c.checkpoint_every, c.eval_every = "digits", 5, 0, 0
    examples = 86_400
  c.optimizer, c.momentum, c.schedule, c.learning_rate = "sgd", 0.9, "cosine", 0.02
  lr_large = c.learning_rate * math.sqrt(large / small)
  out = {
    f"ghost_small_b{small}": common.with_overrides(
      c, batch_size=small, num_steps=examples // small
    ),
    f"ghost_large_b{large}_full_bn": common.with_overrides(
      c, batch_size=large, num_steps=examples // large, learning_rate=lr_large
    ),
    f"ghost_large_b{large}_ghost{ghost}": common.with_overrides(
      c,
      batch_size=large,
      num_steps=examples // large,
      learning_rate=lr_large,
      norm="ghost_batch_norm",
      ghost_batch_size=ghost,
    ),
  }
  if scale == "smoke":
    out = {k: common.smoke(v) for k, v in out.items()}
  return out


def _labels(study):
  small, large, ghost = SIZES[study.scale]
  names = list(study.runs)
  return dict(
    zip(
      names,
      (f"batch {small}, BN", f"batch {large}, full-batch BN", f"batch {large}, ghost BN ({ghost})"),
    )
  )


def summarize(study, results):
  return common.accuracy_table(study, results, _labels(study))


def plot(study, results, out_path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = _labels(study)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (run, label) in enumerate(labels.items()):
    rs = results[run]
    examples = study.runs[run].batch_size
    steps, values = common.curves(rs, "train", "loss")
    if len(steps):
      m, s = values.mean(0), values.std(0)
      axes[0].plot(steps * examples, m, color=f"C{i}", label=label)
      axes[0].fill_between(steps * examples, m - s, m + s, color=f"C{i}", alpha=0.2)
    acc = common.metric(rs, "eval_accuracy") * 100
    axes[1].bar(i, acc.mean(), yerr=acc.std(), capsize=4, color=f"C{i}", label=label)
  axes[0].set(xlabel="training examples seen", ylabel="train loss", yscale="log")
  axes[1].set(ylabel="final test accuracy (%)", xticks=[])
  plots.finish(fig, axes, out_path, study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "ghost_large_batch",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
