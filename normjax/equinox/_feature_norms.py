"""Equinox faces of the stateless feature norms: Equinox's arguments, normjax's `feature_norms` core.

Like `eqx.nn.LayerNorm`, `GroupNorm` and `RMSNorm`, each layer sees one example (batches go through
`jax.vmap`), holds `weight` / `bias`, and is called as `layer(x)` (returns `y`) or `layer(x, state)`
(returns `(y, state)`, the state passed through) with an ignored `key=`. The statistics are the core's
(`normjax.moments`: float32 or better, the shifted one-pass variance by default, optional `mask=`).
"""

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from normjax._src import feature_norms as fn_lib
from normjax._src import transform
from normjax._src import validation
from normjax.equinox import _batch_norm

_NO_STATE = object()  # `state` not passed: return `y` alone, as Equinox's layers


def _shape_tuple(shape, layer) -> Tuple[int, ...]:
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
    raise ValueError(
      f"{layer}: shape={shape!r} must be a positive int or a sequence of positive ints"
    )
  return shape


def _param_dtype(dtype):
  return _batch_norm.default_floating_dtype() if dtype is None else jnp.dtype(dtype)


def _params(weight, bias):
  return {k: v for k, v in (("scale", weight), ("bias", bias)) if v is not None}


def _apply(config, params, x, state, mask):
  y, _ = fn_lib.from_config(config).apply(
    params, transform.EmptyState(), x, training=False, mask=mask
  )
  return y if state is _NO_STATE else (y, state)


def _check_shape(x, shape, layer):
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  if x.shape != shape:
    raise ValueError(
      f"{layer}: x has shape {x.shape}; expected shape={shape} (one example, as "
      "Equinox's layer: batches go through jax.vmap)"
    )
  return x


def _check_channels(x, channels, layer):
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  if x.ndim < 1 or (channels is not None and x.shape[0] != channels):
    raise ValueError(
      f"{layer}: x has shape {x.shape}; expected one example of shape ({channels}, ...) "
      "with the channels first"
    )
  return x


class LayerNorm(eqx.Module):
  """`normjax.layer_norm` with `eqx.nn.LayerNorm`'s arguments: statistics over the whole example.

  `LayerNorm(shape, eps, use_weight, use_bias, dtype)`: `x` must have shape `shape`; `weight` (init 1)
  and `bias` (init 0) have that shape and `dtype` (Equinox's default float32, float64 in 64-bit mode).
  `y = (x − μ) / sqrt(σ² + eps) · weight + bias` with μ, σ² (biased) over every element of `x`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.equinox as nje
    >>> layer = nje.LayerNorm((4, 3))
    >>> y = jax.vmap(layer)(jax.random.normal(jax.random.key(0), (2, 4, 3)) + 5.0)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0.0, atol=1e-5))
    True

  References:
    Ba, Kiros & Hinton 2016, "Layer Normalization", arXiv:1607.06450.
  """

  weight: Optional[jax.Array]
  bias: Optional[jax.Array]
  shape: Tuple[int, ...] = eqx.field(static=True)
  use_weight: bool = eqx.field(static=True)
  use_bias: bool = eqx.field(static=True)
  config: fn_lib.FeatureNormConfig = eqx.field(static=True)

  def __init__(
    self,
    shape: Union[int, Sequence[int]],
    eps: float = 1e-5,
    use_weight: bool = True,
    use_bias: bool = True,
    dtype=None,
    *,
    elementwise_affine: Optional[bool] = None,
    stats_method: str = "shifted",
    output_dtype=None,
  ):
    """Args: Equinox's (`elementwise_affine`, deprecated there, sets both flags); `stats_method` (see
    `normjax.moments`) and `output_dtype` (default: the input's) are normjax's."""
    self.shape = _shape_tuple(shape, "normjax.equinox.LayerNorm")
    if elementwise_affine is not None:
      use_weight = use_bias = elementwise_affine
    axes = tuple(range(len(self.shape)))
    self.config = fn_lib.FeatureNormConfig(
      kind="layer",
      reduction_axes=axes,
      feature_axes=axes,
      epsilon=eps,
      use_scale=use_weight,
      use_bias=use_bias,
      stats_method=stats_method,
      dtype=output_dtype,
      param_dtype=_param_dtype(dtype),
    )
    self.use_weight, self.use_bias = use_weight, use_bias
    self.weight = jnp.ones(self.shape, self.config.param_dtype) if use_weight else None
    self.bias = jnp.zeros(self.shape, self.config.param_dtype) if use_bias else None

  @property
  def eps(self) -> float:
    """Equinox's name for the core's `epsilon`."""
    return self.config.epsilon

  def __call__(self, x, state=_NO_STATE, *, key=None, mask=None):
    """`y`, or `(y, state)` when a state is passed; `mask` (boolean, broadcastable to `x`) drops
    elements from the statistics."""
    del key
    x = _check_shape(x, self.shape, "normjax.equinox.LayerNorm")
    return _apply(self.config, _params(self.weight, self.bias), x, state, mask)


class RMSNorm(eqx.Module):
  """`normjax.rms_norm` with `eqx.nn.RMSNorm`'s arguments: `x / sqrt(mean(x²) + eps) · weight + bias`.

  The mean square is over the whole example (`x.shape == shape`). As Equinox's, it has an optional
  `bias` (default on; the paper and `normjax.rms_norm` have none): it is added to the core's output in
  float32 (or float64), before the cast to the output dtype.

  Example:
    >>> import jax.numpy as jnp, normjax.equinox as nje
    >>> y = nje.RMSNorm(2)(jnp.array([3.0, 4.0]))
    >>> [round(float(v), 3) for v in y]
    [0.849, 1.131]

  References:
    Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv:1910.07467.
  """

  weight: Optional[jax.Array]
  bias: Optional[jax.Array]
  shape: Tuple[int, ...] = eqx.field(static=True)
  use_weight: bool = eqx.field(static=True)
  use_bias: bool = eqx.field(static=True)
  config: fn_lib.FeatureNormConfig = eqx.field(static=True)

  def __init__(
    self,
    shape: Union[int, Sequence[int]],
    eps: float = 1e-5,
    use_weight: bool = True,
    use_bias: bool = True,
    dtype=None,
    *,
    stats_method: str = "shifted",
    output_dtype=None,
  ):
    """Args: Equinox's; `stats_method` and `output_dtype` are normjax's (see `LayerNorm`)."""
    self.shape = _shape_tuple(shape, "normjax.equinox.RMSNorm")
    axes = tuple(range(len(self.shape)))
    self.config = fn_lib.FeatureNormConfig(
      kind="rms",
      reduction_axes=axes,
      feature_axes=axes,
      epsilon=eps,
      use_scale=use_weight,
      use_bias=False,
      stats_method=stats_method,
      dtype=output_dtype,
      param_dtype=_param_dtype(dtype),
    )
    self.use_weight, self.use_bias = use_weight, use_bias
    self.weight = jnp.ones(self.shape, self.config.param_dtype) if use_weight else None
    self.bias = jnp.zeros(self.shape, self.config.param_dtype) if use_bias else None

  @property
  def eps(self) -> float:
    """Equinox's name for the core's `epsilon`."""
    return self.config.epsilon

  def __call__(self, x, state=_NO_STATE, *, key=None, mask=None):
    """`y`, or `(y, state)` when a state is passed (see `LayerNorm`)."""
    del key
    x = _check_shape(x, self.shape, "normjax.equinox.RMSNorm")
    if self.bias is None:
      return _apply(self.config, _params(self.weight, None), x, state, mask)
    out_dtype = self.config.dtype or x.dtype
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = _apply(
      dataclasses.replace(self.config, dtype=acc), _params(self.weight, None), x, _NO_STATE, mask
    )
    y = (y + self.bias.astype(acc)).astype(out_dtype)
    return y if state is _NO_STATE else (y, state)


class GroupNorm(eqx.Module):
  """`normjax.group_norm` with `eqx.nn.GroupNorm`'s arguments: channels first, `groups` groups.

  `GroupNorm(groups, channels, eps, channelwise_affine, dtype)`: the channels (axis 0 of the example)
  are split into `groups` groups of consecutive channels; each group is normalized by its mean and
  (biased) variance over its channels and every other axis; `weight` / `bias` are per channel.
  `channels` may be None only without `channelwise_affine` (as Equinox).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.equinox as nje
    >>> layer = nje.GroupNorm(2, 4)
    >>> y = layer(jax.random.normal(jax.random.key(0), (4, 5, 5)))
    >>> bool(jnp.allclose(y[:2].mean(), 0.0, atol=1e-5))
    True

  References:
    Wu & He 2018, "Group Normalization", arXiv:1803.08494.
  """

  weight: Optional[jax.Array]
  bias: Optional[jax.Array]
  groups: int = eqx.field(static=True)
  channels: Optional[int] = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  config: fn_lib.FeatureNormConfig = eqx.field(static=True)

  def __init__(
    self,
    groups: int,
    channels: Optional[int] = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    dtype=None,
    *,
    stats_method: str = "shifted",
    output_dtype=None,
  ):
    """Args: Equinox's; `stats_method` and `output_dtype` are normjax's (see `LayerNorm`).

    Raises:
      ValueError: `groups` not a positive int or not dividing `channels`, or `channels=None` with
        `channelwise_affine=True`.
    """
    layer = "normjax.equinox.GroupNorm"
    self.config = fn_lib.FeatureNormConfig(
      kind="group",
      reduction_axes=None,
      feature_axes=0,
      num_groups=groups,
      epsilon=eps,
      use_scale=channelwise_affine,
      use_bias=channelwise_affine,
      stats_method=stats_method,
      dtype=output_dtype,
      param_dtype=_param_dtype(dtype),
    )
    if channels is not None and (
      not isinstance(channels, int) or channels < 1 or channels % groups
    ):
      raise ValueError(
        f"{layer}: groups={groups} must divide channels={channels!r} (a positive int)"
      )
    if channels is None and channelwise_affine:
      raise ValueError(
        f"{layer}: channels=None with channelwise_affine=True; give the number of "
        "channels (the parameters are per channel)"
      )
    self.groups, self.channels, self.channelwise_affine = groups, channels, channelwise_affine
    dtype = self.config.param_dtype
    self.weight = jnp.ones((channels,), dtype) if channelwise_affine else None
    self.bias = jnp.zeros((channels,), dtype) if channelwise_affine else None

  @property
  def eps(self) -> float:
    """Equinox's name for the core's `epsilon`."""
    return self.config.epsilon

  def __call__(self, x, state=_NO_STATE, *, key=None, mask=None):
    """`y`, or `(y, state)` when a state is passed (see `LayerNorm`)."""
    del key
    x = _check_channels(x, self.channels, "normjax.equinox.GroupNorm")
    return _apply(self.config, _params(self.weight, self.bias), x, state, mask)


class InstanceNorm(eqx.Module):
  """`normjax.instance_norm` in Equinox's style (Equinox has none; its equivalent is
  `eqx.nn.GroupNorm(channels, channels)`): each channel of the example normalized over the other axes.

  `InstanceNorm(channels, eps, channelwise_affine, dtype)`, arguments as `GroupNorm`'s.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.equinox as nje
    >>> y = nje.InstanceNorm(3)(jax.random.normal(jax.random.key(0), (3, 4, 4)) + 2.0)
    >>> bool(jnp.allclose(y.mean((1, 2)), 0.0, atol=1e-5))
    True

  References:
    Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization", arXiv:1607.08022.
  """

  weight: Optional[jax.Array]
  bias: Optional[jax.Array]
  channels: Optional[int] = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  config: fn_lib.FeatureNormConfig = eqx.field(static=True)

  def __init__(
    self,
    channels: Optional[int] = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    dtype=None,
    *,
    stats_method: str = "shifted",
    output_dtype=None,
  ):
    """Args: as `GroupNorm`'s, without `groups` (one group per channel)."""
    layer = "normjax.equinox.InstanceNorm"
    if channels is not None and (
      not isinstance(channels, int) or isinstance(channels, bool) or channels < 1
    ):
      raise ValueError(f"{layer}: channels={channels!r} must be a positive int")
    if channels is None and channelwise_affine:
      raise ValueError(
        f"{layer}: channels=None with channelwise_affine=True; give the number of "
        "channels (the parameters are per channel)"
      )
    self.config = fn_lib.FeatureNormConfig(
      kind="instance",
      reduction_axes=None,
      feature_axes=0,
      epsilon=eps,
      use_scale=channelwise_affine,
      use_bias=channelwise_affine,
      stats_method=stats_method,
      dtype=output_dtype,
      param_dtype=_param_dtype(dtype),
    )
    self.channels, self.channelwise_affine = channels, channelwise_affine
    dtype = self.config.param_dtype
    self.weight = jnp.ones((channels,), dtype) if channelwise_affine else None
    self.bias = jnp.zeros((channels,), dtype) if channelwise_affine else None

  @property
  def eps(self) -> float:
    """Equinox's name for the core's `epsilon`."""
    return self.config.epsilon

  def __call__(self, x, state=_NO_STATE, *, key=None, mask=None):
    """`y`, or `(y, state)` when a state is passed (see `LayerNorm`)."""
    del key
    x = _check_channels(x, self.channels, "normjax.equinox.InstanceNorm")
    return _apply(self.config, _params(self.weight, self.bias), x, state, mask)
