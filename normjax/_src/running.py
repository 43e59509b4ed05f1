"""Running-statistics updates: exponential moving average, cumulative average, zero-debiased EMA.

Convention: `momentum` is the weight of the old value (flax/Keras); PyTorch's `momentum` is
`1 - momentum` here. Each function maps (old running value, batch value, number of updates so far) to the
new running value and is applied leaf by leaf to the mean and the variance.
"""

from typing import Optional

import jax
import jax.numpy as jnp


def ema(old: jax.Array, new: jax.Array, momentum: float) -> jax.Array:
  """`momentum * old + (1 - momentum) * new`."""
  return momentum * old + (1.0 - momentum) * new


def cumulative_average(old: jax.Array, new: jax.Array, count: jax.Array) -> jax.Array:
  """Equal-weight average of all `count + 1` batch values seen (PyTorch's `momentum=None`)."""
  return old + (new - old) / (count.astype(jnp.float32) + 1.0)


def debiased_ema(old: jax.Array, new: jax.Array, momentum: float, count: jax.Array) -> jax.Array:
  """Zero-debiased EMA (Haiku's `ExponentialMovingAverage`, Kingma & Ba 2014 §3).

  Haiku keeps a hidden EMA `h` started at zero and reports `h / (1 - momentum**t)`. The hidden value is
  derivable from the reported one, `h_t = old * (1 - momentum**t)`, so only the debiased value is stored.
  """
  steps = count.astype(jnp.float32)
  hidden = old * (1.0 - momentum**steps)
  hidden = momentum * hidden + (1.0 - momentum) * new
  return hidden / (1.0 - momentum**(steps + 1.0))


def update(old: jax.Array, new: jax.Array, count: jax.Array, *, momentum: Optional[float],
           debias: bool) -> jax.Array:
  """Dispatches to the update chosen by (`momentum`, `debias`)."""
  if momentum is None:
    return cumulative_average(old, new, count)
  if debias:
    return debiased_ema(old, new, momentum, count)
  return ema(old, new, momentum)
