"""Running-statistics updates: exponential moving average, cumulative average, zero-debiased EMA.

Convention: `momentum` is the weight of the old value (flax/Keras); PyTorch's `momentum` is
`1 - momentum` here. Each function maps (old running value, batch value, number of updates so far) to the
new running value and is applied leaf by leaf to the mean and the variance (to the standard deviation
σ = sqrt(var + ε) instead of the variance under Batch Renormalization, see `renorm.running_var_update`).
`select_finite` then keeps the previous values of features that had no valid element or would become
non-finite.
"""

from typing import Optional, Tuple

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
  return hidden / (1.0 - momentum ** (steps + 1.0))


def update(
  old: jax.Array, new: jax.Array, count: jax.Array, *, momentum: Optional[float], debias: bool
) -> jax.Array:
  """Dispatches to the update chosen by (`momentum`, `debias`)."""
  if momentum is None:
    return cumulative_average(old, new, count)
  if debias:
    return debiased_ema(old, new, momentum, count)
  return ema(old, new, momentum)


def shift_estimate(
  mean: jax.Array, count: jax.Array, *, momentum: Optional[float], debias: bool
) -> jax.Array:
  """The running mean as an estimate of the next batch's mean: the shift of the one-pass statistics.

  A plain EMA started at 0 leans towards 0 for its first ~1 / (1 − momentum) updates; dividing by
  `1 − momentum**count` (Haiku's zero-debiasing) removes that lean, so after one update the estimate is
  that batch's mean. Debiased and cumulative running means are stored unbiased already. With
  `count == 0` (a fresh layer, or flax variables that carry no count) the stored mean is used as is.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import running
    >>> float(running.shift_estimate(jnp.array(5.0), jnp.array(1), momentum=0.99, debias=False))
    500.0...
  """
  if momentum is None or debias:
    return mean
  steps = count.astype(jnp.float32)
  return jnp.where(count > 0, mean / (1.0 - momentum ** jnp.maximum(steps, 1.0)), mean)


def select_finite(
  old: Tuple[jax.Array, ...], new: Tuple[jax.Array, ...], valid: jax.Array
) -> Tuple[Tuple[jax.Array, ...], jax.Array]:
  """Per feature, the `new` running values where `valid` and all of them finite; the `old` ones elsewhere.

  This is what keeps running statistics from being poisoned by one batch: a feature with no valid element
  (`valid` False: masked out everywhere) or whose updated values are not finite (NaN or ±inf in the
  batch, or an overflow) keeps its previous running values. PyTorch and flax have no such guard: one
  NaN element makes that feature's running mean and variance NaN for every later step.

  Args:
    old: the previous running values, e.g. `(mean, var)`, each of the feature shape.
    new: the updated running values, same shapes.
    valid: boolean, broadcastable to the feature shape: whether the batch had a valid element there.

  Returns:
    `(selected, updated)`: the tuple of running values to store, and the boolean mask of the features
    that took their new values.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import running
    >>> (mean,), updated = running.select_finite((jnp.zeros(3),), (jnp.array([1.0, jnp.nan, 2.0]),),
    ...                                          jnp.array([True, True, False]))
    >>> mean.tolist(), updated.tolist()
    ([1.0, 0.0, 0.0], [True, False, False])
  """
  updated = jnp.asarray(valid, bool)
  for value in new:
    updated = updated & jnp.isfinite(value)
  return tuple(jnp.where(updated, n, o) for o, n in zip(old, new)), updated
