"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275): the corrections r and d, the running
statistics of Algorithm 1 (moving averages of μ and σ), and the paper's clipping schedule."""

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from normjax._src import running

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


class RenormClipping(NamedTuple):
  """`r_max` and `d_max` as numbers or optax-style schedules of the BatchNorm step count."""

  r_max: ScalarOrSchedule
  d_max: ScalarOrSchedule


def paper_schedule(
  warmup_steps: int = 5000,
  r_max_end: float = 3.0,
  r_max_steps: int = 40000,
  d_max_end: float = 5.0,
  d_max_steps: int = 25000,
) -> RenormClipping:
  """The clipping schedule of Ioffe 2017 §4: plain BN for `warmup_steps`, then linear relaxation.

  `r_max` is 1 for the first 5k steps and grows linearly to 3 at step 40k; `d_max` is 0 for 5k steps and
  grows linearly to 5 at step 25k. The paper says "gradually relaxed"; a linear ramp is our choice.

  Example:
    >>> import normjax
    >>> clip = normjax.batch_renorm_paper_schedule()
    >>> float(clip.r_max(0)), float(clip.d_max(25000))
    (1.0, 5.0)
  """
  return RenormClipping(
    r_max=optax.linear_schedule(1.0, r_max_end, r_max_steps - warmup_steps, warmup_steps),
    d_max=optax.linear_schedule(0.0, d_max_end, d_max_steps - warmup_steps, warmup_steps),
  )


def check_clipping(r_max: ScalarOrSchedule, d_max: ScalarOrSchedule) -> None:
  """Raises ValueError for a constant `r_max < 1` or `d_max < 0` (schedules are checked at step 0)."""
  with jax.ensure_compile_time_eval():  # a schedule's value at step 0 is concrete even inside jit
    r0 = r_max(0) if callable(r_max) else r_max
    d0 = d_max(0) if callable(d_max) else d_max
  if not float(r0) >= 1.0:
    raise ValueError(f"r_max={r0!r} (at step 0) must be >= 1: r is clipped to [1/r_max, r_max]")
  if not float(d0) >= 0.0:
    raise ValueError(f"d_max={d0!r} (at step 0) must be >= 0: d is clipped to [-d_max, d_max]")


def _value(value: ScalarOrSchedule, step: jax.Array) -> jax.Array:
  return jnp.asarray(value(step) if callable(value) else value, jnp.float32)


def limits(r_max: ScalarOrSchedule, d_max: ScalarOrSchedule, step) -> tuple:
  """`(r_max, d_max)` as float32 scalars at BatchNorm step `step` (a schedule is evaluated there)."""
  return _value(r_max, step), _value(d_max, step)


def corrections(
  batch_mean,
  batch_var,
  running_mean,
  running_var,
  step,
  *,
  r_max: ScalarOrSchedule,
  d_max: ScalarOrSchedule,
  epsilon: float,
):
  """`r = clip(σ_B/σ, 1/r_max, r_max)` and `d = clip((μ_B−μ)/σ, −d_max, d_max)`, without gradient.

  σ_B = sqrt(batch_var + ε) and σ = sqrt(running_var + ε), the moving σ of Algorithm 1 (the running
  variance stores σ² − ε, see `running_var_update`). Then
  `γ·((x−μ_B)/σ_B·r + d) + β = (x−μ_B)·(γ r)/σ_B + (γ d + β)`, so renorm is plain normalization with the
  scale multiplied by `r` and `γ d` added to the bias. `r_max` and `d_max` are read at `step`
  (`limits`); the rest is `clipped_corrections`.
  """
  r_limit, d_limit = limits(r_max, d_max, step)
  return clipped_corrections(
    batch_mean, batch_var, running_mean, running_var, r_limit, d_limit, epsilon=epsilon
  )


def clipped_corrections(
  batch_mean, batch_var, running_mean, running_var, r_limit, d_limit, *, epsilon: float
):
  """`corrections` for given limits (what the CPU kernel computes in C++ with the same operations).

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import renorm
    >>> r, d = renorm.clipped_corrections(jnp.array([2.0]), jnp.array([16.0]), jnp.array([0.0]),
    ...                                   jnp.array([1.0]), 3.0, 1.0, epsilon=0.0)
    >>> float(r[0]), float(d[0])  # σ_B/σ = 4 clipped to 3; (μ_B − μ)/σ = 2 clipped to 1
    (3.0, 1.0)
  """
  # Each correction takes its own root (σ_B/σ = sqrt((σ²_B + ε)/(σ² + ε)), 1/σ = rsqrt(σ² + ε)), so no
  # square root is shared between them: XLA:CPU keeps a shared root in a kernel of its own.
  r = jnp.sqrt((batch_var + epsilon) / (running_var + epsilon))
  r = jnp.clip(r, 1.0 / r_limit, r_limit)
  d = jnp.clip(
    (batch_mean - running_mean) * jax.lax.rsqrt(running_var + epsilon), -d_limit, d_limit
  )
  return jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)


def running_var_update(
  old_var: jax.Array,
  batch_var: jax.Array,
  count: jax.Array,
  *,
  momentum: Optional[float],
  debias: bool,
  epsilon: float,
) -> jax.Array:
  """The running variance after one batch, with the moving average taken of σ, not of σ².

  Ioffe 2017, Algorithm 1, keeps moving averages of μ_B and of σ_B = sqrt(σ²_B + ε):
  `σ ← σ + (1 − momentum)(σ_B − σ)`. The state stores the variance `σ² − ε` (clipped at 0), so
  inference, `sqrt(var + ε) = σ`, and the corrections r and d (which read σ from the running variance)
  see exactly the averaged σ. This is Keras' `BatchNormalization(renorm=True)` (tf-keras and Keras ≥ 3.14
  keep a `moving_stddev` variable for it) when its `renorm_momentum` equals `momentum`.

  The average itself is `running.update` applied to σ: an EMA, the zero-debiased EMA (`debias=True`) or
  the cumulative average (`momentum=None`) of the batches' σ_B. With `unbiased_running_var`, the batch
  variance passed in is already Bessel-corrected, so σ_B = sqrt(n/(n−1) σ²_B + ε).

  Args:
    old_var: the running variance before this batch (f32, feature shape).
    batch_var: the batch variance to average in (the count-weighted mean over ghost groups).
    count: the number of updates applied so far (i32 scalar).
    momentum: weight of the old value, or None for the cumulative average.
    debias: Haiku's zero-debiased EMA.
    epsilon: the ε inside the square roots.

  Returns:
    The new running variance `max(σ² − ε, 0)`, at most float32's largest value: it is finite whenever
    `old_var` and `batch_var` are (σ averages two finite roots; only its square could overflow, at
    variances within a few ulps of float32's largest value).

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import renorm
    >>> var = renorm.running_var_update(jnp.array([3.0]), jnp.array([15.0]), jnp.array(0), momentum=0.5,
    ...                                 debias=False, epsilon=1.0)
    >>> float(var[0])  # σ: 2 and 4 average to 3, so var = 3² − 1
    8.0
  """
  sigma = jnp.sqrt(old_var + epsilon)
  batch_sigma = jnp.sqrt(batch_var + epsilon)
  sigma = running.update(sigma, batch_sigma, count, momentum=momentum, debias=debias)
  return jnp.clip(sigma * sigma - epsilon, 0.0, jnp.finfo(jnp.float32).max)
