"""The config a work directory ran with (its `config.json`): `--config experiments/configs/from_workdir.py:<workdir>`.

Use it to continue or branch from a run without knowing how it was started (main, a comparison or a study),
e.g. the command a NaN stop prints:

  python -m experiments.main --config experiments/configs/from_workdir.py:runs/r20 \
      --config.restore_from=runs/r20:1200 --config.learning_rate=0.05 --workdir runs/r20_from_1200

Fields are overridden as in any config (`--config.<field>=<value>`). The saved values are laid over
`default.get_config()`, so a field the saved config lacks keeps its default and typed placeholders stay typed.
"""

import json
import os

import ml_collections

from experiments.configs import default


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict):
      if key not in config:
        config[key] = ml_collections.ConfigDict()
      _merge(config[key], value)
    elif key in config and isinstance(config[key], tuple) and isinstance(value, list):
      config[key] = tuple(value)  # JSON has no tuples
    else:
      config[key] = value


def get_config(workdir: str = "") -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path}: missing; expected the config.json of a work directory, named as "
      "--config experiments/configs/from_workdir.py:<workdir>"
    )
  with open(path) as f:
    saved = json.load(f)
  config = default.get_config()
  with config.unlocked():
    _merge(config, saved)
  return config
