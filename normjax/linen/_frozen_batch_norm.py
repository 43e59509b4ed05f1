"""linen wrapper of `normjax.frozen_batch_norm`: statistics in `batch_stats`, never updated."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import frozen_batch_norm as fbn_lib


class FrozenBatchNorm(nn.Module):
  """`normjax.frozen_batch_norm` as a linen module, with `normjax.linen.BatchNorm`'s variable layout.

  `scale` / `bias` live in `params`, `mean` / `var` / `count` in `batch_stats` (so the variables of a
  trained `BatchNorm` load unchanged); the statistics are used whatever `training` says and never change.

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> x = jnp.ones((4, 3))
    >>> variables = njl.FrozenBatchNorm().init(jax.random.key(0), x, training=True)
    >>> y = njl.FrozenBatchNorm().apply(variables, x, training=True)
  """
  axis: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  trainable_affine: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, training: bool, mask=None):
    fbn = fbn_lib.from_config(fbn_lib.FrozenBatchNormConfig(
        self.axis, self.epsilon, self.use_scale, self.use_bias, self.trainable_affine, self.dtype,
        self.param_dtype))
    init_params, init_state = fbn.init(x)
    params = {k: self.param(k, lambda _, v=v: v) for k, v in init_params.items()}
    state = bn_lib.BatchNormState(**{k: self.variable("batch_stats", k, lambda v=v: v).value
                                     for k, v in init_state._asdict().items()})
    y, _ = fbn.apply(params, state, x, training=bool(training), mask=mask)
    return y
