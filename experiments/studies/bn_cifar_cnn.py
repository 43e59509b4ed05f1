"""Study 1: BatchNorm on the seeds' CIFAR-10 CNN, with and without BN, and with max_norm(3) on Dense 1024.

The seeds' recipe: 3 × (Conv 128 → BN → ReLU → MaxPool), Dense 1024, Dense 10; Adam, lr 1e-4, batch 128,
10 epochs. The claim: BN adds about 2 points of test accuracy. CIFAR-10 here is a JPEG (q75)
reconstruction of the original pixels, so absolute accuracies are below published ones.

The same runs also record, at every evaluation, the test accuracy after precise-BN recalibration (study
`precise_bn`) and the inputs to the activations (study `covariate_shift`).
"""

import ml_collections

from experiments.configs import cifar10_cnn
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 1: BatchNorm on the seeds' CIFAR-10 CNN (with / without BN, max_norm(3))"
CLAIM = "BN adds about 2 points of test accuracy to the seeds' CIFAR-10 CNN (Adam 1e-4, batch 128, 10 epochs)."
REDUCED = (
  "CPU scale: conv width 32 instead of 128, Dense 256 instead of 1024, 300 steps of batch 128 "
  "(0.77 epoch) instead of 10 epochs; evaluation on the first 5,000 test images."
)


def base_config(scale: str) -> ml_collections.ConfigDict:
  """The seeds' CIFAR-10 CNN recipe at `scale`, with precise-BN evaluation and activation probes."""
  common.check_scale(scale)
  c = cifar10_cnn.get_config()
  c.optimizer, c.learning_rate, c.schedule, c.weight_decay = "adam", 1e-4, "constant", 0.0
  c.batch_size, c.num_epochs = 128, 10
  c.eval_every, c.checkpoint_every, c.log_every = 390, 390, 30
  c.recalibrate_steps, c.recalibrate_at_every_eval = 20, True
  c.track_activations, c.probe_every = True, 39
  if scale in ("cpu", "smoke"):
    c.model_kwargs.width, c.model_kwargs.hidden = 32, 256
    c.num_steps, c.eval_every, c.eval_examples, c.checkpoint_every = 300, 60, 5000, 0
    c.recalibrate_steps, c.probe_every, c.log_every = 10, 20, 20
  return common.smoke(c) if scale == "smoke" else c


def runs(scale: str):
  c = base_config(scale)
  return {
    "cifar_cnn_bn": c,
    "cifar_cnn_none": common.with_overrides(c, norm="none"),
    "cifar_cnn_bn_max_norm": common.with_overrides(c, max_norm=3.0),
  }


LABELS = {
  "cifar_cnn_bn": "BN (before ReLU)",
  "cifar_cnn_none": "no normalization",
  "cifar_cnn_bn_max_norm": "BN + max_norm(3) on Dense",
}


def summarize(study, results):
  return common.accuracy_table(study, results, LABELS)


def plot(study, results, out_path):
  plots.eval_curves(results, LABELS, out_path, title=study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "bn_cifar_cnn",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
