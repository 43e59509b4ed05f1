"""NNX modules that hold no arithmetic: they store variables and call the pure transforms."""

from flax import nnx
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib


class BatchNorm(nnx.Module):
  """`normjax.batch_norm` as an NNX module over one feature axis of size `num_features`.

  Keyword options are those of `normjax.batch_norm` (`axis` must name a single axis).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> layer = njn.BatchNorm(3, momentum=0.9)
    >>> y = layer(jnp.arange(12.0).reshape(4, 3), training=True)
    >>> int(layer.count[...])
    1
  """

  def __init__(self, num_features: int, *, rngs=None, **options):
    del rngs  # scale and bias are initialized to ones and zeros
    self.config = bn_lib.BatchNormConfig(**options)
    if not isinstance(self.config.axis, int):
      raise ValueError(f"axis={self.config.axis!r}: normjax.nnx.BatchNorm takes a single feature axis")
    params, state = bn_lib.init_variables((num_features,), use_scale=self.config.use_scale,
                                          use_bias=self.config.use_bias,
                                          param_dtype=self.config.param_dtype)
    self.scale = nnx.Param(params["scale"]) if "scale" in params else None
    self.bias = nnx.Param(params["bias"]) if "bias" in params else None
    self.mean = nnx.BatchStat(state.mean)
    self.var = nnx.BatchStat(state.var)
    self.count = nnx.BatchStat(state.count)

  def __call__(self, x, *, training: bool, mask=None):
    params = {k: getattr(self, k)[...] for k in ("scale", "bias") if getattr(self, k) is not None}
    state = bn_lib.BatchNormState(self.mean[...], self.var[...], self.count[...])
    y, new_state = bn_lib.from_config(self.config).apply(params, state, x, training=training, mask=mask)
    if training:
      self.mean[...], self.var[...], self.count[...] = new_state
    return y


class GhostBatchNorm(BatchNorm):
  """NNX `BatchNorm` with ghost batches (`ghost_batch_size`, default 128)."""

  def __init__(self, num_features: int, *, ghost_batch_size: int = 128, rngs=None, **options):
    super().__init__(num_features, ghost_batch_size=ghost_batch_size, rngs=rngs, **options)


class BatchRenorm(BatchNorm):
  """NNX `BatchNorm` with Batch Renormalization (`r_max`, `d_max` numbers or schedules)."""

  def __init__(self, num_features: int, *, rngs=None, **options):
    super().__init__(num_features, renorm=True, rngs=rngs, **options)
