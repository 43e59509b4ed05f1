"""ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) with BatchNorm on the CIFAR-10 binary files (JPEG pixels)."""

import ml_collections

from experiments.configs import cifar10_resnet20


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar10_resnet20.get_config()
  c.name = "cifar10_resnet18"
  c.model = "resnet18"
  c.num_epochs = 200
  c.weight_decay = 5e-4
  if variant == "small":
    c.num_steps = 3
    c.batch_size = 16
    c.eval_batch_size = 512
    c.eval_every = 0
    c.eval_examples = 512
    c.checkpoint_every = 0
  return c
