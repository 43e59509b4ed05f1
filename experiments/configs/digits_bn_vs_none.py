"""The main job: the seeds' MNIST CNN on scikit-learn's 8x8 digits, with and without BatchNorm.

`python -m experiments.main` uses this config; `config.compare` lists the runs (name → overrides).
"""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import default
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = "digits_bn_vs_none"
  c.dataset = "digits"
  c.batch_size = 32
  c.num_epochs = 15
  c.learning_rate = 0.02
  c.log_every = 15
  c.eval_every = 135  # every 3 epochs (1,437 // 32 = 44 steps per epoch)
  c.compare = ml_collections.ConfigDict(
    {
      "batch_norm": {"norm": "batch_norm"},
      "no_norm": {"norm": "none"},
    }
  )
  if "small" in parse_variants(variant, {"small"}):
    apply_small(c, num_epochs=1)  # checkpoint_every is already 0 (final checkpoint only)
  return c
