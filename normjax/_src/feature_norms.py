"""Layer, group, instance and RMS normalization: per-example statistics on the one kernel `moments`.

All four are stateless (`EmptyState()`), compute their statistics in float32 (float64 for float64 input)
whatever the input dtype, return the input dtype unless `dtype` says otherwise, and accept a boolean
`mask` whose False elements do not count in the statistics (they are still normalized and returned).
Epsilon is added to the (biased) variance, or to the mean square for RMS norm, inside the square root:
`(x − μ) / sqrt(σ² + ε)`. Every layer defaults to `epsilon=1e-5` (PyTorch's value; flax uses 1e-6), the
same default as `normjax.batch_norm`.

Equivalences (held by the tests): `layer_norm(reduction_axes=(1, 2, 3))` on NHWC input equals
`group_norm(num_groups=1)`; `instance_norm()` equals `group_norm(group_size=1)`.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from normjax._src import normalize as normalize_lib
from normjax._src import stats
from normjax._src import transform
from normjax._src import validation


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureNormConfig:
  """Options shared by the feature-axis norms; see `layer_norm`, `group_norm`, `rms_norm`."""

  kind: str  # "layer", "instance", "group" or "rms"
  reduction_axes: Any = -1
  feature_axes: Any = -1
  num_groups: Optional[int] = None
  group_size: Optional[int] = None
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    validation.check_positive(self.epsilon, "epsilon")
    if self.stats_method not in stats.METHODS:
      raise ValueError(f"stats_method={self.stats_method!r} must be one of {stats.METHODS}")
    if self.kind == "group":
      if (self.num_groups is None) == (self.group_size is None):
        raise ValueError(
          f"group_norm needs exactly one of num_groups={self.num_groups!r} and "
          f"group_size={self.group_size!r}"
        )
      for name in ("num_groups", "group_size"):
        value = getattr(self, name)
        if value is not None and (
          not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
          raise ValueError(f"{name}={value!r} must be a positive int")
      if not isinstance(self.feature_axes, int):
        raise ValueError(
          f"axis={self.feature_axes!r}: group_norm takes a single channel axis (an int)"
        )


def _layout(config: FeatureNormConfig, shape):
  """(reduction axes, feature axes, number of groups or None) for an input of `shape`."""
  ndim = len(shape)
  if config.kind in ("layer", "rms"):
    return (
      validation.normalize_axes(config.reduction_axes, ndim, "reduction_axes"),
      validation.normalize_axes(config.feature_axes, ndim, "feature_axes"),
      None,
    )
  (channel,) = validation.normalize_axes(config.feature_axes, ndim, "axis")
  if config.reduction_axes is None:  # every axis but the batch axis 0 and the channel axis
    reduce = tuple(a for a in range(min(1, ndim - 1), ndim) if a != channel)
  else:
    reduce = validation.normalize_axes(config.reduction_axes, ndim, "reduction_axes")
    if channel in reduce:
      raise ValueError(
        f"reduction_axes={config.reduction_axes!r} contains the channel axis "
        f"{config.feature_axes}; channels are pooled by the grouping"
      )
  if config.kind == "instance":
    return reduce, (channel,), None
  channels = shape[channel]
  if channels % (config.num_groups or config.group_size):
    what = (
      f"num_groups={config.num_groups}"
      if config.num_groups is not None
      else f"group_size={config.group_size}"
    )
    raise ValueError(
      f"{what} must divide the number of channels {channels} (axis {channel} of an "
      f"input of shape {tuple(shape)})"
    )
  groups = config.num_groups if config.num_groups is not None else channels // config.group_size
  return reduce, (channel,), groups


def _init(config: FeatureNormConfig, x):
  validation.check_float_input(jax.ShapeDtypeStruct(x.shape, x.dtype), "x")
  _, features, _ = _layout(config, x.shape)
  feature_shape = tuple(x.shape[a] for a in features)
  params = {}
  if config.use_scale:
    params["scale"] = jnp.ones(feature_shape, config.param_dtype)
  if config.use_bias and config.kind != "rms":
    params["bias"] = jnp.zeros(feature_shape, config.param_dtype)
  return params, transform.EmptyState()


def _check_params(config, params, feature_shape):
  expected = {"scale"} if config.use_scale else set()
  if config.use_bias and config.kind != "rms":
    expected.add("bias")
  if not isinstance(params, dict) or set(params) != expected:
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"params has keys {keys}; expected {sorted(expected)}")
  for name, value in params.items():
    validation.check_array(value, feature_shape, config.param_dtype, f"params[{name!r}]")


def _split_channel(a, channel, groups):
  """Splits axis `channel` of `a` into (groups, channels // groups); a size-1 axis into (1, 1)."""
  size = a.shape[channel]
  split = (groups, size // groups) if size != 1 else (1, 1)
  return a.reshape(a.shape[:channel] + split + a.shape[channel + 1 :])


def _apply(config: FeatureNormConfig, params, state, x, *, training, mask=None):
  training = transform.check_training_flag(training)
  del training  # the same computation in training and evaluation
  if not isinstance(state, transform.EmptyState):
    raise TypeError(f"state is a {type(state).__name__}; expected normjax.EmptyState() from init")
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  reduce, features, groups = _layout(config, x.shape)
  feature_shape = tuple(x.shape[a] for a in features)
  _check_params(config, params, feature_shape)
  mask = validation.prepare_mask(mask, x.shape)
  bshape = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
  scale = params["scale"].reshape(bshape) if "scale" in params else None
  bias = params["bias"].reshape(bshape) if "bias" in params else None
  dtype = config.dtype or x.dtype
  if groups is not None:  # statistics per (example, group): pool the channels of a group
    (c,) = features
    xg = _split_channel(x, c, groups)
    mask_g = None if mask is None else _split_channel(mask, c, groups)
    reduce_g = tuple(a if a < c else a + 1 for a in reduce) + (c + 1,)
    mean, var, _ = stats.moments_and_count(
      xg, tuple(sorted(reduce_g)), mask=mask_g, method=config.stats_method
    )
    split = lambda p: None if p is None else _split_channel(p, c, groups)  # noqa: E731
    y = normalize_lib.normalize(
      xg, mean, var, split(scale), split(bias), epsilon=config.epsilon, dtype=dtype
    )
    return y.reshape(x.shape), state
  mean, var, _ = stats.moments_and_count(x, reduce, mask=mask, method=config.stats_method)
  if config.kind == "rms":  # mean square = variance + squared mean (no cancellation)
    mean, var = jnp.zeros_like(mean), var + jnp.square(mean)
  y = normalize_lib.normalize(x, mean, var, scale, bias, epsilon=config.epsilon, dtype=dtype)
  return y, state


def from_config(config: FeatureNormConfig) -> transform.Transform:
  """The `Transform` of a validated `FeatureNormConfig` (used by the Flax wrappers)."""
  return transform.Transform(
    init=functools.partial(_init, config), apply=functools.partial(_apply, config)
  )


def layer_norm(
  *,
  reduction_axes: validation.Axes = -1,
  feature_axes: validation.Axes = -1,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  use_bias: bool = True,
  stats_method: str = "shifted",
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Layer Normalization: `y = scale * (x − μ) / sqrt(σ² + epsilon) + bias`, per example.

  μ and σ² (biased) are taken over `reduction_axes` separately for every position of the other axes;
  `scale` and `bias` have the shape of `feature_axes`. The defaults (`-1`, `-1`) are flax's and the
  Transformer's: normalize each vector of the last axis. `reduction_axes=(1, 2, 3)` on NHWC input is the
  paper's convolutional layer norm, equal to `group_norm(num_groups=1)`.

  Args:
    reduction_axes: axes the statistics are taken over.
    feature_axes: axes that `scale` and `bias` span.
    epsilon: added to the variance inside the square root (default 1e-5; flax's is 1e-6).
    use_scale, use_bias: learn `scale` (init 1) and `bias` (init 0).
    stats_method: "shifted" (default), "two_pass" or "fast" (see `normjax.moments`).
    dtype: output dtype (default: the input's); statistics are float32 (float64 for float64 input).
    param_dtype: dtype of `scale` and `bias`.

  Returns:
    A `Transform`: `init(x) -> (params, EmptyState())`,
    `apply(params, state, x, *, training, mask=None) -> (y, state)` (`training` is checked, unused).

  Raises:
    ValueError: epsilon <= 0; at trace time an axis out of range, a mask that does not broadcast, or
      params that do not match `x`.
    TypeError: integer `x`, a non-boolean mask, or a non-bool `training`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax
    >>> ln = normjax.layer_norm()
    >>> x = jax.random.normal(jax.random.key(0), (4, 16)) * 3.0 + 2.0
    >>> params, state = ln.init(x)
    >>> y, _ = ln.apply(params, state, x, training=False)
    >>> bool(jnp.allclose(y.mean(-1), 0.0, atol=1e-5))
    True

  References:
    Ba, Kiros & Hinton 2016, "Layer Normalization", arXiv:1607.06450.
  """
  return from_config(
    FeatureNormConfig(
      kind="layer",
      reduction_axes=reduction_axes,
      feature_axes=feature_axes,
      epsilon=epsilon,
      use_scale=use_scale,
      use_bias=use_bias,
      stats_method=stats_method,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  )


def group_norm(
  num_groups: Optional[int] = None,
  group_size: Optional[int] = None,
  *,
  axis: int = -1,
  reduction_axes: Optional[validation.Axes] = None,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  use_bias: bool = True,
  stats_method: str = "shifted",
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Group Normalization: the channels are split into groups of consecutive channels and each example is
  normalized by the statistics of each group, pooled over `reduction_axes`.

  Give exactly one of `num_groups` (the paper's G, default 32 there) and `group_size` (channels per
  group). `num_groups=1` is layer norm over every non-batch axis; `group_size=1` is instance norm.

  Args:
    num_groups: number of groups G; must divide the number of channels.
    group_size: channels per group; must divide the number of channels.
    axis: the channel axis (default -1, channels last); `scale` and `bias` are per channel.
    reduction_axes: the other axes pooled with each group; default (None): every axis except the batch
      axis 0 and `axis` (flax's default).
    epsilon: added to the group variance inside the square root (default 1e-5, the paper's and
      PyTorch's; flax's is 1e-6).
    use_scale, use_bias, stats_method, dtype, param_dtype: as in `layer_norm`.

  Returns:
    A stateless `Transform` (see `layer_norm`).

  Raises:
    ValueError: neither or both of `num_groups`/`group_size`, or not positive ints; at trace time a
      group count or size that does not divide the channels, `reduction_axes` containing `axis`, or an
      axis out of range.

  Example:
    >>> import jax, normjax
    >>> gn = normjax.group_norm(num_groups=2)
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
    >>> params, state = gn.init(x)
    >>> y, _ = gn.apply(params, state, x, training=True)
    >>> y.shape
    (2, 5, 5, 8)

  References:
    Wu & He 2018, "Group Normalization", arXiv:1803.08494.
  """
  return from_config(
    FeatureNormConfig(
      kind="group",
      reduction_axes=reduction_axes,
      feature_axes=axis,
      num_groups=num_groups,
      group_size=group_size,
      epsilon=epsilon,
      use_scale=use_scale,
      use_bias=use_bias,
      stats_method=stats_method,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  )


def instance_norm(
  *,
  axis: int = -1,
  reduction_axes: Optional[validation.Axes] = None,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  use_bias: bool = True,
  stats_method: str = "shifted",
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Instance Normalization: each channel of each example normalized over the spatial axes.

  Equal to `group_norm(group_size=1)`. `scale` and `bias` are per channel (PyTorch's `affine=True`).

  Args:
    axis: the channel axis (default -1).
    reduction_axes: default (None) every axis except 0 and `axis`.
    epsilon, use_scale, use_bias, stats_method, dtype, param_dtype: as in `layer_norm`.

  Returns:
    A stateless `Transform` (see `layer_norm`).

  Example:
    >>> import jax, normjax
    >>> inorm = normjax.instance_norm()
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> params, state = inorm.init(x)
    >>> y, _ = inorm.apply(params, state, x, training=False)

  References:
    Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization", arXiv:1607.08022.
  """
  if not isinstance(axis, int):
    raise ValueError(f"axis={axis!r}: instance_norm takes a single channel axis (an int)")
  return from_config(
    FeatureNormConfig(
      kind="instance",
      reduction_axes=reduction_axes,
      feature_axes=axis,
      epsilon=epsilon,
      use_scale=use_scale,
      use_bias=use_bias,
      stats_method=stats_method,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  )


def rms_norm(
  *,
  reduction_axes: validation.Axes = -1,
  feature_axes: validation.Axes = -1,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  stats_method: str = "shifted",
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Root Mean Square Layer Normalization: `y = scale * x / sqrt(mean(x²) + epsilon)`, no centering.

  The mean square over `reduction_axes` is formed from `normjax.moments` as `σ² + μ²`, which adds two
  non-negative terms and so keeps full precision. No bias (as the paper and flax's `RMSNorm`).

  Args:
    reduction_axes, feature_axes: as in `layer_norm` (default: the last axis).
    epsilon: added to the mean square inside the square root (default 1e-5; flax's is 1e-6).
    use_scale, stats_method, dtype, param_dtype: as in `layer_norm`.

  Returns:
    A stateless `Transform` (see `layer_norm`); params hold `scale` only.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> rms = normjax.rms_norm()
    >>> x = jnp.array([[3.0, 4.0]])
    >>> params, state = rms.init(x)
    >>> y, _ = rms.apply(params, state, x, training=False)
    >>> [round(float(v), 3) for v in y[0]]
    [0.849, 1.131]

  References:
    Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.
  """
  return from_config(
    FeatureNormConfig(
      kind="rms",
      reduction_axes=reduction_axes,
      feature_axes=feature_axes,
      epsilon=epsilon,
      use_scale=use_scale,
      use_bias=False,
      stats_method=stats_method,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  )
