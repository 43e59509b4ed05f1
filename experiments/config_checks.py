"""Checks a run's config before any work, and a resumed work directory's saved config against it.

`check_config` refuses values that would fail later (or, worse, run without a word): a learning rate that
is not positive, negative step or epoch counts, no step at all, batch sizes that are not positive or not
divisible by the devices, a ghost batch size that does not divide the per-device batch, unknown names.

`check_resume` compares the config of a run about to resume with the one saved in its work directory
(`config.json`). Keys that change the run (model, norm, data, optimizer, seed, batch size, …) must be
equal; the keys in `RESUMABLE_KEYS` (step count, evaluation, logging and checkpoint cadence, paths) may
change, e.g. to extend a finished run with a larger `num_steps`.

Example:
  >>> from experiments.configs import default
  >>> config = default.get_config()
  >>> check_config(config, device_count=8)  # the global batch of 64 is 8 per device
  >>> config.learning_rate = -0.1
  >>> try:
  ...   check_config(config, device_count=8)
  ... except ConfigError as e:
  ...   print(e)
  config.learning_rate=-0.1: expected a finite number > 0
"""

import math
import numbers
from typing import Any, Dict, Mapping, Optional

# Keys that may differ between a work directory's saved config and the config resuming it. With a decaying
# schedule ("cosine", "warmup_cosine") a new step count also re-times the remaining learning rates.
RESUMABLE_KEYS = frozenset(
  {
    "name",
    "num_steps",
    "num_epochs",  # the run's length
    "eval_every",
    "eval_examples",
    "eval_batch_size",
    "log_every",
    "progress_bar",
    "prefetch",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpointing",
    "recalibrate_steps",
    "recalibrate_at_every_eval",  # evaluation only
    "track_activations",
    "probe_every",
    "probe_examples",  # diagnostics only
    "data_dir",
    "cache_dir",  # where the same data lives (a moved cache, another machine)
    "restore_from",  # only read by a work directory without checkpoints
  }
)

_NAMES = {
  "optimizer": ("sgd", "adam", "adamw"),
  "schedule": ("constant", "cosine", "warmup_cosine"),
  "norm_position": ("before", "after"),
}


class ConfigError(ValueError):
  """A config value that cannot run; the message names the field, its value and what was expected."""


def _number(
  config, key: str, *, minimum: float, strict: bool = False, integer: bool = False
) -> None:
  value = config.get(key)
  kind = "an integer" if integer else "a finite number"
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (not integer or float(value).is_integer())
  if not ok or (value <= minimum if strict else value < minimum):
    raise ConfigError(
      f"config.{key}={value!r}: expected {kind} {'>' if strict else '>='} {minimum}"
    )


def _choice(config, key: str, choices) -> None:
  if config.get(key) not in choices:
    raise ConfigError(f"config.{key}={config.get(key)!r}: expected one of {tuple(choices)}")


def _divides(config, key: str, per_device: int, device_count: int) -> None:
  size = config.get(key)
  if size <= 0 or per_device % size:
    raise ConfigError(
      f"config.{key}={size} must be a positive divisor of the per-device batch of {per_device} examples "
      f"(config.batch_size={config.batch_size} is global, over {device_count} device(s))"
    )


def check_config(config, *, device_count: int) -> None:
  """Raises `ConfigError` unless `config` can run on `device_count` devices (see the module docstring)."""
  from experiments import models  # pylint: disable=g-import-not-at-top

  _number(config, "learning_rate", minimum=0, strict=True)
  _number(config, "num_steps", minimum=0, integer=True)
  _number(config, "num_epochs", minimum=0)
  if config.num_steps == 0 and config.num_epochs == 0:
    raise ConfigError(
      "config.num_steps=0 and config.num_epochs=0: expected at least one training step "
      "(num_steps > 0, or num_epochs > 0 when num_steps is 0)"
    )
  for key in ("batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
    _number(config, key, minimum=0, strict=True, integer=True)
  for key in ("eval_every", "warmup_steps", "recalibrate_steps", "eval_examples", "probe_every"):
    _number(config, key, minimum=0, integer=True)
  _number(config, "checkpoint_every", minimum=-1, integer=True)
  _number(config, "weight_decay", minimum=0)
  if config.get("momentum") is not None:
    _number(config, "momentum", minimum=0)
  for key, choices in (*_NAMES.items(), ("model", models.MODELS), ("norm", models.NORMS)):
    _choice(config, key, choices)
  for key, what in (("batch_size", "global"), ("eval_batch_size", "global evaluation")):
    if config[key] % device_count:
      raise ConfigError(
        f"config.{key}={config[key]} is the {what} batch, over all devices: it must be "
        f"divisible by the {device_count} device(s)"
      )
  per_device = config.batch_size // device_count
  if config.norm == "ghost_batch_norm":
    _divides(config, "ghost_batch_size", per_device, device_count)
  if config.norm == "batch_renorm" and config.get("renorm_ghost_batch_size", 0):
    _divides(config, "renorm_ghost_batch_size", per_device, device_count)
  parse_restore_from(config.get("restore_from", ""))


def check_total_steps(config, total_steps: int, num_train: int) -> None:
  """Raises `ConfigError` if the run would train for no step, or a batch exceeds the training split."""
  if config.batch_size > num_train:
    raise ConfigError(
      f"config.batch_size={config.batch_size} (global) exceeds the {num_train} training "
      f"examples of {config.dataset!r}"
    )
  if total_steps < 1:
    raise ConfigError(
      f"config.num_epochs={config.num_epochs} of {num_train // config.batch_size} steps each "
      "(num_train // batch_size) gives no training step: expected at least one; raise "
      "num_epochs or set num_steps"
    )


def parse_restore_from(value: str) -> Optional[tuple]:
  """`"<workdir>:<step>"` → `(workdir, step)`; `""` → None. Raises `ConfigError` for another form."""
  if not value:
    return None
  workdir, _, step = str(value).rpartition(":")
  if not workdir or not step.isdigit():
    raise ConfigError(
      f"config.restore_from={value!r}: expected '<workdir>:<step>', e.g. 'runs/mnist:400'"
    )
  return workdir, int(step)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """A nested dict (a config's JSON) → {"a.b": value}; tuples become lists, as in JSON."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def run_changing_differences(
  saved: Mapping[str, Any], config: Mapping[str, Any]
) -> Dict[str, tuple]:
  """{key: (saved value, new value)} over the flattened keys that differ and are not `RESUMABLE_KEYS`."""
  a, b = flatten(saved), flatten(config)
  missing = "<absent>"
  return {
    k: (a.get(k, missing), b.get(k, missing))
    for k in sorted(set(a) | set(b))
    if a.get(k, missing) != b.get(k, missing) and k.split(".")[0] not in RESUMABLE_KEYS
  }


def check_resume(
  saved: Mapping[str, Any], config: Mapping[str, Any], workdir: str, latest_step: Optional[int]
) -> None:
  """Raises `ConfigError`, in one paragraph naming the keys, if `config` differs from `saved` in a key that
  changes the run; `latest_step` is the work directory's latest checkpoint (None: no checkpoint)."""
  diff = run_changing_differences(saved, config)
  if not diff:
    return
  keys = ", ".join(f"{k} (saved {v[0]!r}, now {v[1]!r})" for k, v in diff.items())
  branch = (
    f"to branch from its latest checkpoint with the new values, use a fresh --workdir and "
    f"--config.restore_from={workdir}:{latest_step}; "
    if latest_step is not None
    else ""
  )
  raise ConfigError(
    f"{workdir} holds a run whose config differs in keys that change the run: {keys}. Resuming would "
    f"mix two runs, so nothing was done. To continue that run, pass its saved values (see "
    f"{workdir}/config.json, or --config experiments/configs/from_workdir.py:{workdir}); {branch}or "
    f"start the new run in another --workdir. Keys that may change on resume: {', '.join(sorted(RESUMABLE_KEYS))}."
  )
