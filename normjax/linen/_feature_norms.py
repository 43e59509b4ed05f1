"""linen wrappers of the stateless feature-axis norms: `scale` / `bias` in `params`, no arithmetic."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import feature_norms as fn_lib
from normjax._src import modes


class _FeatureNorm(nn.Module):
  """Shared body: builds the config from the fields, creates the params, calls the pure transform.

  Stateless: training and evaluation compute the same thing, so `training` is optional (as in flax,
  whose feature norms take no mode); a given one is still type-checked.
  """

  def _config(self) -> fn_lib.FeatureNormConfig:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, *, training: Optional[bool] = None, mask=None):
    modes.check_flag(training, "training")
    norm = fn_lib.from_config(self._config())
    shapes, state = jax.eval_shape(
      norm.init, jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    )
    params = {
      k: self.param(k, getattr(self, f"{k}_init"), v.shape, self.param_dtype)
      for k, v in shapes.items()
    }
    y, _ = norm.apply(params, type(state)(), x, training=False, mask=mask)
    return y


def _fields(module, names):
  return {n: getattr(module, n) for n in names}


_COMMON = ("epsilon", "use_scale", "use_bias", "stats_method", "dtype", "param_dtype")


class LayerNorm(_FeatureNorm):
  """`normjax.layer_norm` as a linen module; fields mirror its options (default epsilon 1e-5).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> variables = njl.LayerNorm().init(jax.random.key(0), x)
    >>> y = njl.LayerNorm().apply(variables, x)
  """

  reduction_axes: Any = -1
  feature_axes: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  def _config(self):
    return fn_lib.FeatureNormConfig(
      kind="layer",
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      **_fields(self, _COMMON),
    )


class GroupNorm(_FeatureNorm):
  """`normjax.group_norm` as a linen module: give `num_groups` or `group_size`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.ones((2, 4, 4, 8))
    >>> variables = njl.GroupNorm(num_groups=4).init(jax.random.key(0), x)
  """

  num_groups: Optional[int] = None
  group_size: Optional[int] = None
  axis: int = -1
  reduction_axes: Any = None
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  def _config(self):
    return fn_lib.FeatureNormConfig(
      kind="group",
      reduction_axes=self.reduction_axes,
      feature_axes=self.axis,
      num_groups=self.num_groups,
      group_size=self.group_size,
      **_fields(self, _COMMON),
    )


class InstanceNorm(_FeatureNorm):
  """`normjax.instance_norm` as a linen module.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> variables = njl.InstanceNorm().init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  """

  axis: int = -1
  reduction_axes: Any = None
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  def _config(self):
    if not isinstance(self.axis, int):
      raise ValueError(f"axis={self.axis!r}: InstanceNorm takes a single channel axis (an int)")
    return fn_lib.FeatureNormConfig(
      kind="instance",
      reduction_axes=self.reduction_axes,
      feature_axes=self.axis,
      **_fields(self, _COMMON),
    )


class RMSNorm(_FeatureNorm):
  """`normjax.rms_norm` as a linen module (scale only).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> variables = njl.RMSNorm().init(jax.random.key(0), jnp.ones((2, 3)))
  """

  reduction_axes: Any = -1
  feature_axes: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  def _config(self):
    return fn_lib.FeatureNormConfig(
      kind="rms",
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      use_bias=False,
      **_fields(self, _COMMON[:2] + _COMMON[3:]),
    )
