"""The seeds' MNIST CNN with BatchNorm on MNIST (the four IDX files in config.data_dir)."""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import default
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = "mnist_cnn"
  c.dataset = "mnist"
  c.data_dir = "../shared/data/mnist"
  c.data_mean = (0.1307,)
  c.data_std = (0.3081,)
  c.batch_size = 128
  c.num_epochs = 5
  c.learning_rate = 0.05
  c.log_every = 50
  c.eval_every = 469
  c.checkpoint_every = 469
  if "small" in parse_variants(variant, {"small"}):
    apply_small(c, num_steps=50, eval_examples=512)
  return c
