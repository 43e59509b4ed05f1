"""Conv-BN folding for inference: a BatchNorm's running statistics and affine parameters merged into the
preceding Conv or Dense kernel and bias.

With running mean μ, variance σ², scale γ and bias β, an eval-mode BatchNorm after `z = x ⊛ W + b` is
`γ (z − μ) / sqrt(σ² + ε) + β = x ⊛ W' + b'` with `W' = W · γ / sqrt(σ² + ε)` (per output feature) and
`b' = (b − μ) γ / sqrt(σ² + ε) + β`. Both are computed by `normjax.normalize`, the arithmetic BatchNorm
itself evaluates with.
"""

from typing import Mapping

import jax.numpy as jnp

from normjax._src import normalize as normalize_lib
from normjax._src import validation


def _get(tree, name):
  return tree[name] if isinstance(tree, Mapping) else getattr(tree, name)


def fold_batch_norm(kernel, bias, bn_params, bn_state, *, epsilon: float = 1e-5):
  """Folds one eval-mode BatchNorm into the preceding layer's `kernel` (outputs on its last axis).

  Args:
    kernel: the Conv or Dense kernel, flax layout (`(in, out)` or `(h, w, in, out)`).
    bias: its bias of shape `(out,)`, or None for a layer without bias.
    bn_params: mapping with the BatchNorm's optional `scale` and `bias` of shape `(out,)`.
    bn_state: the running statistics, a `BatchNormState` or a mapping with `mean` and `var`.
    epsilon: the BatchNorm's epsilon.

  Returns:
    `(kernel, bias)` of the folded layer (the bias always present), in the kernel's dtype.

  Raises:
    ValueError: the BatchNorm's feature shape is not `(out,)` for the kernel's `out` outputs.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> state = normjax.BatchNormState(jnp.array([1.0]), jnp.array([4.0]), jnp.array(0))
    >>> k, b = normjax.fold_batch_norm(jnp.array([[2.0]]), None, {}, state, epsilon=1e-12)
    >>> float(k[0, 0]), float(b[0])
    (1.0, -0.5)

  References:
    Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (§3.2, batch-norm folding).
  """
  validation.check_positive(epsilon, "epsilon")
  kernel = jnp.asarray(kernel)
  validation.check_float_input(kernel, "kernel")
  out = kernel.shape[-1]
  mean, var = jnp.asarray(_get(bn_state, "mean")), jnp.asarray(_get(bn_state, "var"))
  for name, value in (("mean", mean), ("var", var)) + tuple(
    (f"bn_params[{k!r}]", jnp.asarray(v)) for k, v in dict(bn_params).items()
  ):
    if value.shape != (out,):
      raise ValueError(
        f"BatchNorm {name} has shape {value.shape}; folding needs ({out},), the "
        f"features of the preceding kernel of shape {kernel.shape} (its last axis)"
      )
  scale, beta = dict(bn_params).get("scale"), dict(bn_params).get("bias")
  bias = jnp.zeros((out,), kernel.dtype) if bias is None else jnp.asarray(bias)
  if bias.shape != (out,):
    raise ValueError(
      f"bias has shape {bias.shape}; expected ({out},) for a kernel of shape {kernel.shape}"
    )
  new_kernel = normalize_lib.normalize(
    kernel, jnp.zeros_like(mean), var, scale, None, epsilon=epsilon
  )
  new_bias = normalize_lib.normalize(
    bias, mean, var, scale, beta, epsilon=epsilon, dtype=kernel.dtype
  )
  return new_kernel, new_bias
