"""`normjax.frozen_batch_norm` as a flax nnx module with `normjax.nnx.BatchNorm`'s variables."""

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

from flax import nnx
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import frozen_batch_norm as fbn_lib
from normjax._src import validation
from normjax.nnx import _batch_norm
from normjax.nnx import _common

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class FrozenBatchNorm(nnx.Module):
  """BatchNorm with frozen statistics (`normjax.frozen_batch_norm`) as a flax nnx module.

  Variables are `normjax.nnx.BatchNorm`'s (`scale`, `bias`, `mean`, `var`, `count`), so the state of a
  trained BatchNorm, normjax's or flax's, loads with `nnx.update`, or use `from_batch_norm`. The running
  statistics are used in every mode and never change; `scale` / `bias` train unless
  `trainable_affine=False`.

  Args:
    num_features: size of the feature `axis` (a tuple of sizes when `axis` is a tuple).
    axis, epsilon, use_scale, use_bias, trainable_affine, dtype, param_dtype: the options of
      `normjax.frozen_batch_norm`.
    scale_init, bias_init, scale_metadata, bias_metadata, rngs: as in `normjax.nnx.BatchNorm`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> layer = njn.FrozenBatchNorm(3)
    >>> layer.mean[...], layer.var[...] = jnp.full((3,), 1.0), jnp.full((3,), 4.0)
    >>> float(layer(jnp.full((2, 3), 3.0))[0, 0])  # (3 - 1) / sqrt(4 + 1e-5)
    0.9999987483024597

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Wu et al., Detectron2 (FrozenBatchNorm2d).
  """

  def __init__(
    self,
    num_features: Union[int, Sequence[int]],
    *,
    axis: validation.Axes = -1,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    trainable_affine: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scale_init: Any = _common.ONES,
    bias_init: Any = _common.ZEROS,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    rngs: Optional[nnx.Rngs] = None,
  ):
    layer = "normjax.nnx.FrozenBatchNorm"
    config = _common.config_from(fbn_lib.FrozenBatchNormConfig, locals(), layer)
    shape = _common.feature_shape(num_features, config.axis, layer)
    self.num_features = num_features
    _common.store_options(self, config)
    _, state = bn_lib.init_variables(shape, use_scale=False, use_bias=False)
    self.mean = nnx.BatchStat(state.mean)
    self.var = nnx.BatchStat(state.var)
    self.count = _batch_norm.BatchCount(state.count)
    _common.affine(
      self,
      shape,
      use_scale=use_scale,
      use_bias=use_bias,
      scale_init=scale_init,
      bias_init=bias_init,
      param_dtype=param_dtype,
      rngs=rngs,
      scale_metadata=scale_metadata,
      bias_metadata=bias_metadata,
      layer=layer,
    )

  @classmethod
  def from_batch_norm(cls, bn, *, trainable_affine: bool = True) -> "FrozenBatchNorm":
    """A FrozenBatchNorm with `bn`'s options and a copy of its variables (a normjax or flax nnx
    BatchNorm).

    Example:
      >>> from flax import nnx
      >>> import normjax.nnx as njn
      >>> frozen = njn.FrozenBatchNorm.from_batch_norm(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    """
    if not isinstance(bn, (_batch_norm.BatchNorm, nnx.BatchNorm)):
      raise TypeError(
        f"bn is a {type(bn).__name__}; expected a normjax.nnx.BatchNorm or a flax.nnx.BatchNorm"
      )
    frozen = cls(
      bn.num_features,
      axis=bn.axis,
      epsilon=bn.epsilon,
      use_scale=bn.use_scale,
      use_bias=bn.use_bias,
      trainable_affine=trainable_affine,
      dtype=bn.dtype,
      param_dtype=bn.param_dtype,
    )
    nnx.update(frozen, nnx.clone(nnx.state(bn)))
    return frozen

  @property
  def config(self) -> fbn_lib.FrozenBatchNormConfig:
    """The core configuration built from the current attributes (validated)."""
    return _common.build_config(self, fbn_lib.FrozenBatchNormConfig)

  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes `x` with the stored statistics (the mode flags are checked and ignored)."""
    _common.stateless_mode(use_running_average, training, "normjax.nnx.FrozenBatchNorm")
    state = bn_lib.BatchNormState(self.mean[...], self.var[...], self.count[...])
    y, _ = fbn_lib.from_config(self.config).apply(
      _common.affine_params(self), state, x, training=False, mask=mask
    )
    return y
