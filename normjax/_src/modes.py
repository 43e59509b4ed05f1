"""Resolving a layer's mode (training or evaluation) from the flags each framework speaks.

The functional core takes `training=` (a bool, keyword-only, no default). The faces also speak their
framework's flag: flax's `use_running_average` (a linen field or `__call__` argument merged as
`flax.linen.merge_param` does; an nnx attribute set by `model.eval()` / `model.train()` that a call
argument overrides) and Equinox's `inference`. Every face refuses a given flag that is not a bool with
the same TypeError, so `training="no"` can never train silently.
"""

from typing import Optional

import numpy as np


def check_flag(value, name: str) -> Optional[bool]:
  """`value` as a Python bool; None stays None ("not given"). Raises TypeError for anything else.

  Python and NumPy bools (including 0-d NumPy bool arrays) are accepted; strings, ints, floats and JAX
  arrays are refused: the mode selects the computation at trace time, so it must be a concrete bool.
  """
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or (
    isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.bool_
  ):
    return bool(value)
  raise TypeError(
    f"{name}={value!r} must be a Python or NumPy bool (it selects the computation at "
    f"trace time); got a {type(value).__name__}. Pass {name}=True or {name}=False"
  )


def training_flag(training) -> bool:
  """The core's check: `training` must be given and be a bool."""
  if training is None:
    raise TypeError(
      "training=None: pass training=True (batch statistics, state updated) or "
      "training=False (running statistics, state unchanged)"
    )
  return check_flag(training, "training")


def merge_linen(field, argument, training, *, layer: str = "layer") -> bool:
  """linen: the mode from the `use_running_average` field, the call argument, or `training=`.

  Exactly one of the three must be given (not None), as `flax.linen.merge_param` requires for the field
  and the argument: two given raise ValueError even when they agree. Returns `training`.
  """
  field = check_flag(field, "use_running_average")
  argument = check_flag(argument, "use_running_average")
  training = check_flag(training, "training")
  given = [
    name
    for name, value in (
      ("the use_running_average field", field),
      ("the use_running_average argument", argument),
      ("training=", training),
    )
    if value is not None
  ]
  if len(given) != 1:
    what = " and ".join(given) if given else "neither use_running_average nor training"
    raise ValueError(
      f"{layer}: {what} given; exactly one of use_running_average (as a field or as a __call__ "
      "argument, flax's merge_param semantics) and training= must decide the mode "
      "(training = not use_running_average)"
    )
  if training is not None:
    return training
  return not (field if field is not None else argument)


def merge_override(
  attribute,
  argument,
  training,
  *,
  attribute_name: str = "use_running_average",
  negate_attribute: bool = True,
  argument_name: str = "use_running_average",
  negate_argument: bool = True,
  layer: str = "layer",
) -> bool:
  """nnx and Equinox: a call argument (or `training=`) overrides the module's attribute.

  `attribute` is what `model.eval()` / `model.train()` (nnx) or `eqx.nn.inference_mode` (Equinox) set;
  `negate_*` says whether the flag means "evaluation" (use_running_average, inference) rather than
  "training". Giving both the argument and `training=` raises ValueError; none at all raises ValueError.
  """
  attribute = check_flag(attribute, attribute_name)
  argument = check_flag(argument, argument_name)
  training = check_flag(training, "training")
  if argument is not None and training is not None:
    raise ValueError(
      f"{layer}: both {argument_name}={argument} and training={training} given; "
      f"pass one ({argument_name} = not training)"
    )
  if training is not None:
    return training
  if argument is not None:
    return not argument if negate_argument else argument
  if attribute is not None:
    return not attribute if negate_attribute else attribute
  raise ValueError(
    f"{layer}: no mode given; set {attribute_name} on the module or pass "
    f"{argument_name}= or training= to the call"
  )


def stats_method_from_flax(use_fast_variance: Optional[bool], stats_method: str) -> str:
  """flax's `use_fast_variance` flag as a normjax `stats_method` (None: keep `stats_method`).

  `True` is flax's E[x²]−E[x]² (`"fast"`), `False` its two-pass variance (`"two_pass"`). Giving both a
  flag and a `stats_method` other than the default `"shifted"` raises ValueError.
  """
  if use_fast_variance is None:
    return stats_method
  flag = check_flag(use_fast_variance, "use_fast_variance")
  method = "fast" if flag else "two_pass"
  if stats_method not in ("shifted", method):
    raise ValueError(
      f"use_fast_variance={flag} asks for stats_method={method!r} but "
      f"stats_method={stats_method!r} is given too; give one of them"
    )
  return method
