"""The seeds' MNIST CNN with BatchNorm on Fashion-MNIST (the four IDX files in config.data_dir)."""

import ml_collections

from experiments.configs import mnist_cnn


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = mnist_cnn.get_config(variant)
  c.name = "fashion_mnist_cnn"
  c.dataset = "fashion_mnist"
  c.data_dir = "../shared/data/fashion_mnist"
  c.data_mean = (0.2860,)
  c.data_std = (0.3530,)
  return c
