"""`moments`: the one statistics kernel that every normjax layer calls.

Statistics are accumulated in float32 whatever the input dtype, or float64 for float64 input (the
input is converted inside the reduction, so XLA fuses the conversion and no float32 copy of `x` is
materialized). The variance is the
biased (population) variance, i.e. divided by the count.

Methods:
  * ``"shifted"`` (default): one pass over the data of sums of ``x - K`` and ``(x - K)**2`` for a per-feature
    shift ``K`` (held constant for differentiation). As long as ``K`` lies within a few standard
    deviations of the mean, ``E[(x-K)^2] - E[x-K]^2`` does not cancel catastrophically: float32 input with
    mean 1e4 and std 1 gives a relative variance error of about 1e-7. ``K`` is the caller's ``shift``
    (BatchNorm passes its running mean, a value that does not depend on this batch) or, without one, the
    mean of a small probe slice of ``x`` (at most 64 elements per feature).
  * ``"two_pass"``: the mean first, then the mean squared deviation (reads `x` twice).
  * ``"fast"``: ``E[x^2] - E[x]^2`` clipped at 0, flax's default, for parity; inaccurate when
    |mean| >> std.

CPU lowering of ``"shifted"`` (`lowering.cpu_or_portable`): XLA:CPU runs each sum as its own pass over
``x`` (never inside the convolution that produced ``x``), and writes a shared ``x - K`` to memory (see
`normjax._src.lowering`), so a shift buys nothing there: on a CPU the first pass sums ``x`` and
``x**2`` directly, and a second, shifted pass (``K`` = that batch mean) runs only when
some statistic could lose precision: when ``mean**2 > CPU_PLAIN_SUMS_LIMIT * var`` (|mean| > 3 std) or
a sum is not finite. Measured with XLA:CPU's float32 sums, the relative variance error of the plain
sums is 3e-7 × (1 + mean²/var) for 1e3 to 1.6e6 elements, so at most 3e-6 where they are kept.

Where the C++ kernel is built (`cpu_kernel.py`), a CPU program computes a features-last reduction (every
axis but the last, a mask the same for every feature) with it instead: the same shifted statistics
(``K`` the mean of the first 16 valid rows, a second pass inside the kernel where a feature's mean lies
more than 3 std from ``K``) in one read of ``x``; across devices, the per-device counts and raw moments
are added in one round of `psum`, and combined about the global mean in a second round (Chan et al.;
no second read of ``x``) only where the first could lose precision. BatchNorm's plain training step does not
call `moments` on a CPU at all: its kernel also writes ``y`` (two reads of ``x``).

Cross-device statistics (``axis_name``): with a shift common to every device (a replicated running mean,
or the CPU's first pass), the per-device count and the two shifted sums are summed in one round of
`psum`s and the result is exact for any split of the data. Without one (the probe is each device's own),
each device reduces its data to a count, a mean and a sum of squared deviations, and these are combined
with Chan et al.'s parallel formula (two rounds). Either way the result is that of the concatenated valid
data even when devices hold different numbers of valid elements (unlike a mean of per-device means,
flax#2417).

Elements masked out do not count. A feature with no valid element anywhere gets mean 0 and variance 0,
never NaN.
"""

import functools
import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import collectives
from normjax._src import compat
from normjax._src import cpu_kernel
from normjax._src import lowering
from normjax._src import validation

METHODS = ("shifted", "two_pass", "fast")
_PROBE_LENGTH = 64
CPU_PLAIN_SUMS_LIMIT = 9.0  # CPU: keep the plain sums while mean² ≤ 9 var for every statistic


def moments(
  x: jax.Array,
  axes: validation.Axes,
  *,
  mask: Optional[jax.Array] = None,
  axis_name=None,
  axis_index_groups: collectives.AxisIndexGroups = None,
  method: str = "shifted",
  shift: Optional[jax.Array] = None,
  keepdims: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Mean and biased variance of `x` over `axes`, in float32 (float64 for float64 `x`).

  Args:
    x: floating-point array (float16, bfloat16, float32 or float64).
    axes: the axis or axes to reduce over.
    mask: optional boolean array of x's rank (each dimension 1 or x's) or 1-D `(x.shape[0],)` (one flag
      per example); only True elements count.
    axis_name: name of a mapped axis (`shard_map`, `pmap`, `vmap`) over which to reduce as well.
    axis_index_groups: optional partition of the devices of `axis_name` into groups, each reduced alone.
    method: "shifted" (default, accurate one pass), "two_pass", or "fast" (flax's E[x²]−E[x]²).
    shift: for "shifted", an optional per-feature value near the mean (x's shape without `axes`, or with
      size-1 `axes`), e.g. a running mean; it must be the same on every device of `axis_name`. It is held
      constant for differentiation and changes nothing but rounding. Default: the mean of a probe slice
      of `x` (then cross-device statistics take two rounds of `psum`).
    keepdims: keep the reduced axes with size 1.

  Returns:
    `(mean, var)`, float32 (float64 for float64 `x`) arrays of x's shape without `axes` (or with size-1 axes if `keepdims`).

  Raises:
    TypeError: `x` is not floating point, or `mask` is not boolean.
    ValueError: an axis is out of range, `mask` or `shift` does not broadcast, `method` is unknown, or
      `axis_index_groups` is not a partition of the devices.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> x = 1e4 + jnp.arange(8.0).reshape(4, 2)
    >>> mean, var = normjax.moments(x, axes=0)
    >>> [round(float(v), 4) for v in var]
    [5.0, 5.0]

  References:
    Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983 (shifted data and the
    parallel combination formula).
  """
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  axes = validation.normalize_axes(axes, x.ndim, "axes")
  if method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {METHODS}")
  if axis_name is None and axis_index_groups is not None:
    raise ValueError("axis_index_groups needs axis_name to be set")
  collectives.check_axis_index_groups(axis_index_groups)
  if shift is not None:
    shift = _prepare_shift(shift, x.shape, axes)
  mean, var, _ = moments_and_count(
    x,
    axes,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    method=method,
    shift=shift,
  )
  if not keepdims:
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var


def _prepare_shift(shift, shape, axes):
  """`shift` with size-1 `axes` (keepdims shape), or ValueError naming both shapes."""
  shift = jnp.asarray(shift)
  kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
  squeezed = tuple(n for i, n in enumerate(shape) if i not in axes)
  if shift.shape == squeezed:
    return shift.reshape(kept)
  if shift.shape == kept:
    return shift
  raise ValueError(
    f"shift has shape {shift.shape}; expected {squeezed} (x's shape {shape} without axes {axes}) "
    f"or {kept}"
  )


def moments_and_count(
  x,
  axes,
  *,
  mask=None,
  axis_name=None,
  axis_index_groups=None,
  method="shifted",
  shift=None,
  grouped=False,
  epilogue: Optional[Callable] = None,
):
  """Like `moments` with keepdims=True and checked arguments, also returning the float32 valid count.

  `shift` (keepdims shape) must be common to the devices of `axis_name`; `None` uses the probe.
  `grouped`: `x` is BatchNorm's `(groups, ghost_batch_size, ...)` view (helps the CPU lowering, see
  `lowering.as_operand`). `epilogue`: a function of `(mean, var, count)` (per-feature arrays) whose
  result is returned instead of them; BatchNorm passes its running update and per-feature
  coefficients. The CPU lowering traces it inside both branches of its precision check, so that
  this per-feature work adds no kernel to the outer program (see `lowering.py`: XLA:CPU runs a program
  of at most 8 kernels in order and a larger one as a concurrent graph, which is slower here).
  """
  finish = epilogue if epilogue is not None else (lambda moments: moments)
  mask = validation.prepare_mask(mask, x.shape)
  count = valid_count(x.shape, axes, mask)
  if not axes:
    valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    local_mean, m2 = jnp.where(valid, _acc(x), 0.0), jnp.zeros(x.shape, accumulation_dtype(x))
    return finish(_combine(count, local_mean, m2, axis_name, axis_index_groups))
  if method == "fast":
    return finish(_fast(x, axes, mask, count, axis_name, axis_index_groups))
  if method == "two_pass":
    local_mean, m2 = _two_pass(x, axes, mask, count)
    return finish(_combine(count, local_mean, m2, axis_name, axis_index_groups))
  shifted = functools.partial(
    _shifted_portable, axes=axes, axis_name=axis_name, groups=axis_index_groups
  )
  # `count` is closed over, not passed: without a mask it stays a NumPy constant (see `valid_count`)
  portable = lambda x, mask, shift: finish(shifted(x, mask, count, shift))
  if _kernel_reduces(x, axes, mask, grouped):
    cpu = lambda x, mask, shift: _kernel_statistics(
      x,
      mask,
      count,
      shift,
      grouped=grouped,
      axis_name=axis_name,
      groups=axis_index_groups,
      finish=finish,
    )
  elif axis_index_groups is None:
    cpu = lambda x, mask, shift: _shifted_cpu(
      x, mask, count, axes=axes, axis_name=axis_name, grouped=grouped, finish=finish
    )
  else:  # groups could take different branches of the CPU test: the probe of this batch instead
    cpu = lambda x, mask, shift: portable(x, mask, None)
  if compat.is_batched(x):
    # Under vmap the CPU lowering's conditional gets a batched predicate: JAX computes both branches
    # (a select) and, inside shard_map(check_vma=True), mis-types their constants ("requires varying
    # manual axes to match"). The portable one pass is exact enough and cheaper there.
    return portable(x, mask, shift)
  return lowering.cpu_or_portable(x, mask, shift, cpu=cpu, portable=portable)


def accumulation_dtype(x):
  """float32, or float64 when `x` is float64: statistics never accumulate in less than float32."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _acc(x):
  return x.astype(accumulation_dtype(x))


def valid_count(shape, axes, mask):
  """Number of valid elements of `shape` per position after reducing `axes`, float32, keepdims shape.

  Without a mask it is a NumPy constant (known at trace time), with one an array summed from it.
  """
  kept_shape = tuple(1 if i in axes else s for i, s in enumerate(shape))
  if mask is None:  # a NumPy constant: XLA embeds it (no kernel broadcasts it), psum folds it
    return np.full(kept_shape, math.prod(shape[a] for a in axes), np.float32)
  broadcast_factor = math.prod(shape[a] for a in axes if mask.shape[a] == 1)
  summed_axes = tuple(a for a in axes if mask.shape[a] != 1)
  valid = jnp.sum(mask.astype(jnp.float32), axis=summed_axes, keepdims=True)
  return jnp.broadcast_to(valid * broadcast_factor, kept_shape)


def _masked_sum(values, mask, axes):
  if mask is not None:
    values = jnp.where(mask, values, 0.0)
  return jnp.sum(values, axis=axes, keepdims=True)


def _safe_divide(numerator, count):
  return jnp.where(count > 0, numerator / jnp.maximum(count, 1.0), 0.0)


def _probe_shift(x, axes, mask):
  """Mean of at most 64 valid elements along the first reduced axis: the shift K (no gradient)."""
  index = tuple(
    slice(0, _PROBE_LENGTH) if a == axes[0] else (slice(0, 1) if a in axes else slice(None))
    for a in range(x.ndim)
  )
  probe = _acc(x[index])
  probe_mask = None
  if mask is not None:
    mask_index = tuple(s if mask.shape[a] != 1 else slice(None) for a, s in enumerate(index))
    probe_mask = mask[mask_index]
  probe_count = valid_count(probe.shape, axes, probe_mask)
  return jax.lax.stop_gradient(_safe_divide(_masked_sum(probe, probe_mask, axes), probe_count))


def _shifted_portable(x, mask, count, shift, *, axes, axis_name, groups):
  """Sums of `x - K` and `(x - K)²` in one pass; `K` = `shift` (common: one round) or the probe."""
  common = shift is not None or axis_name is None
  shift = _probe_shift(x, axes, mask) if shift is None else shift
  shift = jax.lax.stop_gradient(shift.astype(accumulation_dtype(x)))
  centered = _acc(x) - shift
  s1 = _masked_sum(centered, mask, axes)
  s2 = _masked_sum(centered * centered, mask, axes)
  if common:
    count, s1, s2 = collectives.cross_device_sum((count, s1, s2), axis_name, groups)
    return _from_shifted_sums(count, s1, s2, shift)
  mean_offset = _safe_divide(s1, count)
  return _combine(count, shift + mean_offset, s2 - s1 * mean_offset, axis_name, groups)


def _from_shifted_sums(count, s1, s2, shift):
  """(mean, var, count) from the sums of `x - shift` and `(x - shift)²` over `count` elements."""
  offset = _safe_divide(s1, count)
  mean = jnp.where(count > 0, shift + offset, 0.0)
  return mean, jnp.maximum(_safe_divide(s2, count) - offset * offset, 0.0), count


def _shifted_cpu(x, mask, count, *, axes, axis_name, grouped, finish):
  """The CPU lowering of "shifted": plain sums, and a shifted second pass only where precision needs it.

  The second pass is the portable one with the probe shift (a first-pass mean may be NaN when a masked
  element is); every device sees the same first-pass sums and takes the same branch. No shift is
  needed here. `finish` (the caller's epilogue) runs inside both branches.
  """
  acc = accumulation_dtype(x)
  xs = lowering.private_copies(x, 2, grouped=grouped) if x.dtype != acc else (x, x)
  if mask is None:
    s1 = jnp.sum(_acc(xs[0]), axes, keepdims=True)
    s2 = jnp.sum(jnp.square(_acc(xs[1])), axes, keepdims=True)
  else:  # a product with the 0/1 mask fuses where `where` does not; non-finite sums take pass two
    weights = lowering.private_copies(mask.astype(acc), 2, grouped=grouped)
    s1 = jnp.sum(_acc(xs[0]) * weights[0], axes, keepdims=True)
    s2 = jnp.sum(jnp.square(_acc(xs[1])) * weights[1], axes, keepdims=True)
  static = _static_counts(count, axis_name)
  if static is None:
    sums = collectives.cross_device_sum((count, s1, s2), axis_name)
  else:  # known at trace time: made inside the branches, where XLA folds them (operands it would copy)
    sums = (jnp.asarray(static[1]),) + collectives.cross_device_sum((s1, s2), axis_name)

  count_shape = jnp.shape(count)

  def counts(count, sums):
    if static is None:
      return count, sums
    local, total = _counts_in_branch(static, count_shape, None, None)
    return local, (total,) + tuple(sums)

  def second_pass(core, mask, count, sums):
    data = lowering.from_operand(core, x)
    count, _ = counts(count, sums)
    return finish(
      _shifted_portable(data, mask, count, None, axes=axes, axis_name=axis_name, groups=None)
    )

  def keep(core, mask, count, sums):
    _, sums = counts(count, sums)
    return finish(_from_shifted_sums(*sums, 0.0))

  operands = (lowering.as_operand(x, grouped), mask)
  operands += (count, sums) if static is None else (None, sums[1:])
  return lowering.cond_with_1d_results(_plain_sums_ok(*sums), keep, second_pass, *operands)


def _kernel_reduces(x, axes, mask, grouped) -> bool:
  """Whether the CPU kernel (`cpu_kernel.moments`) computes these statistics: features last, every
  other axis reduced (but the groups of a `grouped` view), a mask (if any) the same for every feature."""
  leading = tuple(range(1 if grouped else 0, x.ndim - 1))
  per_row = mask is None or mask.shape[-1] == 1
  return (
    per_row and tuple(axes) == leading and cpu_kernel.handles(x.shape, x.dtype, x.dtype, grouped)
  )


def _kernel_statistics(x, mask, count, shift, *, grouped, axis_name, groups, finish):
  """`finish((mean, var, count))` from the CPU kernel's per-device moments (`cpu_kernel.moments`).

  On one device the epilogue runs as a nested program (`lowering.nested_program`: its kernels do not
  count toward the outer program's 8). Across devices, one round of `psum` adds each device's count
  and its first two raw moments, `n·μ` and `n·(σ² + μ²)` (`shift` is not used: as in `_shifted_cpu`,
  computing it would cost kernels). Where the global mean lies more than 3 std from 0 those sums could
  lose digits (see `_plain_sums_ok`) and a second round combines the moments about the global mean
  instead (Chan et al.): exact, and no second read of `x`. Every device sees the same sums, so all take the same branch;
  with `axis_index_groups` (whose groups could differ) the second round always runs.
  """
  # the kernel reads x in the shape it was grouped from (XLA:CPU copies a reshaped bfloat16 operand)
  source = lowering.as_operand(x, grouped)
  valid = None if mask is None else lowering.as_operand(mask[..., 0], grouped)
  moments = cpu_kernel.moments(source, valid, groups=x.shape[0] if grouped else None)
  mean, var = (v.reshape(jnp.shape(count)) for v in moments)
  if axis_name is None:
    return lowering.nested_program(finish, (mean, var, count))
  if groups is not None:
    return finish(_combine(count, mean, var * count, axis_name, groups))
  del shift  # as `_shifted_cpu`: plain sums and a check (a shift would add kernels to compute it)
  weighted = jnp.where(count > 0, count * mean, 0.0)
  # one stacked operand: one kernel computes both sums, and the slices fuse into their consumers
  raw = jnp.stack([weighted, jnp.where(count > 0, count * var, 0.0) + weighted * mean])
  static = _static_counts(count, axis_name)
  if static is None:
    total, raw = collectives.cross_device_sum((count, raw), axis_name)
  else:  # known at trace time: made inside the branches (`_counts_in_branch`; passed in, the three
    # broadcasts of constants were kernels of their own: 10 instead of 7)
    total, raw = None, collectives.cross_device_sum(raw, axis_name)
  counts = functools.partial(_counts_in_branch, static, jnp.shape(count))

  def keep(count, total, raw, mean, var):
    _, total = counts(count, total)
    return finish(_from_shifted_sums(total, raw[0], raw[1], 0.0))

  def second_round(count, total, raw, mean, var):
    count, total = counts(count, total)
    global_mean = _safe_divide(raw[0], total)
    m2 = _m2_about(global_mean, count, mean, count * var, axis_name, None)
    return finish((global_mean, _safe_divide(m2, total), total))

  _, known_total = counts(count, total)
  precise = _plain_sums_ok(known_total, raw[0], raw[1])
  operands = (count, total) if static is None else (None, None)
  return lowering.cond_with_1d_results(precise, keep, second_round, *operands, raw, mean, var)


def _counts_in_branch(static, shape, count, total):
  """`(count, total)` for a conditional's branch: as passed, or, where `_static_counts` knows them at
  trace time (`static`), made here as constants of `shape`, which XLA folds inside the branch (passed
  in as operands, each would be a kernel broadcasting a constant)."""
  if static is None:
    return count, total
  return tuple(jnp.full(shape, v, jnp.float32) for v in static)


def _static_counts(count, axis_name):
  """`(local, total)` valid counts as Python numbers when they are known at trace time (no mask, and
  a static size of `axis_name`), `total` summed over its devices; None otherwise."""
  if not isinstance(count, np.ndarray) or count.size == 0:
    return None
  size = 1 if axis_name is None else collectives._static_axis_size(axis_name)  # pylint: disable=protected-access
  local = float(count.flat[0])
  return None if size is None else (local, local * size)


def _plain_sums_ok(total, s1, s2):
  """Whether every statistic from plain sums keeps its precision: mean² ≤ 9 var (or no element).

  NaN statistics fail the test (the second pass then decides). `lowering.any_true` keeps it to one
  fused reduction on XLA:CPU (`jnp.all` takes three kernels there).
  """
  mean, var, total = _from_shifted_sums(total, s1, s2, jnp.zeros((), s1.dtype))
  return ~lowering.any_true(~((mean * mean <= CPU_PLAIN_SUMS_LIMIT * var) | (total == 0)))


def _two_pass(x, axes, mask, count):
  xf = _acc(x)
  mean = _safe_divide(_masked_sum(xf, mask, axes), count)
  deviation = xf - mean
  return mean, _masked_sum(deviation * deviation, mask, axes)


def _combine(count, local_mean, m2, axis_name, groups):
  """Chan's parallel combination of per-device (count, mean, M2) into global (mean, var, count)."""
  if axis_name is not None:
    total, weighted = collectives.cross_device_sum((count, count * local_mean), axis_name, groups)
    mean = _safe_divide(weighted, total)
    m2 = _m2_about(mean, count, local_mean, m2, axis_name, groups)
    count = total
  else:
    mean = local_mean
  return mean, jnp.maximum(_safe_divide(m2, count), 0.0), count


def _m2_about(mean, count, local_mean, m2, axis_name, groups):
  """Chan's second round: the devices' squared deviations from the global `mean`, summed over
  `axis_name` (exact for any per-device counts; a device without a valid element adds 0)."""
  spread = m2 + count * jnp.square(local_mean - mean)
  return collectives.cross_device_sum(jnp.where(count > 0, spread, 0.0), axis_name, groups)


def _fast(x, axes, mask, count, axis_name, groups):
  xf = _acc(x)
  sums = (count, _masked_sum(xf, mask, axes), _masked_sum(xf * xf, mask, axes))
  count, s1, s2 = collectives.cross_device_sum(sums, axis_name, groups)
  mean = _safe_divide(s1, count)
  return mean, jnp.maximum(_safe_divide(s2, count) - jnp.square(mean), 0.0), count


def merge_moments(count_a, mean_a, var_a, count_b, mean_b, var_b):
  """Statistics of the union of two sets from theirs (biased variances, counts may be arrays).

  The merged variance is the count-weighted mean of the variances plus the count-weighted variance of the
  means: ``var = (n_a var_a + n_b var_b) / n + n_a n_b (mean_a - mean_b)^2 / n^2`` (Chan et al. 1983).

  Returns:
    `(count, mean, var)` of the union; an empty union gives mean 0 and variance 0.
  """
  count = count_a + count_b
  delta = mean_b - mean_a
  mean = mean_a + _safe_divide(count_b * delta, count)
  spread = (
    count_a * var_a + count_b * var_b + _safe_divide(count_a * count_b * delta * delta, count)
  )
  return count, mean, _safe_divide(spread, count)


def merge_moments_along(count, mean, var, axis: int):
  """Merges per-part statistics stacked along `axis` into those of the union (keeps no `axis`).

  Returns:
    `(count, mean, var)` with `count = Σ n_k`, `mean = Σ n_k μ_k / count` and
    `var = Σ n_k (σ²_k + (μ_k − mean)²) / count`.
  """
  count = jnp.broadcast_to(count, jnp.broadcast_shapes(jnp.shape(count), jnp.shape(mean)))
  total = jnp.sum(count, axis=axis)
  merged_mean = _safe_divide(jnp.sum(count * mean, axis=axis), total)
  spread = var + jnp.square(mean - jnp.expand_dims(merged_mean, axis))
  return total, merged_mean, _safe_divide(jnp.sum(count * spread, axis=axis), total)
