"""Studies that reproduce what the literature claims about normalization (RESULTS.md).

Each module defines `get_study(scale) -> common.Study`; `python -m experiments.run_study --study <name>`
runs one. See `common.py` for the scales and how runs are shared between studies.
"""

import importlib

STUDIES = (
  "bn_cifar_cnn",
  "mnist_cnn",
  "bn_position",
  "learning_rate",
  "small_batch",
  "ghost_large_batch",
  "precise_bn",
  "covariate_shift",
  "cifar_cnn_full_width",
)


def get_study(name: str, scale: str = "cpu"):
  """The study `name` (one of `STUDIES`) at `scale` ("cpu", "full" or "smoke")."""
  if name not in STUDIES:
    raise ValueError(f"study={name!r}: expected one of {STUDIES}")
  return importlib.import_module(f"experiments.studies.{name}").get_study(scale)
