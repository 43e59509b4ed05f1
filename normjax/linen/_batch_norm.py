"""linen modules that hold no arithmetic: they store variables and call the pure transforms."""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import virtual_batch_norm as vbn_lib


class BatchNorm(nn.Module):
  """`normjax.batch_norm` as a linen module; fields mirror its options (see its docstring).

  `scale` and `bias` live in `params`; `mean`, `var` and `count` in the mutable `batch_stats` collection.
  `model.init` neither updates the statistics nor needs a bound `axis_name` (flax#1250): while
  initializing, the layer normalizes with the initial running statistics, whatever `training` says.
  When the collection `batch_moments` is mutable, a training call also stores the batch's per-feature
  `count`, `mean` and `var` there (population recalibration reads them).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> layer = njl.BatchNorm(momentum=0.9)
    >>> x = jnp.ones((8, 3))
    >>> variables = layer.init(jax.random.key(0), x, training=True)
    >>> y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  """
  axis: Any = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  debias: bool = False
  unbiased_running_var: bool = False
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  axis_name: Any = None
  axis_index_groups: Any = None
  ghost_batch_size: Optional[int] = None
  renorm: bool = False
  r_max: Any = 3.0
  d_max: Any = 5.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _config(self, **overrides) -> bn_lib.BatchNormConfig:
    names = [f.name for f in dataclasses.fields(bn_lib.BatchNormConfig)]
    return bn_lib.BatchNormConfig(**{**{n: getattr(self, n) for n in names}, **overrides})

  @nn.compact
  def __call__(self, x, *, training: bool, mask=None):
    initializing = self.is_initializing()
    config = self._config(axis_name=None, axis_index_groups=None) if initializing else self._config()
    bn = bn_lib.from_config(config)
    init_params, init_state = bn.init(x)
    params = {k: self.param(k, lambda _, v=v: v) for k, v in init_params.items()}
    stats = {k: self.variable("batch_stats", k, lambda v=v: v) for k, v in init_state._asdict().items()}
    state = bn_lib.BatchNormState(**{k: v.value for k, v in stats.items()})
    y, new_state, moments = bn_lib.apply_with_batch_moments(
        config, params, state, x, training=training and not initializing, mask=mask)
    if training and not initializing:
      for k, v in new_state._asdict().items():
        stats[k].value = v
      if self.is_mutable_collection("batch_moments"):  # read by normjax.recalibrate_batch_stats
        for k, v in zip(("count", "mean", "var"), moments):
          self.put_variable("batch_moments", k, v)
    return y


class GhostBatchNorm(BatchNorm):
  """`BatchNorm` with ghost batches of `ghost_batch_size` (default 128, Hoffer et al. 2017)."""
  ghost_batch_size: Optional[int] = 128


class BatchRenorm(BatchNorm):
  """`BatchNorm` with Batch Renormalization on (Ioffe 2017); `r_max`, `d_max` numbers or schedules."""
  renorm: bool = True


class VirtualBatchNorm(nn.Module):
  """`normjax.virtual_batch_norm` as a linen module: the batch given to `init` is the reference batch.

  Its statistics are stored in `batch_stats` and never change afterwards.

  Example:
    >>> import jax, normjax.linen as njl
    >>> reference = jax.random.normal(jax.random.key(0), (64, 4))
    >>> variables = njl.VirtualBatchNorm().init(jax.random.key(1), reference, training=False)
  """
  axis: Any = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, training: bool, mask=None):
    vbn = vbn_lib.virtual_batch_norm(axis=self.axis, epsilon=self.epsilon, use_scale=self.use_scale,
                                     use_bias=self.use_bias, stats_method=self.stats_method,
                                     dtype=self.dtype, param_dtype=self.param_dtype)
    if self.is_initializing():
      init_params, init_state = vbn.init(x, mask=mask)
    else:  # flax may still trace the initializers for their shapes
      init_params, init_state = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                       jax.eval_shape(vbn.init, x))
    params = {k: self.param(k, lambda _, k=k: init_params[k])
              for k in ("scale", "bias") if getattr(self, f"use_{k}")}
    fields = vbn_lib.VirtualBatchNormState._fields
    state = vbn_lib.VirtualBatchNormState(
        *(self.variable("batch_stats", k, lambda k=k: getattr(init_state, k)).value for k in fields))
    y, _ = vbn.apply(params, state, x, training=training, mask=mask)
    return y
