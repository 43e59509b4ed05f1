"""Frozen BatchNorm: fixed running statistics, optionally trainable affine parameters."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import normalize as normalize_lib
from normjax._src import transform
from normjax._src import validation


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrozenBatchNormConfig:
  """Options of `frozen_batch_norm`; see there."""

  axis: validation.Axes = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  trainable_affine: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    validation.check_positive(self.epsilon, "epsilon")


def _apply(config, params, state, x, *, training, mask=None):
  training = transform.check_training_flag(training)
  del mask  # statistics are not computed: nothing to mask
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  axes = validation.normalize_axes(config.axis, x.ndim, "axis")
  feature_shape = tuple(x.shape[a] for a in axes)
  bn_lib.check_variables(config, params, state, feature_shape)
  bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  frozen = (lambda p: p) if config.trainable_affine else jax.lax.stop_gradient
  scale = frozen(params["scale"]).reshape(bshape) if config.use_scale else None
  bias = frozen(params["bias"]).reshape(bshape) if config.use_bias else None
  mean, var = (jax.lax.stop_gradient(v).reshape(bshape) for v in (state.mean, state.var))
  y = normalize_lib.normalize(
    x, mean, var, scale, bias, epsilon=config.epsilon, dtype=config.dtype or x.dtype
  )
  return y, state


def from_config(config: FrozenBatchNormConfig) -> transform.Transform:
  return transform.Transform(
    init=functools.partial(bn_lib.init_for_config, config), apply=functools.partial(_apply, config)
  )


def frozen_batch_norm(
  *,
  axis: validation.Axes = -1,
  epsilon: float = 1e-5,
  use_scale: bool = True,
  use_bias: bool = True,
  trainable_affine: bool = True,
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """BatchNorm with frozen running statistics: `y = scale * (x − mean) / sqrt(var + epsilon) + bias`.

  The running `mean` and `var` (a `BatchNormState`, so a trained `batch_norm`'s state loads unchanged)
  are used in training and evaluation alike and never updated; no gradient flows into them. `scale`
  and `bias` stay trainable unless `trainable_affine=False` (then they receive zero gradient too): the
  fine-tuning and detection setting (Detectron2's `FrozenBatchNorm2d`, with small per-device batches).

  Args:
    axis: feature axis or axes (default -1).
    epsilon: added to the running variance inside the square root.
    use_scale, use_bias: whether `scale` / `bias` exist.
    trainable_affine: whether gradients flow into `scale` and `bias`.
    dtype, param_dtype: output dtype (default the input's) and dtype of `scale` / `bias`.

  Returns:
    A `Transform`: `init(x) -> (params, BatchNormState)` (mean 0, var 1, count 0),
    `apply(params, state, x, *, training, mask=None) -> (y, state)` with `state` returned unchanged.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> fbn = normjax.frozen_batch_norm()
    >>> params, state = fbn.init(jnp.ones((2, 3)))
    >>> state = state._replace(mean=jnp.full((3,), 1.0), var=jnp.full((3,), 4.0))
    >>> y, state = fbn.apply(params, state, jnp.full((2, 3), 3.0), training=True)
    >>> round(float(y[0, 0]), 4)
    1.0

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167 (inference-mode BN); Wu et al., Detectron2 (FrozenBatchNorm2d).
  """
  options = dict(locals())
  return from_config(FrozenBatchNormConfig(**options))
