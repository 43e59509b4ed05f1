"""The normalization arithmetic on plain arrays, apart from any parameter or state bookkeeping."""

from typing import Optional

import jax
import jax.numpy as jnp


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: Optional[jax.Array],
  bias: Optional[jax.Array],
  *,
  epsilon: float,
  dtype=None,
  rstd: Optional[jax.Array] = None,
) -> jax.Array:
  """`(x - mean) * scale / sqrt(var + epsilon) + bias`, computed in float32 (float64 for float64 `x`),
  returned in `dtype`.

  `mean`, `var`, `scale` and `bias` must broadcast against `x`; `scale` / `bias` may be None (1 / 0).
  The per-feature factor is formed first, so the elementwise work is one subtract, one multiply and one
  add, which XLA fuses with the dtype conversions into a single pass over `x`. `rstd`, when given, is
  `1 / sqrt(var + epsilon)` computed by the caller (then `var` is not read): BatchNorm's CPU program
  computes it with the other per-feature work.
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  factor = jax.lax.rsqrt(var.astype(acc) + epsilon) if rstd is None else rstd.astype(acc)
  if scale is not None:
    factor = factor * scale.astype(acc)
  y = (x.astype(acc) - mean.astype(acc)) * factor
  if bias is not None:
    y = y + bias.astype(acc)
  return y.astype(dtype if dtype is not None else x.dtype)
