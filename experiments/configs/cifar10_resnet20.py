"""ResNet-20 (He et al. 2016) with BatchNorm on the CIFAR-10 binary files (JPEG-reconstructed pixels)."""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import cifar10_cnn
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = cifar10_cnn.get_config()
  c.name = "cifar10_resnet20"
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict()
  c.num_epochs = 180
  c.learning_rate = 0.1
  c.weight_decay = 1e-4
  c.schedule = "warmup_cosine"
  c.warmup_steps = 390
  if "small" in parse_variants(variant, {"small"}):
    apply_small(c, num_steps=10, batch_size=32, eval_examples=512)
  return c
