"""Defaults shared by every config; the other files start from `get_config()` here and change what differs."""

import ml_collections

from experiments.configs import apply_small
from experiments.configs import parse_variants


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Base hyper-parameters (the seeds' MNIST CNN with BatchNorm on the embedded digits).

  `variant="small"`: one epoch, evaluated and checkpointed only at the end.
  """
  small = "small" in parse_variants(variant, {"small"})
  c = ml_collections.ConfigDict()
  c.name = "default"
  c.seed = 0
  # Data: a key of experiments.tfds_builders.BUILDERS, or "tfds:<catalog name>" already prepared in cache_dir.
  c.dataset = "digits"
  c.data_dir = (
    ""  # directory of the original files (unused for "digits"), e.g. ../shared/data/mnist
  )
  c.cache_dir = "data_cache"  # prepared ArrayRecord datasets (git-ignored)
  c.data_mean = (0.5,)  # per-channel, after scaling pixels to [0, 1]
  c.data_std = (0.5,)
  c.prefetch = 2
  # Model and normalization.
  c.model = "mnist_cnn"  # see experiments.models.MODELS
  c.model_kwargs = ml_collections.ConfigDict()
  c.norm = "batch_norm"  # see experiments.models.NORMS
  c.norm_position = "before"  # "before" or "after" the activation
  c.bn_momentum = 0.9
  c.bn_epsilon = 1e-5
  c.ghost_batch_size = 16
  c.num_groups = 8
  c.renorm_r_max = 3.0
  c.renorm_d_max = 5.0
  c.renorm_ghost_batch_size = 0  # > 0: batch_renorm's statistics over groups of this many examples
  c.renorm_warmup_steps = (
    0  # > 0: Ioffe's schedule: plain BN this long, then r_max, d_max ramp up (x8, x5)
  )
  c.weight_standardization = False  # standardize every conv kernel (Qiao et al. 2019; ResNets)
  # Optimization.
  c.optimizer = "sgd"
  c.learning_rate = 0.05
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 0.0
  c.schedule = "cosine"
  c.warmup_steps = 0
  c.max_norm = ml_collections.config_dict.placeholder(float)  # e.g. 3.0 on the Dense 1024 kernel
  c.batch_size = 64  # global, over all devices and processes
  c.eval_batch_size = 256
  c.recalibrate_steps = (
    0  # > 0: also evaluate after precise-BN recalibration on this many train batches
  )
  c.eval_examples = 0  # > 0: evaluate on the first eval_examples test examples only
  c.recalibrate_at_every_eval = (
    False  # with recalibrate_steps > 0: also at every evaluation, not only the last
  )
  c.track_activations = (
    False  # record the inputs to the activations at every evaluation (experiments/probes.py)
  )
  c.probe_examples = 256  # test images the activation probe runs on
  c.probe_every = 0  # steps between activation probes (0: at every evaluation)
  c.num_epochs = 10
  c.num_steps = 0  # > 0 overrides num_epochs
  # Logging and checkpoints.
  c.log_every = 20
  c.eval_every = 0  # 0: evaluate only at the end
  c.checkpoint_every = 0  # 0: final checkpoint only; -1: none
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  c.restore_from = (
    ""  # "<workdir>:<step>": a new work directory starts from that checkpoint (see README)
  )
  c.progress_bar = True
  if small:
    apply_small(c, num_epochs=1)
  return c
