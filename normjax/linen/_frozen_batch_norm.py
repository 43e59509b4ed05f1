"""linen wrapper of `normjax.frozen_batch_norm`: statistics in `batch_stats`, never updated."""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import frozen_batch_norm as fbn_lib
from normjax._src import modes


class FrozenBatchNorm(nn.Module):
  """`normjax.frozen_batch_norm` as a linen module, with `normjax.linen.BatchNorm`'s variable layout.

  `scale` / `bias` live in `params`, `mean` / `var` (and `count`, when present) in `batch_stats`, so the
  variables of a trained `normjax.linen.BatchNorm` or `flax.linen.BatchNorm` load unchanged; the
  statistics are used whatever the mode and never change. The mode flags (`use_running_average`,
  `training`) are therefore optional; a given one is still type-checked.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.ones((4, 3))
    >>> variables = njl.FrozenBatchNorm().init(jax.random.key(0), x)
    >>> y = njl.FrozenBatchNorm().apply(variables, x, training=True)
  """

  use_running_average: Optional[bool] = None
  axis: Any = -1
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable = nn.initializers.zeros
  scale_init: Callable = nn.initializers.ones
  trainable_affine: bool = True

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes `x` with the stored statistics (never updated); the mode flags are only type-checked."""
    for name, flag in (
      ("use_running_average", self.use_running_average),
      ("use_running_average", use_running_average),
      ("training", training),
    ):
      modes.check_flag(flag, name)
    options = {
      f.name: getattr(self, f.name) for f in dataclasses.fields(fbn_lib.FrozenBatchNormConfig)
    }
    config = fbn_lib.FrozenBatchNormConfig(**options)
    feature_shape = tuple(jnp.shape(x)[a] for a in bn_lib.feature_axes(config, jnp.ndim(x)))
    params = {
      name: self.param(name, getattr(self, f"{name}_init"), feature_shape, self.param_dtype)
      for name in ("scale", "bias")
      if getattr(self, f"use_{name}")
    }
    mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32).value
    if self.is_initializing() or self.has_variable("batch_stats", "count"):
      count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32).value
    else:
      count = jnp.zeros((), jnp.int32)
    y, _ = fbn_lib.from_config(config).apply(
      params, bn_lib.BatchNormState(mean, var, count), x, training=False, mask=mask
    )
    return y
