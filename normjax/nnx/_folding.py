"""Conv-BN folding for flax nnx: one `nnx.Conv` / `nnx.Linear` and the BatchNorm that follows it."""

from typing import Union

from flax import nnx

from normjax._src import folding
from normjax.nnx import _batch_norm
from normjax.nnx import _frozen_batch_norm
from normjax.nnx import _weights

_BATCH_NORMS = (_batch_norm.BatchNorm, _frozen_batch_norm.FrozenBatchNorm, nnx.BatchNorm)


def fold_batch_norm_pair(layer: Union[nnx.Conv, nnx.Linear], bn) -> Union[nnx.Conv, nnx.Linear]:
  """A copy of `layer` with the eval-mode BatchNorm `bn` that follows it folded into its kernel and bias.

  With running mean μ, variance σ², scale γ, bias β and epsilon ε, `bn(layer(x))` in evaluation mode
  equals `folded(x)` with `W' = W γ / sqrt(σ² + ε)` per output feature and
  `b' = (b − μ) γ / sqrt(σ² + ε) + β` (`normjax.fold_batch_norm`). The returned layer is a new
  `nnx.Conv` / `nnx.Linear` (with a bias even if `layer` had none); `layer` and `bn` are unchanged.
  Replace the pair by it in the model for inference.

  Args:
    layer: an `nnx.Conv` or `nnx.Linear` (features on the last axis of its output).
    bn: the `normjax.nnx.BatchNorm` (or subclass), `normjax.nnx.FrozenBatchNorm` or
      `flax.nnx.BatchNorm` applied to `layer`'s output, normalizing its last axis.

  Returns:
    The folded layer, of `layer`'s type.

  Raises:
    TypeError: `layer` is not an `nnx.Conv` / `nnx.Linear` (a `WeightStandardizedConv` is refused:
      its kernel is transformed before use), or `bn` is not one of the BatchNorms above.
    ValueError: `bn` normalizes another axis than the last, or its feature count is not the layer's
      number of outputs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    >>> bn = njn.BatchNorm(4, use_running_average=True)
    >>> x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    >>> folded = njn.fold_batch_norm_pair(conv, bn)
    >>> bool(jnp.allclose(folded(x), bn(conv(x)), atol=1e-5))
    True

  References:
    Jacob et al. 2018, arXiv:1712.05877 (§3.2, batch-norm folding).
  """
  if not isinstance(layer, (nnx.Conv, nnx.Linear)) or isinstance(
    layer, _weights.WeightStandardizedConv
  ):
    raise TypeError(
      f"layer is a {type(layer).__name__}; expected a flax.nnx.Conv or flax.nnx.Linear "
      "whose kernel is used as stored"
    )
  if not isinstance(bn, _BATCH_NORMS):
    raise TypeError(
      f"bn is a {type(bn).__name__}; expected a normjax.nnx.BatchNorm, "
      "normjax.nnx.FrozenBatchNorm or flax.nnx.BatchNorm"
    )
  if bn.axis not in (-1, (-1,)):
    raise ValueError(
      f"bn normalizes axis={bn.axis!r}; folding needs the last axis (axis=-1), where "
      f"the {type(layer).__name__} puts its output features"
    )
  bn_params = {k: getattr(bn, k)[...] for k in ("scale", "bias") if getattr(bn, k) is not None}
  bias = None if layer.bias is None else layer.bias[...]
  kernel, bias = folding.fold_batch_norm(
    layer.kernel[...],
    bias,
    bn_params,
    {"mean": bn.mean[...], "var": bn.var[...]},
    epsilon=bn.epsilon,
  )
  folded = nnx.clone(layer)
  folded.kernel[...] = kernel
  if folded.bias is None:
    folded.bias = nnx.Param(bias)
    folded.use_bias = True
  else:
    folded.bias[...] = bias
  return folded
