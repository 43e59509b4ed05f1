"""ml_collections configs: each file defines `get_config(variant="")`; `variant="small"` is a quick local run.

A variant string is a comma-separated list of names (`"small,max_norm"`); every config parses it with
`parse_variants`, so an unknown or misspelt name raises instead of silently giving the full run.
"""

from typing import AbstractSet, FrozenSet

import ml_collections

SMALL = "small"


def parse_variants(variant: str, allowed: AbstractSet[str]) -> FrozenSet[str]:
  """The set of variant names in `variant` (comma-separated; "" for none), each one of `allowed`.

  Args:
    variant: e.g. `""`, `"small"` or `"small,max_norm"`; spaces around names are ignored.
    allowed: the names this config understands.

  Returns:
    The names given, as a frozenset.

  Raises:
    TypeError: `variant` is not a string.
    ValueError: a name is not in `allowed`; the message lists the allowed names.

  Example:
    >>> sorted(parse_variants("small, max_norm", {"small", "max_norm"}))
    ['max_norm', 'small']
    >>> parse_variants("", {"small"})
    frozenset()
  """
  if not isinstance(variant, str):
    raise TypeError(f"variant={variant!r} must be a string of comma-separated variant names")
  names = frozenset(name.strip() for name in variant.split(",")) - {""}
  unknown = names - set(allowed)
  if unknown:
    raise ValueError(
      f"variant={variant!r} names unknown variant(s) {sorted(unknown)}; the allowed variants are "
      f"{sorted(allowed)} (comma-separated), or \"\" for the full run"
    )
  return names


def apply_small(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """The "small" variant: evaluate and checkpoint only at the end, then set `overrides`.

  Example:
    >>> from experiments.configs import default
    >>> c = apply_small(default.get_config(), num_steps=5)
    >>> (c.num_steps, c.eval_every, c.checkpoint_every)
    (5, 0, 0)
  """
  config.eval_every = 0
  config.checkpoint_every = 0
  for key, value in overrides.items():
    setattr(config, key, value)
  return config
