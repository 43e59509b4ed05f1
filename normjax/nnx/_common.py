"""Shared bookkeeping of the nnx faces: configs from explicit arguments, affine parameters, mode flags.

No arithmetic lives here: the layers call the pure transforms of `normjax._src`.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from flax import nnx

from normjax._src import modes

# flax nnx's own defaults (`nnx.initializers.ones_init()` / `zeros_init()`), kept as single objects so
# that a layer built without `rngs` can tell them apart from an initializer that needs a key.
ONES = nnx.initializers.ones_init()
ZEROS = nnx.initializers.zeros_init()
_KEYLESS = (ONES, ZEROS, nnx.initializers.ones, nnx.initializers.zeros)


def config_from(config_cls, values: Mapping[str, Any], layer: str, **overrides):
  """`config_cls(**...)` by keyword from a constructor's explicit arguments (`locals()`).

  Every field of the dataclass must be an argument of the face: a field added to the core and missing
  here is a clear error rather than a silently ignored option.
  """
  kwargs = {}
  for field in dataclasses.fields(config_cls):
    if field.name in overrides:
      kwargs[field.name] = overrides[field.name]
    elif field.name in values:
      kwargs[field.name] = values[field.name]
    else:
      raise TypeError(
        f"{layer} has no argument for the {config_cls.__name__} option {field.name!r}; "
        "the nnx face must list every option of the core configuration"
      )
  return config_cls(**kwargs)


def feature_shape(num_features: Union[int, Sequence[int]], axes, layer: str) -> Tuple[int, ...]:
  """`(num_features,)` for one feature axis; a tuple of sizes, one per axis, for several."""
  n_axes = len(axes) if isinstance(axes, (tuple, list)) else 1
  sizes = (num_features,) if isinstance(num_features, int) else tuple(num_features)
  if len(sizes) != n_axes or any(
    not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes
  ):
    raise ValueError(
      f"{layer}: num_features={num_features!r} must be a positive int (one feature "
      f"axis) or a tuple of {n_axes} positive ints, one per feature axis of "
      f"{axes!r}"
    )
  return sizes


def affine(
  module: nnx.Module,
  shape,
  *,
  use_scale: bool,
  use_bias: bool,
  scale_init,
  bias_init,
  param_dtype,
  rngs: Optional[nnx.Rngs],
  scale_metadata=None,
  bias_metadata=None,
  layer: str,
) -> None:
  """Sets `module.scale` / `module.bias` (`nnx.Param`, or None) as flax nnx does.

  Keys are drawn from `rngs.params()` for the scale, then the bias, in flax's order, so a normjax layer
  and a flax layer built from equal `nnx.Rngs` get equal parameters whatever the initializers.
  """
  for name, use, init, metadata in (
    ("scale", use_scale, scale_init, scale_metadata),
    ("bias", use_bias, bias_init, bias_metadata),
  ):
    if not use:
      setattr(module, name, nnx.data(None))
      continue
    if rngs is not None:
      key = rngs.params()
    elif any(init is k for k in _KEYLESS):
      key = None
    else:
      raise ValueError(
        f"{layer}: {name}_init={init!r} needs a random key but rngs=None; pass rngs=nnx.Rngs(seed)"
      )
    setattr(module, name, nnx.Param(init(key, shape, param_dtype), **dict(metadata or {})))


def affine_params(module: nnx.Module) -> dict:
  """`{"scale", "bias"}` values present on `module`, the params dict of the pure transforms."""
  return {k: getattr(module, k)[...] for k in ("scale", "bias") if getattr(module, k) is not None}


def stateless_mode(use_running_average, training, layer: str) -> None:
  """Checks the mode flags of a layer whose computation does not depend on the mode.

  They are optional; when given they must be bools (the TypeError of `normjax._src.modes`) and not
  both at once.
  """
  if use_running_average is None and training is None:
    return
  modes.merge_override(None, use_running_average, training, layer=layer)


def stats_method(use_fast_variance, method: str) -> str:
  return modes.stats_method_from_flax(use_fast_variance, method)


def store_options(module: nnx.Module, config, fixed=(), **raw) -> None:
  """Keeps each option of `config` as a plain attribute of `module`, as flax nnx layers do.

  `raw` overrides the validated value (e.g. the `stats_method` given, before `use_fast_variance` is
  resolved); `fixed` names fields the class decides (e.g. `kind`), which are not attributes.
  """
  for field in dataclasses.fields(config):
    if field.name not in fixed:
      setattr(module, field.name, raw.get(field.name, getattr(config, field.name)))


def build_config(module: nnx.Module, config_cls, **fixed):
  """The validated core configuration from `module`'s current attributes and the class's `fixed`."""
  values = {
    f.name: getattr(module, f.name) for f in dataclasses.fields(config_cls) if f.name not in fixed
  }
  if "stats_method" in values and hasattr(module, "use_fast_variance"):
    values["stats_method"] = stats_method(module.use_fast_variance, values["stats_method"])
  return config_cls(**values, **fixed)
