"""ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) with BatchNorm on the CIFAR-10 binary files (JPEG pixels)."""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import cifar10_resnet20
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar10_resnet20.get_config()
  c.name = "cifar10_resnet18"
  c.model = "resnet18"
  c.num_epochs = 200
  c.weight_decay = 5e-4
  if "small" in parse_variants(variant, {"small"}):
    apply_small(c, num_steps=3, batch_size=16, eval_batch_size=512, eval_examples=512)
  return c
