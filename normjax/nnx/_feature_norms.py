"""Layer, group, instance and RMS norm as flax nnx modules: `nnx.Param` scale / bias, no arithmetic.

Argument names are flax nnx's (`num_features`, `epsilon`, `reduction_axes`, `feature_axes`,
`num_groups`, `group_size`, `scale_init`, `bias_init`, `use_fast_variance`, `rngs`), the options are the
core's `FeatureNormConfig` fields, and the defaults are normjax's. Differences from flax nnx: epsilon
defaults to 1e-5 (flax: 1e-6); statistics default to the accurate `"shifted"` method (flax:
E[x²]−E[x]²); `GroupNorm` needs `num_groups` or `group_size` (flax defaults to 32 groups); the output
dtype defaults to the input's; there is no `axis_name` (per-example statistics need none) and no
`promote_dtype`. The layers are stateless: the call accepts the mode flags of `BatchNorm`
(`use_running_average`, `training`), checks them and ignores them.
"""

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

from flax import nnx
import jax.numpy as jnp

from normjax._src import feature_norms as fn_lib
from normjax._src import transform
from normjax._src import validation
from normjax.nnx import _common

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class _FeatureNorm(nnx.Module):
  """Shared body: options kept as attributes, `scale` / `bias` as `nnx.Param`, the pure transform."""

  _KIND = "layer"

  def _setup(self, values, *, num_features, feature_axes, rngs, fixed):
    layer = f"normjax.nnx.{type(self).__name__}"
    method = _common.stats_method(values["use_fast_variance"], values["stats_method"])
    config = _common.config_from(
      fn_lib.FeatureNormConfig, values, layer, kind=self._KIND, stats_method=method, **fixed
    )
    shape = _common.feature_shape(num_features, feature_axes, layer)
    self.num_features = num_features
    self.use_fast_variance = values["use_fast_variance"]
    _common.store_options(
      self, config, fixed=("kind",) + tuple(fixed), stats_method=values["stats_method"]
    )
    _common.affine(
      self,
      shape,
      use_scale=config.use_scale,
      use_bias=config.use_bias,
      scale_init=values.get("scale_init"),
      bias_init=values.get("bias_init"),
      param_dtype=config.param_dtype,
      rngs=rngs,
      scale_metadata=values.get("scale_metadata"),
      bias_metadata=values.get("bias_metadata"),
      layer=layer,
    )

  @property
  def config(self) -> fn_lib.FeatureNormConfig:
    """The core configuration built from the current attributes (validated)."""
    return _common.build_config(self, fn_lib.FeatureNormConfig, kind=self._KIND, **self._fixed())

  def _fixed(self):
    return {}

  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes `x` with its own per-example statistics.

    Args:
      x: float input.
      use_running_average, training: accepted for a uniform call with `BatchNorm`; checked (bools, not
        both), otherwise ignored: the computation does not depend on the mode.
      mask: optional boolean array broadcastable to `x`; False elements do not count in the statistics.

    Returns:
      The normalized `x`, in `dtype` (default: `x`'s).
    """
    _common.stateless_mode(use_running_average, training, f"normjax.nnx.{type(self).__name__}")
    y, _ = fn_lib.from_config(self.config).apply(
      _common.affine_params(self), transform.EmptyState(), x, training=False, mask=mask
    )
    return y


class LayerNorm(_FeatureNorm):
  """Layer Normalization (`normjax.layer_norm`) as a flax nnx module, flax nnx's argument names.

  Args:
    num_features: size of the feature axis (a tuple of sizes when `feature_axes` is a tuple).
    epsilon: added to the variance inside the square root (default 1e-5; flax nnx: 1e-6).
    dtype, param_dtype: output dtype (default: the input's) and dtype of `scale` / `bias`.
    use_bias, use_scale: learn `bias` / `scale`.
    bias_init, scale_init: flax initializers (default zeros / ones).
    reduction_axes: axes of the statistics (default -1).
    feature_axes: axes of `scale` / `bias` (default -1).
    stats_method: "shifted" (default), "two_pass" or "fast".
    use_fast_variance: flax's flag; None keeps `stats_method`, True is "fast", False "two_pass".
    rngs: `nnx.Rngs` for the initializers; may be None with the default initializers.
    bias_metadata, scale_metadata: metadata of the `nnx.Param`s.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> y = njn.LayerNorm(3, rngs=nnx.Rngs(0))(jnp.array([[1.0, 2.0, 3.0]]))
    >>> [round(float(v), 3) for v in y[0]]
    [-1.225, 0.0, 1.225]

  References:
    Ba, Kiros & Hinton 2016, arXiv:1607.06450.
  """

  _KIND = "layer"

  def __init__(
    self,
    num_features: Union[int, Sequence[int]],
    *,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _common.ZEROS,
    scale_init: Any = _common.ONES,
    reduction_axes: validation.Axes = -1,
    feature_axes: validation.Axes = -1,
    stats_method: str = "shifted",
    use_fast_variance: Optional[bool] = None,
    rngs: Optional[nnx.Rngs] = None,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    self._setup(
      locals(),
      num_features=num_features,
      feature_axes=feature_axes,
      rngs=rngs,
      fixed={"num_groups": None, "group_size": None},
    )

  def _fixed(self):
    return {"num_groups": None, "group_size": None}


class RMSNorm(_FeatureNorm):
  """RMS Normalization (`normjax.rms_norm`) as a flax nnx module: `scale` only, no centering.

  Args:
    num_features, epsilon, dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes,
      stats_method, use_fast_variance, rngs, scale_metadata: as in `LayerNorm` (epsilon is added to
      the mean square; default 1e-5, flax nnx: 1e-6).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.RMSNorm(2)(jnp.array([[3.0, 4.0]]))
    >>> [round(float(v), 3) for v in y[0]]
    [0.849, 1.131]

  References:
    Zhang & Sennrich 2019, arXiv:1910.07467.
  """

  _KIND = "rms"

  def __init__(
    self,
    num_features: Union[int, Sequence[int]],
    *,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_scale: bool = True,
    scale_init: Any = _common.ONES,
    reduction_axes: validation.Axes = -1,
    feature_axes: validation.Axes = -1,
    stats_method: str = "shifted",
    use_fast_variance: Optional[bool] = None,
    rngs: Optional[nnx.Rngs] = None,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    self._setup(
      locals(), num_features=num_features, feature_axes=feature_axes, rngs=rngs, fixed=self._fixed()
    )

  def _fixed(self):
    return {"num_groups": None, "group_size": None, "use_bias": False}


class GroupNorm(_FeatureNorm):
  """Group Normalization (`normjax.group_norm`, channels on `feature_axes`) as a flax nnx module.

  Give exactly one of `num_groups` and `group_size` (flax nnx defaults to `num_groups=32`; normjax
  asks). `num_groups=1` is layer norm over every non-batch axis, `group_size=1` instance norm.

  Args:
    num_features: the number of channels.
    num_groups: number of groups; must divide `num_features`.
    group_size: channels per group; must divide `num_features`.
    feature_axes: the channel axis, an int (default -1; flax nnx fixes it at -1).
    reduction_axes: axes pooled with each group; default (None) every axis but 0 and the channels.
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, stats_method,
      use_fast_variance, rngs, bias_metadata, scale_metadata: as in `LayerNorm`.

  Example:
    >>> import jax, normjax.nnx as njn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    >>> njn.GroupNorm(8, num_groups=2)(x).shape
    (2, 4, 4, 8)

  References:
    Wu & He 2018, arXiv:1803.08494.
  """

  _KIND = "group"

  def __init__(
    self,
    num_features: int,
    num_groups: Optional[int] = None,
    group_size: Optional[int] = None,
    *,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _common.ZEROS,
    scale_init: Any = _common.ONES,
    feature_axes: int = -1,
    reduction_axes: Optional[validation.Axes] = None,
    stats_method: str = "shifted",
    use_fast_variance: Optional[bool] = None,
    rngs: Optional[nnx.Rngs] = None,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    self._setup(locals(), num_features=num_features, feature_axes=feature_axes, rngs=rngs, fixed={})
    (channels,) = _common.feature_shape(num_features, feature_axes, "normjax.nnx.GroupNorm")
    if channels % (num_groups or group_size):
      what = f"num_groups={num_groups}" if num_groups is not None else f"group_size={group_size}"
      raise ValueError(f"normjax.nnx.GroupNorm: {what} must divide num_features={num_features}")


class InstanceNorm(_FeatureNorm):
  """Instance Normalization (`normjax.instance_norm`) as a flax nnx module.

  Args:
    num_features: the number of channels.
    feature_axes: the channel axis, an int (default -1; flax nnx's name).
    reduction_axes: default (None) every axis but 0 and the channels (flax nnx's behaviour).
    epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, stats_method,
      use_fast_variance, rngs, bias_metadata, scale_metadata: as in `LayerNorm`.

  Example:
    >>> import jax, normjax.nnx as njn
    >>> njn.InstanceNorm(3)(jax.random.normal(jax.random.key(0), (2, 4, 4, 3))).shape
    (2, 4, 4, 3)

  References:
    Ulyanov, Vedaldi & Lempitsky 2016, arXiv:1607.08022.
  """

  _KIND = "instance"

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = 1e-5,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _common.ZEROS,
    scale_init: Any = _common.ONES,
    feature_axes: int = -1,
    reduction_axes: Optional[validation.Axes] = None,
    stats_method: str = "shifted",
    use_fast_variance: Optional[bool] = None,
    rngs: Optional[nnx.Rngs] = None,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    scale_metadata: Mapping[str, Any] = _EMPTY,
  ):
    if not isinstance(feature_axes, int) or isinstance(feature_axes, bool):
      raise ValueError(
        f"normjax.nnx.InstanceNorm: feature_axes={feature_axes!r} must be a single "
        "channel axis (an int)"
      )
    self._setup(
      locals(),
      num_features=num_features,
      feature_axes=feature_axes,
      rngs=rngs,
      fixed={"num_groups": None, "group_size": None},
    )

  def _fixed(self):
    return {"num_groups": None, "group_size": None}
