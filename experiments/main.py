r"""Entry point: `python -m experiments.main [--config experiments/configs/<name>.py[:variant]] [--workdir DIR]`.

With no arguments it runs the main job: the seeds' CNN on scikit-learn's digits with and without BatchNorm
(`configs/digits_bn_vs_none.py`), then prints a comparison table and writes `comparison.png`.
Any config field can be overridden: `--config.learning_rate=0.1 --config.norm=sync_batch_norm`.

Multi-host: pass `--distributed` (or set `JAX_COORDINATOR_ADDRESS`); `jax.distributed.initialize` then
auto-detects Cloud TPU, SLURM, Open MPI and Kubernetes, or uses `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (see experiments/README.md).
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits_bn_vs_none.py")
config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "A config file defining get_config().", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: runs/<config.name>).")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  None,
  "Call jax.distributed.initialize() (default: when JAX_COORDINATOR_ADDRESS is set).",
)


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ
  distributed = _DISTRIBUTED.value
  if distributed is None:
    distributed = bool(env.get("JAX_COORDINATOR_ADDRESS"))
  if not distributed:
    return
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"), **kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  _initialize_distributed()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  from experiments import compare  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  from experiments import config_checks  # pylint: disable=g-import-not-at-top

  try:
    if config.get("compare"):
      compare.run_comparison(config, workdir)
    else:
      result = train.train_and_evaluate(config, workdir)
      print(compare.format_table({config.name: result}))
  except (
    FloatingPointError,
    config_checks.ConfigError,
  ) as e:  # say what to do, without a traceback
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
