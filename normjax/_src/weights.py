"""Weight reparametrizations: weight normalization, weight standardization, spectral normalization.

Each constructor returns a `WeightTransform`, the parameter-side analogue of `Transform`:
`params, state = t.init(kernel)` and `kernel_used, state = t.apply(params, state, *, training)`. The
kernel layout is that of flax: the output units along `axis` (default -1; `(in, out)` for Dense,
`(h, w, in, out)` for Conv), the fan-in along every other axis.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from normjax._src import constraints
from normjax._src import normalize as normalize_lib
from normjax._src import state_types
from normjax._src import stats
from normjax._src import transform
from normjax._src import validation


class WeightTransform(NamedTuple):
  """A kernel reparametrization as pure functions.

  Attributes:
    init: `init(kernel, key=None) -> (params, state)`.
    apply: `apply(params, state, *, training) -> (kernel, new_state)`.
  """

  init: Callable[..., Any]
  apply: Callable[..., Any]


@state_types.registered_state
class SpectralNormState(NamedTuple):
  """Power-iteration state of spectral normalization (float32)."""

  u: (
    jax.Array
  )  # f32[out]: estimate of the leading left singular vector of W (out × fan_in), unit norm
  sigma: jax.Array  # f32[]: estimate of the largest singular value at the last training step


def _fan_in_axes(kernel_shape, axis):
  (out,) = validation.normalize_axes(axis, len(kernel_shape), "axis")
  if len(kernel_shape) < 2:
    raise ValueError(
      f"kernel of shape {tuple(kernel_shape)} must have rank >= 2 (fan-in and outputs)"
    )
  return out, tuple(a for a in range(len(kernel_shape)) if a != out)


def _norms(v, fan_in, epsilon):
  """`sqrt(Σ v² + epsilon)` over the fan-in axes (keepdims): epsilon inside the norm."""
  return jnp.sqrt(jnp.square(constraints.l2_norms(v, fan_in)) + epsilon)


# ---------------------------------------------------------------------------------- weight norm


def _wn_init(axis, epsilon, kernel, key=None):
  del key
  kernel = jnp.asarray(kernel)
  validation.check_float_input(kernel, "kernel")
  out, fan_in = _fan_in_axes(kernel.shape, axis)
  g = _norms(kernel, fan_in, epsilon).reshape(kernel.shape[out]).astype(kernel.dtype)
  return {"v": kernel, "g": g}, transform.EmptyState()


def _wn_apply(axis, epsilon, params, state, *, training):
  training = transform.check_training_flag(training)
  v, g = params["v"], params["g"]
  out, fan_in = _fan_in_axes(v.shape, axis)
  if g.shape != (v.shape[out],):
    raise ValueError(
      f"params['g'] has shape {g.shape}; expected ({v.shape[out]},) for v of shape "
      f"{v.shape} with outputs on axis {axis}"
    )
  bshape = tuple(v.shape[out] if a == out else 1 for a in range(v.ndim))
  w = v * (g.reshape(bshape) / _norms(v, fan_in, epsilon)).astype(v.dtype)
  return w, state


def weight_norm(*, axis: int = -1, epsilon: float = 1e-12) -> WeightTransform:
  """Weight normalization: `w = g · v / ‖v‖` per output unit, with `‖v‖ = sqrt(Σ v² + epsilon)`.

  `init(kernel)` returns `{"v": kernel, "g": ‖kernel‖}` (norms over the fan-in, epsilon included), so
  that `apply` returns the kernel unchanged at initialization: wrapping a layer does not change its
  output. For the paper's data-dependent initialization see `weight_norm_data_init`.

  Args:
    axis: the output axis of the kernel (default -1); the norm is over every other axis.
    epsilon: added to the squared norm inside the square root (keeps the gradient finite at v = 0).

  Returns:
    A `WeightTransform`; `apply(params, state, *, training) -> (w, EmptyState())`.

  Raises:
    ValueError: epsilon <= 0; at trace time a kernel of rank < 2 or `g` of the wrong shape.

  Example:
    >>> import jax, jax.numpy as jnp, normjax
    >>> wn = normjax.weight_norm()
    >>> kernel = jax.random.normal(jax.random.key(0), (3, 4))
    >>> params, state = wn.init(kernel)
    >>> w, _ = wn.apply(params, state, training=True)
    >>> bool(jnp.allclose(w, kernel, rtol=1e-6))
    True

  References:
    Salimans & Kingma 2016, "Weight Normalization", arXiv:1602.07868.
  """
  validation.check_positive(epsilon, "epsilon")
  return WeightTransform(
    functools.partial(_wn_init, axis, epsilon), functools.partial(_wn_apply, axis, epsilon)
  )


def weight_norm_data_init(params, y, *, epsilon: float = 1e-5, init_scale: float = 1.0):
  """The paper's data-dependent initialization (§3) of a weight-normed layer from one batch.

  `y` is the layer's pre-activation on an initialization batch computed with the current `params` and
  no bias (features on the last axis). With `t = y / g` the output of the unit-norm kernel, μ[t], σ²[t]
  its per-feature batch moments (from `normjax.moments`), the paper sets `g ← s / sqrt(σ²[t] + epsilon)`
  and `b ← −μ[t] · g`, so the initialized layer's outputs have mean 0 and standard deviation `s =
  init_scale` on that batch.

  Args:
    params: `{"v", "g"}` from `weight_norm().init`.
    y: pre-activations `x · w` (no bias) of shape `(..., out)`.
    epsilon: added to σ²[t] inside the square root.
    init_scale: the target standard deviation s.

  Returns:
    `(params, bias)`: new `{"v", "g"}` and the bias of shape `(out,)`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> params, _ = normjax.weight_norm().init(jax.random.normal(jax.random.key(1), (3, 2)))
    >>> w, _ = normjax.weight_norm().apply(params, None, training=False)
    >>> params, b = normjax.weight_norm_data_init(params, x @ w)
    >>> w, _ = normjax.weight_norm().apply(params, None, training=False)
    >>> bool(jnp.allclose((x @ w + b).std(0), 1.0, atol=1e-3))
    True

  References:
    Salimans & Kingma 2016, arXiv:1602.07868, §3.
  """
  g = params["g"]
  y = jnp.asarray(y)
  if y.shape[-1] != g.shape[0]:
    raise ValueError(
      f"y has {y.shape[-1]} features on its last axis; expected {g.shape[0]} (the layer's outputs)"
    )
  g_acc = g.astype(stats.accumulation_dtype(y))
  t = y / g_acc
  mean, var = stats.moments(t, tuple(range(t.ndim - 1)))
  new_g = init_scale * jax.lax.rsqrt(var + epsilon)
  return {"v": params["v"], "g": new_g.astype(g.dtype)}, (-mean * new_g).astype(g.dtype)


# ----------------------------------------------------------------------------- standardization


def _ws_init(axis, epsilon, kernel, key=None):
  del key
  kernel = jnp.asarray(kernel)
  validation.check_float_input(kernel, "kernel")
  _fan_in_axes(kernel.shape, axis)
  return {"kernel": kernel}, transform.EmptyState()


def standardize_kernel(kernel, *, axis: int = -1, epsilon: float = 1e-5):
  """`(w − μ) / sqrt(σ² + epsilon)` per output unit, μ and σ² (biased) over the fan-in axes."""
  validation.check_float_input(kernel, "kernel")
  kernel = jnp.asarray(kernel)
  _, fan_in = _fan_in_axes(kernel.shape, axis)
  mean, var, _ = stats.moments_and_count(kernel, fan_in)
  return normalize_lib.normalize(kernel, mean, var, None, None, epsilon=epsilon)


def _ws_apply(axis, epsilon, params, state, *, training):
  training = transform.check_training_flag(training)
  return standardize_kernel(params["kernel"], axis=axis, epsilon=epsilon), state


def weight_standardization(*, axis: int = -1, epsilon: float = 1e-5) -> WeightTransform:
  """Weight standardization: each output unit's kernel has mean 0 and variance 1 over its fan-in.

  `ŵ = (w − μ) / sqrt(σ² + epsilon)` with μ and σ² (biased) over every axis but `axis` (for a Conv
  kernel `(h, w, in, out)`: over h, w, in), from `normjax.moments`. The paper's code divides by
  `σ + 1e-5`; here epsilon is inside the square root like every normjax norm. Pair it with
  `group_norm` for training that does not depend on the batch.

  Args:
    axis: the output axis (default -1).
    epsilon: added to the variance inside the square root.

  Returns:
    A `WeightTransform`: `init(kernel) -> ({"kernel": kernel}, EmptyState())`,
    `apply(params, state, *, training) -> (standardized kernel, state)`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax
    >>> ws = normjax.weight_standardization()
    >>> params, state = ws.init(jax.random.normal(jax.random.key(0), (3, 3, 4, 8)) + 2.0)
    >>> w, _ = ws.apply(params, state, training=True)
    >>> bool(jnp.allclose(w.mean((0, 1, 2)), 0.0, atol=1e-5))
    True

  References:
    Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", arXiv:1903.10520.
  """
  validation.check_positive(epsilon, "epsilon")
  return WeightTransform(
    functools.partial(_ws_init, axis, epsilon), functools.partial(_ws_apply, axis, epsilon)
  )


# ------------------------------------------------------------------------------- spectral norm


@dataclasses.dataclass(frozen=True)
class _SpectralConfig:
  axis: int
  n_power_iterations: int
  epsilon: float


def _as_matrix(axis, kernel):
  """The kernel as W of shape (out, fan_in) (Miyato et al.'s layout)."""
  out, _ = _fan_in_axes(kernel.shape, axis)
  return jnp.moveaxis(kernel, out, 0).reshape(kernel.shape[out], -1)


def _unit(v, epsilon):
  return v * jax.lax.rsqrt(jnp.sum(v * v) + epsilon)


def _sn_init(config, kernel, key=None):
  kernel = jnp.asarray(kernel)
  validation.check_float_input(kernel, "kernel")
  w = _as_matrix(config.axis, kernel)
  key = jax.random.key(0) if key is None else key
  u = _unit(jax.random.normal(key, (w.shape[0],), jnp.float32), config.epsilon)
  return {"kernel": kernel}, SpectralNormState(u, jnp.ones((), jnp.float32))


def _sn_apply(config, params, state, *, training):
  training = transform.check_training_flag(training)
  kernel = params["kernel"]
  w = _as_matrix(config.axis, kernel).astype(stats.accumulation_dtype(kernel))
  if not isinstance(state, SpectralNormState):
    raise TypeError(f"state is a {type(state).__name__}; expected a SpectralNormState from init")
  validation.check_array(state.u, (w.shape[0],), jnp.float32, "state.u")
  w_fixed = jax.lax.stop_gradient(w)
  u = state.u.astype(w.dtype)
  steps = config.n_power_iterations if training else 0
  for _ in range(steps):  # u ← W v / ‖W v‖ with v ← Wᵀ u / ‖Wᵀ u‖
    u = _unit(w_fixed @ _unit(w_fixed.T @ u, config.epsilon), config.epsilon)
  v = _unit(w_fixed.T @ u, config.epsilon)
  sigma = u @ (w @ v)  # differentiable in W; u, v held constant (the paper's gradient)
  w_sn = (kernel / sigma.astype(kernel.dtype)).astype(kernel.dtype)
  if not training:
    return w_sn, state
  new_state = SpectralNormState(
    jax.lax.stop_gradient(u).astype(jnp.float32), jax.lax.stop_gradient(sigma).astype(jnp.float32)
  )
  return w_sn, new_state


def spectral_norm(
  *, axis: int = -1, n_power_iterations: int = 1, epsilon: float = 1e-12
) -> WeightTransform:
  """Spectral normalization: `W_SN = W / σ(W)`, σ estimated by power iteration.

  The kernel is viewed as the matrix `W` of shape (out, fan_in). The state holds the power-iteration
  vector `u` (explicit state, float32) and the last estimate σ. In training, `n_power_iterations` steps
  `v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖` refine `u` (one step per training call, as in the paper, which converges
  as training proceeds), then `σ = uᵀ W v` with `u`, `v` held constant for the gradient. In evaluation
  `u` is not updated: `v` is formed from the stored `u` and σ recomputed for the current `W`.

  Args:
    axis: the kernel's output axis (default -1).
    n_power_iterations: power-iteration steps per training call (>= 1).
    epsilon: added inside the square root when normalizing `u` and `v`.

  Returns:
    A `WeightTransform`: `init(kernel, key=None) -> ({"kernel": kernel}, SpectralNormState)` (u drawn
    from N(0, I) with `key`, default `jax.random.key(0)`), `apply(params, state, *, training)`.

  Example:
    >>> import jax, numpy as np, normjax
    >>> sn = normjax.spectral_norm(n_power_iterations=20)
    >>> kernel = jax.random.normal(jax.random.key(0), (6, 4))
    >>> params, state = sn.init(kernel)
    >>> w, state = sn.apply(params, state, training=True)
    >>> round(float(np.linalg.norm(np.asarray(w), 2)), 3)
    1.0

  References:
    Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks", arXiv:1802.05957.
  """
  if (
    not isinstance(n_power_iterations, int)
    or isinstance(n_power_iterations, bool)
    or n_power_iterations < 1
  ):
    raise ValueError(f"n_power_iterations={n_power_iterations!r} must be an int >= 1")
  validation.check_positive(epsilon, "epsilon")
  config = _SpectralConfig(axis, n_power_iterations, epsilon)
  return WeightTransform(functools.partial(_sn_init, config), functools.partial(_sn_apply, config))
