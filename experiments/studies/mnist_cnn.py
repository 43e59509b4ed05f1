"""Study 2: the seeds' MNIST CNN with BatchNorm reaches about 99% test accuracy.

Conv 32 → BN → Conv 64 → BN → MaxPool → Dense 128 → BN → Dense 10; Adam (lr 1e-3, Keras' default),
batch 128, 5 epochs.
"""

from experiments.configs import mnist_cnn
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 2: the seeds' MNIST CNN with BatchNorm"
CLAIM = "Conv32-BN-Conv64-BN-MaxPool-Dense128-BN-Dense10 with Adam, batch 128, 5 epochs: about 99% test accuracy."
REDUCED = "CPU scale: 150 steps of batch 128 (19,200 images, 0.32 epoch) instead of 5 epochs; the full test set."
LABELS = {"mnist_cnn_bn": "MNIST CNN + BN"}


def runs(scale: str):
  common.check_scale(scale)
  c = mnist_cnn.get_config()
  c.optimizer, c.learning_rate, c.schedule = "adam", 1e-3, "constant"
  c.batch_size, c.num_epochs, c.eval_every, c.log_every = 128, 5, 469, 50
  if scale in ("cpu", "smoke"):
    c.num_steps, c.eval_every, c.log_every, c.checkpoint_every = 150, 50, 10, 0
  return {"mnist_cnn_bn": common.smoke(c) if scale == "smoke" else c}


def summarize(study, results):
  return common.accuracy_table(study, results, LABELS)


def plot(study, results, out_path):
  plots.eval_curves(results, LABELS, out_path, title=study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "mnist_cnn",
    TITLE,
    CLAIM,
    REDUCED if scale == "cpu" else "",
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
