"""ResNet-20 (He et al. 2016) with BatchNorm on the CIFAR-10 binary files (JPEG-reconstructed pixels)."""

import ml_collections

from experiments.configs import cifar10_cnn


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
  if variant == "small":
    c.num_steps = 10
    c.batch_size = 32
    c.eval_every = 0
    c.eval_examples = 512
    c.checkpoint_every = 0
  return c
