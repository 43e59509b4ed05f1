"""Reference-batch virtual BatchNorm (Salimans et al. 2016, arXiv:1606.03498, §3.4)."""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import normalize as normalize_lib
from normjax._src import state_types
from normjax._src import stats
from normjax._src import transform
from normjax._src import validation


@state_types.registered_state
class VirtualBatchNormState(NamedTuple):
  """Statistics of the fixed reference batch (float32)."""

  mean: jax.Array  # f32[*feature_shape]: reference mean
  var: jax.Array  # f32[*feature_shape]: reference biased variance
  count: jax.Array  # f32[*feature_shape]: number of reference elements per feature


@dataclasses.dataclass(frozen=True, kw_only=True)
class VirtualBatchNormConfig:
  """Options of `virtual_batch_norm`, validated at construction; see there."""

  axis: validation.Axes = -1
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


def _feature_layout(config, ndim):
  axes = validation.normalize_axes(config.axis, ndim, "axis")
  if 0 in axes:
    raise ValueError(
      f"axis={config.axis!r} includes the batch axis 0; virtual BN normalizes each "
      "example of axis 0 with the reference batch"
    )
  return axes


def _init(config, reference, *, mask=None):
  validation.check_float_input(reference, "reference")
  reference = jnp.asarray(reference)
  axes = _feature_layout(config, reference.ndim)
  reduce_axes = tuple(a for a in range(reference.ndim) if a not in axes)
  mean, var, count = stats.moments_and_count(
    reference, reduce_axes, mask=mask, method=config.stats_method
  )
  feature_shape = tuple(reference.shape[a] for a in axes)
  params, _ = bn_lib.init_variables(
    feature_shape,
    use_scale=config.use_scale,
    use_bias=config.use_bias,
    param_dtype=config.param_dtype,
  )
  state = VirtualBatchNormState(
    *(v.reshape(feature_shape).astype(jnp.float32) for v in (mean, var, count))
  )
  return params, state


def _apply(config, params, state, x, *, training, mask=None):
  training = transform.check_training_flag(training)
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  axes = _feature_layout(config, x.ndim)
  feature_shape = tuple(x.shape[a] for a in axes)
  for name, value in list(params.items()) + list(zip(state._fields, state)):
    dtype = jnp.float32 if name in state._fields else config.param_dtype
    validation.check_array(value, feature_shape, dtype, name)
  bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  reduce_axes = tuple(a for a in range(1, x.ndim) if a not in axes)
  mean_x, var_x, count_x = stats.moments_and_count(
    x, reduce_axes, mask=mask, method=config.stats_method
  )
  _, mean, var = stats.merge_moments(
    state.count.reshape(bshape),
    state.mean.reshape(bshape),
    state.var.reshape(bshape),
    count_x,
    mean_x,
    var_x,
  )
  scale = params["scale"].reshape(bshape) if config.use_scale else None
  bias = params["bias"].reshape(bshape) if config.use_bias else None
  y = normalize_lib.normalize(
    x, mean, var, scale, bias, epsilon=config.epsilon, dtype=config.dtype or x.dtype
  )
  return y, state


def virtual_batch_norm(
  *,
  axis: validation.Axes = -1,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  use_bias: bool = True,
  stats_method: str = "shifted",
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Reference-batch virtual BN: each example is normalized with the statistics of the reference batch
  together with that example, so an example's output does not depend on the rest of its batch.

  `init(reference, mask=None)` computes the reference batch's statistics (count n_R, mean μ_R, variance
  σ²_R over every axis but `axis`) and keeps them fixed in the state. `apply` computes each example's own
  statistics over its non-batch, non-feature axes (count n_i, μ_i, σ²_i; for a dense layer n_i = 1) and
  normalizes it with the statistics of the union,
  `μ = (n_R μ_R + n_i μ_i)/n`, `σ² = (n_R σ²_R + n_i σ²_i)/n + n_R n_i (μ_i − μ_R)²/n²`, `n = n_R + n_i`.
  With one element per example this is the paper's weighting 1/(B+1) for the example and B/(B+1) for
  the reference. Training and evaluation compute the same thing; the state never changes.

  Example:
    >>> import jax, normjax
    >>> reference = jax.random.normal(jax.random.key(0), (64, 4))
    >>> vbn = normjax.virtual_batch_norm()
    >>> params, state = vbn.init(reference)
    >>> y, _ = vbn.apply(params, state, reference[:2], training=True)

  References:
    Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498.
  """
  return from_config(VirtualBatchNormConfig(**dict(locals())))


def from_config(config: "VirtualBatchNormConfig") -> transform.Transform:
  """The virtual BatchNorm `Transform` for a validated `VirtualBatchNormConfig` (used by the faces)."""
  return transform.Transform(
    init=functools.partial(_init, config), apply=functools.partial(_apply, config)
  )
