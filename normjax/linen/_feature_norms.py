"""linen wrappers of the stateless feature-axis norms: `scale` / `bias` in `params`, no arithmetic."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from normjax._src import feature_norms as fn_lib


class _FeatureNorm(nn.Module):
  """Shared body: builds the config from the fields, creates the params, calls the pure transform."""

  def _config(self) -> fn_lib.FeatureNormConfig:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, *, training: bool, mask=None):
    del training  # stateless: the same computation in training and evaluation
    norm = fn_lib.from_config(self._config())
    init_params, state = norm.init(x)
    params = {k: self.param(k, lambda _, v=v: v) for k, v in init_params.items()}
    y, _ = norm.apply(params, state, x, training=False, mask=mask)
    return y


def _fields(module, names):
  return {n: getattr(module, n) for n in names}


_COMMON = ("epsilon", "use_scale", "use_bias", "stats_method", "dtype", "param_dtype")


class LayerNorm(_FeatureNorm):
  """`normjax.layer_norm` as a linen module; fields mirror its options (default epsilon 1e-5).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> variables = njl.LayerNorm().init(jax.random.key(0), x, training=False)
    >>> y = njl.LayerNorm().apply(variables, x, training=False)
  """
  reduction_axes: Any = -1
  feature_axes: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    return fn_lib.FeatureNormConfig("layer", self.reduction_axes, self.feature_axes,
                                    **_fields(self, _COMMON))


class GroupNorm(_FeatureNorm):
  """`normjax.group_norm` as a linen module: give `num_groups` or `group_size`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.ones((2, 4, 4, 8))
    >>> variables = njl.GroupNorm(num_groups=4).init(jax.random.key(0), x, training=False)
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

  def _config(self):
    return fn_lib.FeatureNormConfig("group", self.reduction_axes, self.axis, self.num_groups,
                                    self.group_size, **_fields(self, _COMMON))


class InstanceNorm(_FeatureNorm):
  """`normjax.instance_norm` as a linen module.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> variables = njl.InstanceNorm().init(jax.random.key(0), jnp.ones((2, 4, 4, 3)), training=False)
  """
  axis: int = -1
  reduction_axes: Any = None
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    if not isinstance(self.axis, int):
      raise ValueError(f"axis={self.axis!r}: InstanceNorm takes a single channel axis (an int)")
    return fn_lib.FeatureNormConfig("instance", self.reduction_axes, self.axis,
                                    **_fields(self, _COMMON))


class RMSNorm(_FeatureNorm):
  """`normjax.rms_norm` as a linen module (scale only).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> variables = njl.RMSNorm().init(jax.random.key(0), jnp.ones((2, 3)), training=False)
  """
  reduction_axes: Any = -1
  feature_axes: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self):
    return fn_lib.FeatureNormConfig("rms", self.reduction_axes, self.feature_axes, None, None,
                                    self.epsilon, self.use_scale, False, self.stats_method, self.dtype,
                                    self.param_dtype)
