"""The training-mode BatchNorm normalization with a closed-form backward (`jax.custom_vjp`).

Plain autodiff of `normalize(x, moments(x))` differentiates through the statistics: XLA then runs
separate reductions for the mean and variance cotangents and keeps several full-size intermediates.
The closed form needs one reduction pass and one elementwise pass (Ioffe & Szegedy 2015, §3):

    S1 = Σ dy,   S2 = Σ dy·x̂                    (one variadic reduction over dy and x)
    dbias = S1,  dscale = S2                       (renorm: dscale = r·S2 + d·S1)
    dx = scale·r·rstd · (dy − valid·(S1 + x̂·S2)/n)   (r = 1 without renorm)

where x̂ = (x − μ)·rstd is recomputed from `x` (nothing full-size is saved besides `x`), `n` is the
valid count and `valid` the mask. The sums in the correction run over every position (a masked-out
output still depends on the statistics) but the correction only reaches valid inputs, exactly as
autodiff. Ghost groups keep their own sums; with `axis_name`, `S1` and `S2` are summed over the devices
(within `axis_index_groups`) for `dx`, while `dscale` and `dbias` stay per device, as autodiff gives them.
Renorm's `r` and `d` are constants (stop-gradient), so only the factor `scale·r` changes.

The mean and variance enter as inputs computed by `stats.moments_and_count` (the one statistics kernel)
and receive no cotangent here: the backward already accounts for their dependence on `x`. They keep
their own differentiable graph, so reverse-over-reverse (`jax.grad` of `jax.grad`, Hessian-vector
products by `jax.jvp` of `jax.grad`) stays exact. Pure forward mode (`jax.jvp`, `jax.jacfwd`) through a
`custom_vjp` is not supported by JAX; `disabled()` restores the unfused, autodiff path for that.
"""

import contextlib
import functools
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from normjax._src import collectives
from normjax._src import normalize as normalize_lib
from normjax._src import stats

_ENABLED = os.environ.get("NORMJAX_FUSED_BATCH_NORM", "1") != "0"


def enabled() -> bool:
  """Whether training-mode BatchNorm uses the closed-form backward (read at trace time)."""
  return _ENABLED


@contextlib.contextmanager
def disabled():
  """Traces BatchNorm with plain autodiff inside the block (for forward-mode AD, tests, benchmarks).

  The switch is read when a function is traced: re-`jit` (or use a fresh function) inside the block.
  """
  global _ENABLED
  previous, _ENABLED = _ENABLED, False
  try:
    yield
  finally:
    _ENABLED = previous


def _effective_affine(scale, bias, r, d):
  """renorm folds into the affine: scale·r and bias + scale·d (as the unfused path does)."""
  if r is None:
    return scale, bias
  unit = 1.0 if scale is None else scale.astype(r.dtype)
  return unit * r, (0.0 if bias is None else bias.astype(r.dtype)) + unit * d


def normalize_training(x, mask, scale, bias, r, d, *, reduce_axes: Tuple[int, ...], axis_name=None,
                       axis_index_groups=None, method: str = "shifted", epsilon: float, dtype=None):
  """`normalize(x, mean, var, scale', bias')` for the batch's own statistics, with the fused backward.

  Args:
    x: the grouped input (leading ghost-group axis, size 1 without ghost batches).
    mask: None or the boolean validity mask broadcastable to `x`.
    scale, bias: None or per-feature arrays broadcastable to `x`.
    r, d: None, or Batch Renormalization's stop-gradient corrections (keepdims shape).
    reduce_axes, axis_name, axis_index_groups, method: the statistics' reduction, as for
      `stats.moments_and_count` (called here again: XLA merges it with the caller's identical call).
    epsilon: added to the variance.
    dtype: output dtype (default `x.dtype`).

  Returns:
    `y` of `x`'s shape in `dtype`, identical to the unfused forward.
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  groups = None if axis_index_groups is None else tuple(tuple(g) for g in axis_index_groups)
  # Under shard_map with varying-axis checks, a replicated scale used with a device-varying x gets an
  # implicit pcast whose transpose sums its cotangent over devices. A custom_vjp must return cotangents
  # of its inputs' exact type, so make the parameters varying like x first: autodiff then applies that
  # same sum outside, and the backward returns per-device sums as for any varying input.
  scale, bias = _vary_like(x, scale), _vary_like(x, bias)
  config = (tuple(reduce_axes), axis_name, groups, method, float(epsilon), dtype)
  return _fused(config, x, mask, scale, bias, r, d)


def _vary_like(x, value):
  if value is None:
    return None
  missing = tuple(a for a in _vma(x) if a not in _vma(value))
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def _vma(value):
  """The mesh axes over which `value` varies inside shard_map (empty outside; API differs by version)."""
  aval = jax.typeof(value)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma or ())


def _moments(config, x, mask):
  reduce_axes, axis_name, groups, method, _, _ = config
  return stats.moments_and_count(x, reduce_axes, mask=mask, axis_name=axis_name,
                                 axis_index_groups=groups, method=method)


def _forward(config, x, mask, scale, bias, r, d):
  mean, var, _ = _moments(config, x, mask)
  scale_e, bias_e = _effective_affine(scale, bias, r, d)
  return normalize_lib.normalize(x, mean, var, scale_e, bias_e, epsilon=config[4], dtype=config[5])


_fused = jax.custom_vjp(_forward, nondiff_argnums=(0,))


def _fused_fwd(config, x, mask, scale, bias, r, d):
  # The statistics are residuals computed from x inside the forward: differentiating this function
  # again (reverse-over-reverse) sees their dependence on x, and nothing full-size besides x is kept.
  mean, var, count = _moments(config, x, mask)
  scale_e, bias_e = _effective_affine(scale, bias, r, d)
  y = normalize_lib.normalize(x, mean, var, scale_e, bias_e, epsilon=config[4], dtype=config[5])
  return y, (x, mean, var, count, mask, scale, bias, r, d)


def _param_cotangent(value, like):
  """Sums a keepdims per-group cotangent over the ghost-group axis 0 into `like`'s shape and dtype."""
  return jnp.sum(value, axis=0).reshape(jnp.shape(like)).astype(jnp.result_type(like))


def _fused_bwd(config, residuals, dy):
  reduce_axes, axis_name, groups, _, epsilon, _ = config
  x, mean, var, count, mask, scale, bias, r, d = residuals
  acc = stats.accumulation_dtype(x)
  rstd = jax.lax.rsqrt(var.astype(acc) + epsilon)
  xhat = (x.astype(acc) - mean.astype(acc)) * rstd
  g = dy.astype(acc)
  s1 = jnp.sum(g, reduce_axes, keepdims=True)
  s2 = jnp.sum(g * xhat, reduce_axes, keepdims=True)
  dscale = dbias = None
  if scale is not None:
    dscale = _param_cotangent(s2 if r is None else r * s2 + d * s1, scale)
  if bias is not None:
    dbias = _param_cotangent(s1, bias)
  t1, t2 = collectives.cross_device_sum((s1, s2), axis_name, groups)
  factor = rstd
  if scale is not None:
    factor = factor * scale.astype(acc)
  if r is not None:
    factor = factor * r.astype(acc)
  inv_n = 1.0 / jnp.maximum(count.astype(acc), 1.0)
  correction = t1 * inv_n + xhat * (t2 * inv_n)
  if mask is not None:
    correction = jnp.where(mask, correction, 0.0)
  dx = (factor * (g - correction)).astype(x.dtype)
  return dx, None, dscale, dbias, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
