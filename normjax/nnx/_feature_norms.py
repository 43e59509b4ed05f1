"""NNX wrappers of the stateless feature-axis norms: `nnx.Param` for scale/bias, no arithmetic."""

from flax import nnx
import jax
import jax.numpy as jnp

from normjax._src import feature_norms as fn_lib
from normjax._src import transform


class _FeatureNorm(nnx.Module):
  """Holds `scale` / `bias` of shape `(num_features,)` and calls the pure transform."""
  _kind = "layer"

  def __init__(self, num_features: int, *, rngs=None, **options):
    del rngs  # scale and bias are initialized to ones and zeros
    self.config = self._make_config(**options)
    params, _ = fn_lib.from_config(self.config).init(self._probe(num_features))
    self.scale = nnx.Param(params["scale"]) if "scale" in params else None
    self.bias = nnx.Param(params["bias"]) if "bias" in params else None

  def _make_config(self, **options):
    return fn_lib.FeatureNormConfig(self._kind, **options)

  def _probe(self, num_features):
    """A stand-in input whose feature axes have the parameter shape (single feature axis, last)."""
    return jax.ShapeDtypeStruct((2, num_features), jnp.float32)

  def __call__(self, x, *, training: bool, mask=None):
    del training  # stateless
    params = {k: getattr(self, k)[...] for k in ("scale", "bias") if getattr(self, k) is not None}
    y, _ = fn_lib.from_config(self.config).apply(params, transform.EmptyState(), x, training=False,
                                                 mask=mask)
    return y


class LayerNorm(_FeatureNorm):
  """`normjax.layer_norm` over the last axis as an NNX module (options: those of `layer_norm` except the
  axes).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.LayerNorm(3)(jnp.arange(6.0).reshape(2, 3), training=False)
  """
  _kind = "layer"


class RMSNorm(_FeatureNorm):
  """`normjax.rms_norm` over the last axis as an NNX module (scale only).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.RMSNorm(3)(jnp.arange(6.0).reshape(2, 3), training=False)
  """
  _kind = "rms"

  def _make_config(self, **options):
    return fn_lib.FeatureNormConfig("rms", **{"use_bias": False, **options})


class GroupNorm(_FeatureNorm):
  """`normjax.group_norm` (channels last) as an NNX module: give `num_groups` or `group_size`.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.GroupNorm(8, num_groups=2)(jnp.ones((2, 4, 4, 8)), training=False)
  """

  def __init__(self, num_features: int, *, num_groups=None, group_size=None, rngs=None, **options):
    super().__init__(num_features, num_groups=num_groups, group_size=group_size, rngs=rngs,
                     reduction_axes=None, **options)

  def _make_config(self, **options):
    return fn_lib.FeatureNormConfig("group", **options)


class InstanceNorm(_FeatureNorm):
  """`normjax.instance_norm` (channels last) as an NNX module.

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.InstanceNorm(3)(jnp.ones((2, 4, 4, 3)), training=False)
  """

  def __init__(self, num_features: int, *, rngs=None, **options):
    super().__init__(num_features, rngs=rngs, reduction_axes=None, **options)

  def _make_config(self, **options):
    return fn_lib.FeatureNormConfig("instance", **options)
