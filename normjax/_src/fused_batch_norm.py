"""Training-mode BatchNorm normalization with a closed-form derivative (`jax.custom_jvp`).

Plain autodiff of `normalize(x, moments(x))` differentiates through the statistics: XLA then runs
separate reductions for the mean and variance cotangents and keeps several full-size intermediates.
Here the derivative is given in closed form (Ioffe & Szegedy 2015, §3) as a *linear* map of the tangents,
the JVP rule of a `jax.custom_jvp`:

    x̂ = (x − μ)·rstd,   a = scale·r·rstd     (r = 1 without renorm)
    T1 = Σ valid·dx,    T2 = Σ valid·dx·x̂      (over the reduced axes and the devices)
    dy = a·(dx − (T1 + x̂·T2)/n) + dscale·(r·x̂ + d) + dbias

with `n` the valid count and `valid` the mask. Every output moves with the statistics (the correction
reaches every position) but only valid inputs move them, exactly as autodiff. Ghost groups keep their
own sums; with `axis_name`, `T1` and `T2` are summed over the devices (within `axis_index_groups`).
Renorm's `r` and `d` are constants (stop-gradient).

Forward mode (`jax.jvp`, `jax.jacfwd`) evaluates the rule directly. Reverse mode linearizes the rule and
transposes it, which gives the closed-form backward: one reduction pass for `Σ g`, `Σ g·x̂` and one
elementwise pass for `dx = a·(g − valid·(Σ g + x̂·Σ g·x̂)/n)`, `dbias = Σ g`, `dscale = r·Σ g·x̂ + d·Σ g`.
The tangent is computed inside `jax.checkpoint` from `x` and per-feature statistics, so the only
full-size array reverse mode keeps is `x` itself (and the mask, when given); `x̂` is recomputed. The
rule is ordinary differentiable JAX code of `x` (its statistics come from `stats.moments_and_count`), so
higher orders (`jax.hessian`, reverse-over-reverse, forward-over-forward) are exact.

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167 (§3, the back-propagation formulas).
  Ioffe, "Batch Renormalization", NeurIPS 2017, arXiv:1702.03275 (r and d held constant).
"""

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from normjax._src import collectives
from normjax._src import compat
from normjax._src import lowering
from normjax._src import normalize as normalize_lib
from normjax._src import cpu_kernel
from normjax._src import kernel_tangent
from normjax._src import pallas_batch_norm
from normjax._src import pallas_plan
from normjax._src import pallas_streaming
from normjax._src import renorm as renorm_lib
from normjax._src import stats


class _Config(NamedTuple):
  """The static (hashable) arguments of the custom_jvp."""

  reduce_axes: Tuple[int, ...]
  axis_name: object
  groups: object
  epsilon: float
  dtype: object


def normalize_training(
  x,
  mask,
  scale,
  bias,
  r,
  d,
  moments,
  *,
  reduce_axes: Tuple[int, ...],
  axis_name=None,
  axis_index_groups=None,
  epsilon: float,
  dtype=None,
  closed_form: bool = True,
  rstd=None,
):
  """`normalize(x, mean, var, scale', bias')` for the batch's own statistics, closed-form derivative.

  Args:
    x: the grouped input (leading ghost-group axis, size 1 without ghost batches).
    mask: None or the boolean validity mask broadcastable to `x`.
    scale, bias: None or per-feature arrays broadcastable to `x`.
    r, d: None, or Batch Renormalization's stop-gradient corrections (keepdims shape).
    moments: `(mean, var, count)` of `x` from `stats.moments_and_count(x, reduce_axes, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups)` (any method). The closed form takes
      them for those of `x`: the derivative accounts for their dependence on `x` itself, and the
      tangents JAX computes for them are not used (reverse mode drops that work).
    reduce_axes, axis_name, axis_index_groups: the statistics' reduction.
    epsilon: added to the variance.
    dtype: output dtype (default `x.dtype`).
    closed_form: True (default) differentiates with the closed-form rule; False with plain autodiff
      through the statistics (the reference the tests and benchmarks compare against). Same forward.
    rstd: None, or `1 / sqrt(var + epsilon)` computed by the caller along with `moments` (BatchNorm
      computes it in the statistics' epilogue, so a CPU program has no kernel of its own for it).

  Returns:
    `y` of `x`'s shape in `dtype`; both paths give bitwise the same value.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from normjax._src import stats
    >>> def f(x):
    ...   moments = stats.moments_and_count(x, (1,))
    ...   return normalize_training(x, None, None, None, None, None, moments, reduce_axes=(1,),
    ...                             epsilon=1e-5)
    >>> x = jnp.arange(8.0).reshape(1, 4, 2)
    >>> y, dy = jax.jvp(f, (x,), (jnp.ones_like(x),))  # a uniform shift: normalized away
    >>> bool(jnp.max(jnp.abs(dy)) < 1e-6)
    True
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  groups = (
    None
    if axis_index_groups is None
    else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  )
  config = _Config(tuple(reduce_axes), axis_name, groups, float(epsilon), dtype)
  mean, var, count = moments
  if not closed_form:
    return _forward(config, x, mask, scale, bias, r, d, mean, var, count, rstd)
  return _closed_form(config, x, mask, scale, bias, r, d, mean, var, count, rstd)


_vary_like = compat.vary_like  # version-specific shard_map typing lives in compat.py


def _effective_affine(scale, bias, r, d):
  """renorm folds into the affine: scale·r and bias + scale·d (as the unfused path does)."""
  if r is None:
    return scale, bias
  unit = 1.0 if scale is None else scale.astype(r.dtype)
  return unit * r, (0.0 if bias is None else bias.astype(r.dtype)) + unit * d


def _normalize(config, x, mean, var, rstd, scale, bias, r, d):
  scale_e, bias_e = _effective_affine(scale, bias, r, d)
  return normalize_lib.normalize(
    x, mean, var, scale_e, bias_e, epsilon=config.epsilon, dtype=config.dtype, rstd=rstd
  )


def _forward(config, x, mask, scale, bias, r, d, mean, var, count, rstd):
  del mask, count
  return _normalize(config, x, mean, var, rstd, scale, bias, r, d)


_closed_form = jax.custom_jvp(_forward, nondiff_argnums=(0,))


def _closed_form_jvp(config, primals, tangents):
  x, mask, scale, bias, r, d, mean, var, count, rstd = primals
  dx, _, dscale, dbias = (None if isinstance(t, SymbolicZero) else t for t in tangents[:4])
  # The statistics' own tangents (tangents[6:]) are not used: the closed form below accounts for their
  # dependence on x. They enter the checkpointed tangent as inputs: reverse mode keeps them (per-feature
  # vectors) with x and recomputes x̂ from them, and higher-order derivatives see, through the outer
  # differentiation of `moments`, their dependence on x.
  y = _normalize(config, x, mean, var, rstd, scale, bias, r, d)
  if (
    dx is None and dscale is None and dbias is None
  ):  # e.g. only renorm's stop-gradient r, d traced
    return y, _vary_like(x, jnp.zeros_like(y))
  tangent = jax.checkpoint(functools.partial(_tangent, config), prevent_cse=False)
  return y, tangent(x, mask, mean, var, count, rstd, scale, r, d, dx, dscale, dbias)


def _tangent(config, x, mask, mean, var, count, rstd, scale, r, d, dx, dscale, dbias):
  """The closed-form tangent `dy`, linear in `(dx, dscale, dbias)` (None: a zero tangent).

  Written so that its transpose (reverse mode) reduces only `g` and `g·x̂`: every per-feature
  coefficient multiplies a per-feature tangent *before* it is broadcast, and the terms are added (no
  negation of full-size values). XLA then computes `Σ g` and `Σ g·x̂` once for dx, dscale and dbias.
  On a CPU, `x̂` enters in the form of `_CpuXhat` (see there).
  """
  args = (x, mask, mean, var, count, rstd, scale, r, d, dx, dscale, dbias)
  return lowering.cpu_or_portable(
    *args,
    cpu=functools.partial(_tangent_with, config, _cpu_xhat, _cpu_output),
    portable=functools.partial(_tangent_with, config, _portable_xhat, _portable_output),
  )


def _portable_output(config, terms, shape, acc):
  """`dy` in the output dtype from its full-size, x̂ and per-group terms."""
  return jnp.broadcast_to(_sum(terms), shape).astype(config.dtype)


def _cpu_output(config, terms, shape, acc):
  """As `_portable_output`, with each term rounded to the output dtype and fenced before the sum when
  that dtype is narrower than the arithmetic: in reverse mode each term then reads its own alias of
  the (bfloat16) cotangent (`lowering.fence`), so XLA:CPU does not write a float32 copy of `g`. The
  reverse pass is unchanged numerically; a forward-mode tangent is rounded per term."""
  if jnp.dtype(config.dtype) == jnp.dtype(acc) or len(terms) == 1:
    return _portable_output(config, terms, shape, acc)
  rounded = lowering.fence(
    tuple(jnp.broadcast_to(t, shape).astype(config.dtype) for t in terms), grouped=True
  )
  return _sum(t.astype(acc) for t in rounded).astype(config.dtype)


class _Xhat(NamedTuple):
  """How the tangent forms `coef·x̂` and `Σ u·x̂` (per-group `coef`, full-size `u`)."""

  times: object  # coef -> coef · x̂ (full size)
  sum_times: object  # u -> Σ u · x̂ over the reduced axes (keepdims)


def _portable_xhat(config, x, mean, rstd, acc):
  """`coef·x̂ = (x − μ)·(coef·rstd)` and `Σ u·x̂ = rstd·Σ u·(x − μ)`: `rstd` is folded into the
  per-feature factors, so each full-size term takes one multiply of `x − μ` and reverse mode's `dx`
  reads `μ` and two per-feature coefficients (`rstd·scale`, `rstd·slope`), as flax's autodiff does.
  On the TPU compiler this brings a ResNet-50 train step below flax's bytes accessed (BENCHMARKS.md)."""
  centered = x.astype(acc) - mean.astype(acc)
  return _Xhat(
    lambda coef: centered * (coef * rstd),
    lambda u: jnp.sum(u * centered, config.reduce_axes, keepdims=True) * rstd,
  )


def _xhat_product(config, x, mean, rstd, acc):
  """`x̂ = (x − μ)·rstd` formed first, then `coef·x̂` and `Σ u·x̂`: XLA:CPU's program (see `_cpu_xhat`)."""
  xhat = (x.astype(acc) - mean.astype(acc)) * rstd
  return _Xhat(
    lambda coef: coef * xhat, lambda u: jnp.sum(u * xhat, config.reduce_axes, keepdims=True)
  )


def _cpu_xhat(config, x, mean, rstd, acc):
  """`x̂ = (x − μ)·rstd` for XLA:CPU: formed as one array, on private aliases of `x`, `μ` and `rstd`
  (see `lowering.private_copies`). In reverse mode `coef·x̂` becomes the reduction `Σ g·x̂` and
  `Σ u·x̂` the elementwise `dx`; with one shared `x̂` (or shared broadcasts of `μ` and `rstd`)
  XLA:CPU writes full-size intermediates to memory, with an alias each both compute `x̂` in place.
  (The folded form of `_portable_xhat` measured no faster here, so the CPU program is unchanged.)"""
  (xa, ma, ra), (xb, mb, rb) = lowering.private_copies((x, mean, rstd), 2, grouped=True)
  return _xhat_product(config, xa, ma, ra, acc)._replace(
    sum_times=_xhat_product(config, xb, mb, rb, acc).sum_times
  )


def _tangent_with(
  config, make_xhat, make_output, x, mask, mean, var, count, rstd, scale, r, d, dx, dscale, dbias
):
  acc = stats.accumulation_dtype(x)
  keep = tuple(
    1 if a in config.reduce_axes else n for a, n in enumerate(x.shape)
  )  # per-group vectors
  per_group = functools.partial(_per_group, keep=keep, dtype=acc)
  rstd = jax.lax.rsqrt(var.astype(acc) + config.epsilon) if rstd is None else rstd.astype(acc)
  xhat = make_xhat(config, x, mean, rstd, acc)
  terms = []  # (per-group coefficient of 1, per-group coefficient of x̂, full-size term)
  if dx is not None:
    u = dx.astype(acc)  # one conversion: its transpose rounds the cotangent of x to x's dtype once
    valid_u = u if mask is None else jnp.where(mask, u, 0.0)
    sums = (jnp.sum(valid_u, config.reduce_axes, keepdims=True), xhat.sum_times(valid_u))
    t1, t2 = collectives.cross_device_sum(sums, config.axis_name, config.groups)
    factor = rstd
    if scale is not None:
      factor = factor * scale.astype(acc)
    if r is not None:
      factor = factor * r.astype(acc)
    minus_factor_over_n = -factor / jnp.maximum(count.astype(acc), 1.0)
    terms.append((minus_factor_over_n * t1, minus_factor_over_n * t2, factor * u))
  if dscale is not None:
    ds = per_group(dscale)
    terms.append((None, ds, None) if r is None else (ds * d.astype(acc), ds * r.astype(acc), None))
  if dbias is not None:
    terms.append((per_group(dbias), None, None))
  constant = _sum(c for c, _, _ in terms)
  slope = _sum(s for _, s, _ in terms)
  full = _sum(f for _, _, f in terms)
  parts = [
    v for v in (full, None if slope is None else xhat.times(slope), constant) if v is not None
  ]
  dy = make_output(config, parts, x.shape, acc)
  return _vary_like(x, dy)  # a tangent from replicated parameters alone must still vary like y


def portable_tangent(x, mean, rstd, scale, dx, dscale, dbias, *, dtype):
  """The closed-form tangent of a plain training step (statistics over every axis but the last, no
  mask, ghost groups or renorm) as the portable XLA program: `kernel_tangent`'s formula, whose
  transpose is the portable closed-form backward. Per-feature arguments have `x`'s rank (keepdims)."""
  axes = tuple(range(x.ndim - 1))
  config = _Config(axes, None, None, 0.0, jnp.dtype(dtype))
  count = np.full(mean.shape, x.size // x.shape[-1], np.float32)
  return _tangent_with(
    config,
    _portable_xhat,
    _portable_output,
    x,
    None,
    mean,
    None,
    count,
    rstd,
    scale,
    None,
    None,
    dx,
    dscale,
    dbias,
  )


def _per_group(value, *, keep, dtype):
  """A parameter's tangent repeated for each ghost group (axis 0 of `keep`).

  Repeated by concatenation, whose transpose adds the per-group sums: XLA then reuses the per-group
  reductions `Σ g`, `Σ g·x̂` of the dx cotangent (a broadcast's transpose, a reduction over the size-1
  group axis, is folded by XLA into a second full reduction over the input).
  """
  value = value.astype(dtype).reshape((1,) + keep[1:])
  return value if keep[0] == 1 else jnp.concatenate([value] * keep[0], axis=0)


def _sum(values):
  values = [v for v in values if v is not None]
  return functools.reduce(jnp.add, values) if values else None


_closed_form.defjvp(_closed_form_jvp, symbolic_zeros=True)


class _KernelConfig(NamedTuple):
  """The static arguments of `statistics_and_normalize`'s custom_jvp."""

  epsilon: float
  dtype: object
  interpret: bool
  budget: object
  kernel: str  # "pallas" (TPU) or "cpu" (`cpu_kernel`)
  grouped: bool  # axis 0 indexes groups, each with its own statistics (the CPU kernel only)


def statistics_and_normalize(
  x,
  scale,
  bias,
  *,
  epsilon: float,
  dtype=None,
  interpret: bool = False,
  budget=None,
  kernel: str = "pallas",
  grouped: bool = False,
  renorm=None,
):
  """`(y, mean, var)` of a training step from a kernel, with the closed-form derivative.

  `kernel="pallas"`: the Pallas TPU kernel (`pallas_batch_norm.statistics_and_normalize`, or its
  two sweeps `pallas_streaming.statistics_and_normalize` for a block larger than VMEM) reads `x`
  once for the statistics and the normalization (the sweeps: again for the chunks not kept); `kernel="cpu"`: the XLA:CPU custom call
  (`cpu_kernel.statistics_and_normalize`) reads it twice. Its derivative is the rule of
  `normalize_training` (no mask; renorm's r and d constant): forward mode and higher orders evaluate
  it with XLA; reverse mode runs the portable closed-form backward, or with `kernel="pallas"` the
  Pallas backward kernel where it fits (`kernel_tangent`: the tangent as one linear primitive whose
  transpose is `pallas_backward.backward`, or `pallas_streaming.backward`). The statistics'
  tangents are `Σ dx / n` and `2 Σ (x − μ)·dx / n` (`cpu_kernel.moments_tangents`).

  Args:
    x: features last, with `pallas_plan.forward_kernel(x.shape, x.dtype, dtype, budget)`
      (the resident kernel where it fits, else `pallas_streaming`'s two sweeps).
    scale, bias: `(C,)` arrays or None.
    epsilon, dtype, interpret, budget: as `pallas_batch_norm.statistics_and_normalize` (the CPU
      kernel takes only `epsilon` and `dtype`).
    kernel: "pallas" or "cpu".
    grouped: axis 0 indexes groups (ghost batches), each with its own statistics (`kernel="cpu"`).
    renorm: None, or Batch Renormalization's `(running_mean, running_var, r_max, d_max)`
      (`kernel="cpu"`; see `cpu_kernel.statistics_and_normalize`). No derivative flows to them.

  Returns:
    `y` in `dtype`, float32 `(C,)` mean and biased variance (`(G, C)` when `grouped`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(32.0).reshape(16, 2)
    >>> f = lambda x: statistics_and_normalize(x, None, None, epsilon=1e-5, interpret=True)[0]
    >>> _, dy = jax.jvp(f, (x,), (jnp.ones_like(x),))  # a uniform shift: normalized away
    >>> bool(jnp.max(jnp.abs(dy)) < 1e-6)
    True
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  if kernel not in ("pallas", "cpu"):
    raise ValueError(f"kernel={kernel!r} must be 'pallas' or 'cpu'")
  if (grouped or renorm is not None) and kernel != "cpu":
    option = "grouped=True" if grouped else "renorm"
    raise ValueError(f"{option} needs kernel='cpu', not {kernel!r}")
  config = _KernelConfig(float(epsilon), dtype, bool(interpret), budget, kernel, bool(grouped))
  return _kernel_with_rule(config, x, scale, bias, renorm)


def _run_kernel(config, x, scale, bias, renorm):
  features = x.shape[-1]
  scale = jnp.ones((features,), jnp.float32) if scale is None else scale
  bias = jnp.zeros((features,), jnp.float32) if bias is None else bias
  if config.kernel == "cpu":
    return cpu_kernel.statistics_and_normalize(
      x,
      scale,
      bias,
      epsilon=config.epsilon,
      dtype=config.dtype,
      grouped=config.grouped,
      renorm=renorm,
    )
  budget = pallas_batch_norm.vmem_budget() if config.budget is None else config.budget
  resident = pallas_plan.forward_kernel(x.shape, x.dtype, config.dtype, budget) == "resident"
  run = pallas_batch_norm if resident else pallas_streaming  # too large for VMEM: two sweeps
  return run.statistics_and_normalize(
    x,
    scale,
    bias,
    epsilon=config.epsilon,
    dtype=config.dtype,
    interpret=config.interpret,
    budget=budget,
  )


_kernel_with_rule = jax.custom_jvp(_run_kernel, nondiff_argnums=(0,))


def _kernel_jvp(config, primals, tangents):
  x, scale, bias, renorm = primals  # renorm's reference statistics and limits: no tangent
  dx, dscale, dbias = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
  y, mean, var = _kernel_with_rule(config, x, scale, bias, renorm)  # itself: higher orders work
  axes = tuple(range(1 if config.grouped else 0, x.ndim - 1))
  count = stats.valid_count(x.shape, axes, None)  # keepdims (per group), a NumPy constant
  keep = count.shape
  zeros = jnp.zeros_like(mean)
  if dx is None and dscale is None and dbias is None:
    return (y, mean, var), (jnp.zeros_like(y), zeros, zeros)
  rule = _Config(axes, None, None, config.epsilon, config.dtype)
  m, v = mean.reshape(keep), var.reshape(keep)
  per_feature = (1,) * (x.ndim - 1) + x.shape[-1:]
  reshaped = lambda a: None if a is None else a.reshape(per_feature)  # noqa: E731
  r = d = None
  if renorm is not None:  # the kernel's corrections, recomputed from its statistics (constants)
    running_mean, running_var, r_max, d_max = renorm
    r, d = renorm_lib.clipped_corrections(
      m, v, reshaped(running_mean), reshaped(running_var), r_max, d_max, epsilon=config.epsilon
    )
  pallas = (config.interpret, config.budget) if config.kernel == "pallas" else None
  tangents = functools.partial(_kernel_tangents, rule, count, pallas)
  tangents = jax.checkpoint(tangents, prevent_cse=False)
  dy, dmean, dvar = tangents(x, m, v, reshaped(scale), r, d, dx, reshaped(dscale), reshaped(dbias))
  if dmean is not None:
    dmean, dvar = dmean.reshape(mean.shape), dvar.reshape(var.shape)
  return (y, mean, var), (dy, zeros if dmean is None else dmean, zeros if dvar is None else dvar)


def _kernel_tangents(rule, count, pallas, x, mean, var, scale, r, d, dx, dscale, dbias):
  """`(dy, dmean, dvar)`: the closed-form `dy` and the statistics' tangents, from `x` and per-feature
  values only (checkpointed: reverse mode keeps `x` and no full-size intermediate). `count` is the
  NumPy constant of elements per feature. `pallas`: None, or the Pallas kernel's `(interpret,
  budget)`: `dy` is then `kernel_tangent`'s primitive, whose transpose (reverse mode) is the Pallas
  backward kernel."""
  rstd = jax.lax.rsqrt(var + rule.epsilon)
  if pallas is not None and dx is not None and r is None:
    interpret, budget = pallas
    dy = kernel_tangent.batch_norm_tangent(
      x, mean, rstd, scale, dx, dscale, dbias, dtype=rule.dtype, interpret=interpret, budget=budget
    )
  else:
    dy = _tangent(rule, x, None, mean, var, count, rstd, scale, r, d, dx, dscale, dbias)
  if dx is None:
    return dy, None, None
  dmean, dvar = cpu_kernel.moments_tangents(x, mean, dx, rule.reduce_axes)
  return dy, dmean, dvar


_kernel_with_rule.defjvp(_kernel_jvp, symbolic_zeros=True)
