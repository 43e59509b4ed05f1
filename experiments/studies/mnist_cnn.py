"""Study 2: the seeds' MNIST CNN with and without BatchNorm reaches about 99% test accuracy.

Conv 32 → BN → Conv 64 → BN → MaxPool → Dense 128 → BN → Dense 10; Adam (lr 1e-3, Keras' default),
batch 128, 5 epochs of the full MNIST training set, evaluated on the full test set after every epoch.
The "cpu" scale is the seeds' recipe unchanged (about 12 minutes a run on 2 CPU cores); the arm without
normalization is the same network with the BN layers removed (its convolutions and Dense layer keep
their biases).
"""

from experiments.configs import mnist_cnn
from experiments.studies import common
from experiments.studies import plots

TITLE = "Study 2: the seeds' MNIST CNN with and without BatchNorm (5 epochs)"
CLAIM = (
  "Conv32-BN-Conv64-BN-MaxPool-Dense128-BN-Dense10 with Adam, batch 128, 5 epochs: about 99% "
  "test accuracy."
)
LABELS = {"mnist_cnn_bn": "MNIST CNN + BN", "mnist_cnn_none": "MNIST CNN, no normalization"}
STEPS_PER_EPOCH = 468  # 60,000 // 128 (num_steps drops the last partial batch of each epoch)


def runs(scale: str):
  common.check_scale(scale)
  c = mnist_cnn.get_config()
  c.optimizer, c.learning_rate, c.schedule = "adam", 1e-3, "constant"
  c.batch_size, c.num_epochs, c.log_every = 128, 5, 50
  c.eval_every, c.checkpoint_every = STEPS_PER_EPOCH, STEPS_PER_EPOCH
  if scale == "smoke":
    c = common.smoke(c)
  return {"mnist_cnn_bn": c, "mnist_cnn_none": common.with_overrides(c, norm="none")}


def summarize(study, results):
  return common.accuracy_table(study, results, LABELS)


def plot(study, results, out_path):
  plots.eval_curves(results, LABELS, out_path, title=study.title)


def get_study(scale: str) -> common.Study:
  return common.Study(
    "mnist_cnn",
    TITLE,
    CLAIM,
    "",  # the cpu scale is the seeds' recipe
    runs(scale),
    summarize,
    plot,
    seeds=common.seeds_for(scale),
    scale=scale,
  )
