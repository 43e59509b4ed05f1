"""Reference-batch virtual BatchNorm (`normjax.virtual_batch_norm`) as a flax nnx module."""

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

from flax import nnx
import jax.numpy as jnp

from normjax._src import validation
from normjax._src import virtual_batch_norm as vbn_lib
from normjax.nnx import _common

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class VirtualBatchNorm(nnx.Module):
  """Virtual BatchNorm (Salimans et al. 2016) as a flax nnx module: each example is normalized with the
  statistics of a fixed reference batch together with that example.

  The reference batch is given as `reference=` at construction or later with `set_reference`; its
  per-feature `mean`, biased `var` and element `count` (float32, `nnx.BatchStat`) never change in a
  call. Training and evaluation compute the same thing.

  Args:
    num_features: size of the feature `axis` (a tuple of sizes when `axis` is a tuple).
    reference: the reference batch (axis 0 is the batch), or None to set it later.
    reference_mask: optional boolean mask of `reference` (False elements do not count).
    axis, epsilon, use_scale, use_bias, stats_method, dtype, param_dtype: the options of
      `normjax.virtual_batch_norm`.
    use_fast_variance: flax's flag (None keeps `stats_method`).
    scale_init, bias_init, scale_metadata, bias_metadata, rngs: as in `normjax.nnx.BatchNorm`.

  Raises:
    ValueError: at call time when no reference batch was set.

  Example:
    >>> import jax, normjax.nnx as njn
    >>> reference = jax.random.normal(jax.random.key(0), (64, 4))
    >>> layer = njn.VirtualBatchNorm(4, reference=reference)
    >>> layer(reference[:2]).shape
    (2, 4)

  References:
    Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498, §3.4.
  """

  def __init__(
    self,
    num_features: Union[int, Sequence[int]],
    *,
    reference=None,
    reference_mask=None,
    axis: validation.Axes = -1,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    stats_method: str = "shifted",
    use_fast_variance: Optional[bool] = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scale_init: Any = _common.ONES,
    bias_init: Any = _common.ZEROS,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    rngs: Optional[nnx.Rngs] = None,
  ):
    layer = "normjax.nnx.VirtualBatchNorm"
    method = _common.stats_method(use_fast_variance, stats_method)
    config = _common.config_from(
      vbn_lib.VirtualBatchNormConfig, locals(), layer, stats_method=method
    )
    shape = _common.feature_shape(num_features, config.axis, layer)
    self.num_features = num_features
    self.use_fast_variance = use_fast_variance
    _common.store_options(self, config, stats_method=stats_method)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.count = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.has_reference = False
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
    if reference is not None:
      self.set_reference(reference, mask=reference_mask)

  @property
  def config(self) -> vbn_lib.VirtualBatchNormConfig:
    """The core configuration built from the current attributes (validated)."""
    return _common.build_config(self, vbn_lib.VirtualBatchNormConfig)

  def set_reference(self, reference, *, mask=None) -> None:
    """Computes and stores the statistics of the reference batch (weights unchanged).

    Raises:
      ValueError: the reference's feature shape is not the layer's.
    """
    _, state = vbn_lib.from_config(self.config).init(reference, mask=mask)
    if state.mean.shape != self.mean[...].shape:
      raise ValueError(
        f"reference of shape {jnp.shape(reference)} has features of shape "
        f"{state.mean.shape} on axis={self.axis!r}; the layer has "
        f"{self.mean[...].shape} (num_features={self.num_features!r})"
      )
    self.mean[...], self.var[...], self.count[...] = state
    self.has_reference = True

  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes each example of `x` with the reference batch plus that example.

    Args:
      x: float input, axis 0 the batch.
      use_running_average, training: checked (bools, not both) and ignored.
      mask: optional boolean mask of `x`'s elements.
    """
    _common.stateless_mode(use_running_average, training, "normjax.nnx.VirtualBatchNorm")
    if not self.has_reference:
      raise ValueError(
        "normjax.nnx.VirtualBatchNorm has no reference batch: pass reference= to the "
        "constructor or call layer.set_reference(reference_batch) first"
      )
    state = vbn_lib.VirtualBatchNormState(self.mean[...], self.var[...], self.count[...])
    y, _ = vbn_lib.from_config(self.config).apply(
      _common.affine_params(self), state, x, training=False, mask=mask
    )
    return y
