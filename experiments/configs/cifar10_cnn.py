"""The seeds' CIFAR-10 CNN (3 x Conv 128 + BN + ReLU, Dense 1024, Dense 10) on the CIFAR-10 binary files.

The variant "max_norm" adds the seeds' max_norm(3) constraint on the Dense 1024 kernel (needs
normjax.max_norm). Note: ../shared/data/cifar10 holds a JPEG (q75) reconstruction of the CIFAR-10 pixels.
"""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import default
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = "cifar10_cnn"
  c.dataset = "cifar10"
  c.data_dir = "../shared/data/cifar10"
  c.data_mean = (0.4914, 0.4822, 0.4465)
  c.data_std = (0.2470, 0.2435, 0.2616)
  c.model = "cifar_cnn"
  c.batch_size = 128
  c.num_epochs = 30
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.log_every = 50
  c.eval_every = 390 * 5
  c.checkpoint_every = 390
  variants = parse_variants(variant, {"small", "max_norm"})
  if "max_norm" in variants:
    c.name = "cifar10_cnn_max_norm"
    c.max_norm = 3.0
  if "small" in variants:
    apply_small(c, num_steps=20, batch_size=32, eval_examples=512)
    c.model_kwargs.width = 16
    c.model_kwargs.hidden = 64
  return c
