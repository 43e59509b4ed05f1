"""Study 9: the seeds' CIFAR-10 CNN at its full width, with and without BatchNorm.

Study 1 (`bn_cifar_cnn`) narrows the network to a quarter of its width and trains it for 0.77 epoch. This
study runs the seeds' network unchanged — 3 × (Conv 128 → BN → ReLU → MaxPool 2), Dense 1024 → ReLU,
Dense 10; Adam, lr 1e-4, batch 128 — with and without BN, evaluated on the full test set after every
epoch. The "cpu" scale trains the seeds' 10 epochs with one seed per arm (two hours of the 2-core CPU:
one single-threaded worker per arm at about 1.5 s a step); "full" adds the other two seeds.
"""

from experiments.studies import bn_cifar_cnn
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 9: the seeds' CIFAR-10 CNN at full width (Conv 128, Dense 1024), with and without BN"
CLAIM = bn_cifar_cnn.CLAIM
REDUCED = "CPU scale: one seed per arm instead of three; otherwise the seeds' recipe (10 epochs)."
LABELS = {"cifar_cnn_full_bn": "BN (before ReLU)", "cifar_cnn_full_none": "no normalization"}
STEPS_PER_EPOCH = 390  # 50,000 // 128


def runs(scale: str):
  c = bn_cifar_cnn.base_config("full")
  c.recalibrate_steps, c.recalibrate_at_every_eval, c.track_activations = 0, False, False
  c.eval_every, c.checkpoint_every, c.log_every = STEPS_PER_EPOCH, STEPS_PER_EPOCH, 30
  if scale == "smoke":
    c = common.smoke(c)
  return {"cifar_cnn_full_bn": c, "cifar_cnn_full_none": common.with_overrides(c, norm="none")}


def summarize(study, results):
  return common.accuracy_table(study, results, LABELS)


def plot(study, results, out_path):
  plots.eval_curves(results, LABELS, out_path, title=study.title)


def get_study(scale: str) -> common.Study:
  common.check_scale(scale)
  return common.Study(
    "cifar_cnn_full_width",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=(0,) if scale == "cpu" else common.seeds_for(scale),
    scale=scale,
  )
