"""The BatchNorm transform and its composable options: synchronized, ghost, renorm, running statistics.

See `batch_norm` for the options and the README's semantics table for how they map onto PyTorch, flax,
Haiku and Keras.

Training-mode derivatives use the closed-form rule of `fused_batch_norm` (a `jax.custom_jvp`): forward
mode (`jax.jvp`, `jax.jacfwd`), reverse mode and higher orders (`jax.hessian`) all work; reverse mode
is one reduction and one elementwise pass and keeps only `x`. The values are those of autodiff through
`moments`.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from normjax._src import collectives
from normjax._src import cpu_kernel
from normjax._src import fused_batch_norm
from normjax._src import lowering
from normjax._src import normalize as normalize_lib
from normjax._src import pallas_plan
from normjax._src import renorm as renorm_lib
from normjax._src import running
from normjax._src import state_types
from normjax._src import stats
from normjax._src import transform
from normjax._src import validation


@state_types.registered_state
class BatchNormState(NamedTuple):
  """Running statistics of a BatchNorm layer (float32 whatever the input dtype)."""

  mean: jax.Array  # f32[*feature_shape]: running mean, initially 0
  var: jax.Array  # f32[*feature_shape]: running variance, initially 1
  count: jax.Array  # i32[]: number of training updates applied so far


GHOST_GROUPINGS = ("consecutive", "strided")
STATS_SHIFTS = ("running", "batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchNormConfig:
  """The options of `batch_norm`, validated at construction. See `batch_norm` for their meaning."""

  axis: validation.Axes = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  debias: bool = False
  unbiased_running_var: bool = False
  use_scale: bool = True
  use_bias: bool = True
  stats_method: str = "shifted"
  stats_shift: str = "running"
  axis_name: Any = None
  axis_index_groups: Any = None
  ghost_batch_size: Optional[int] = None
  ghost_grouping: str = "consecutive"
  renorm: bool = False
  r_max: renorm_lib.ScalarOrSchedule = 3.0
  d_max: renorm_lib.ScalarOrSchedule = 5.0
  check_finite: bool = False
  tpu_kernel: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    validation.check_momentum(self.momentum)
    validation.check_positive(self.epsilon, "epsilon")
    if (
      self.momentum is not None
    ):  # NumPy / JAX scalars become Python floats: the config stays hashable
      object.__setattr__(self, "momentum", float(self.momentum))
    object.__setattr__(self, "epsilon", float(self.epsilon))
    if self.stats_method not in stats.METHODS:
      raise ValueError(f"stats_method={self.stats_method!r} must be one of {stats.METHODS}")
    if self.stats_shift not in STATS_SHIFTS:
      raise ValueError(f"stats_shift={self.stats_shift!r} must be one of {STATS_SHIFTS}")
    if self.debias and self.momentum is None:
      raise ValueError("debias=True needs an EMA momentum; momentum=None is already unbiased")
    g = self.ghost_batch_size
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 2):
      raise ValueError(f"ghost_batch_size={g!r} must be an int >= 2 (or None for the whole batch)")
    if self.ghost_grouping not in GHOST_GROUPINGS:
      raise ValueError(f"ghost_grouping={self.ghost_grouping!r} must be one of {GHOST_GROUPINGS}")
    for flag in ("check_finite", "tpu_kernel"):
      value = getattr(self, flag)
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{flag}={value!r} must be a bool")
      object.__setattr__(self, flag, bool(value))
    if self.axis_name is None and self.axis_index_groups is not None:
      raise ValueError("axis_index_groups needs axis_name to be set")
    collectives.check_axis_index_groups(self.axis_index_groups)
    if self.axis_index_groups is not None:  # hashable, so the config can be static
      object.__setattr__(
        self, "axis_index_groups", tuple(tuple(int(i) for i in g) for g in self.axis_index_groups)
      )
    if self.renorm:
      renorm_lib.check_clipping(self.r_max, self.d_max)


def feature_axes(config: BatchNormConfig, ndim: int) -> Tuple[int, ...]:
  return validation.normalize_axes(config.axis, ndim, "axis")


def init_variables(feature_shape, *, use_scale=True, use_bias=True, param_dtype=jnp.float32):
  """Initial `(params, state)`: scale 1, bias 0, running mean 0, running variance 1, count 0."""
  params = {}
  if use_scale:
    params["scale"] = jnp.ones(feature_shape, param_dtype)
  if use_bias:
    params["bias"] = jnp.zeros(feature_shape, param_dtype)
  state = BatchNormState(
    jnp.zeros(feature_shape, jnp.float32),
    jnp.ones(feature_shape, jnp.float32),
    jnp.zeros((), jnp.int32),
  )
  return params, state


def init_for_config(config, x):
  """`(params, state)` for `x` (an array or ShapeDtypeStruct) from any config with `axis`, `use_scale`,
  `use_bias` and `param_dtype` (BatchNorm and frozen BatchNorm)."""
  validation.check_float_input(jax.ShapeDtypeStruct(x.shape, x.dtype), "x")
  axes = validation.normalize_axes(config.axis, len(x.shape), "axis")
  return init_variables(
    tuple(x.shape[a] for a in axes),
    use_scale=config.use_scale,
    use_bias=config.use_bias,
    param_dtype=config.param_dtype,
  )


def check_variables(config, params, state, feature_shape):
  """Raises unless `params` and the `BatchNormState` `state` match `config` and the feature shape."""
  expected = {k for k, use in (("scale", config.use_scale), ("bias", config.use_bias)) if use}
  if not isinstance(params, dict) or set(params) != expected:
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(
      f"params has keys {keys}; expected {sorted(expected)} for use_scale="
      f"{config.use_scale}, use_bias={config.use_bias}"
    )
  for name, value in params.items():
    validation.check_array(value, feature_shape, config.param_dtype, f"params[{name!r}]")
  if not isinstance(state, BatchNormState):
    raise TypeError(f"state is a {type(state).__name__}; expected a BatchNormState from init")
  validation.check_array(state.mean, feature_shape, jnp.float32, "state.mean")
  validation.check_array(state.var, feature_shape, jnp.float32, "state.var")
  validation.check_array(state.count, (), jnp.int32, "state.count")


def _group(config, a):
  """`a` with its batch axis 0 split into (groups, ghost_batch_size): group j is
  rows j·g … j·g + g − 1 ("consecutive") or rows j, j + n/g, j + 2n/g, … ("strided")."""
  n, g = a.shape[0], config.ghost_batch_size
  if config.ghost_grouping == "consecutive":
    return a.reshape((n // g, g) + a.shape[1:])
  return jnp.swapaxes(a.reshape((g, n // g) + a.shape[1:]), 0, 1)  # tf-keras' [g, -1] + shape[1:]


def _grouped(config, x, mask):
  """Splits the batch axis 0 into (groups, ghost_batch_size) as `_group`; one group without ghost
  batches. The rank-matched `mask` is split alike (broadcast along axis 0 first)."""
  g = config.ghost_batch_size
  if g is None:
    return x.reshape((1,) + x.shape), None if mask is None else mask.reshape((1,) + mask.shape)
  if x.shape[0] % g:
    raise ValueError(f"ghost_batch_size={g} must divide the batch size {x.shape[0]} along axis 0")
  if mask is not None:
    mask = _group(config, jnp.broadcast_to(mask, (x.shape[0],) + mask.shape[1:]))
  return _group(config, x), mask


def _ungrouped(config, y, shape):
  """The inverse of `_grouped` for an output `y` of the grouped shape."""
  if config.ghost_batch_size is not None and config.ghost_grouping == "strided":
    y = jnp.swapaxes(y, 0, 1)
  return y.reshape(shape)


def _group_size_over_devices(config) -> int:
  if config.axis_name is None:
    return 1
  if config.axis_index_groups is not None:
    return min(len(g) for g in config.axis_index_groups)
  return collectives._static_axis_size(config.axis_name) or 1  # pylint: disable=protected-access


def _check_group_count(config, xg, reduce_axes):
  per_device = math.prod(xg.shape[a] for a in reduce_axes)
  if per_device * _group_size_over_devices(config) < 2:
    raise ValueError(
      f"training with {per_device} element(s) per feature in each statistics group: the batch "
      "variance is undefined. Use a larger batch (or ghost_batch_size), an axis_name to pool "
      "devices, or training=False"
    )


def stats_shift(config, state, x, shape):
  """The shift of the one-pass statistics (keepdims `shape`), or None for the probe of this batch.

  With `stats_shift="running"` it is the (debiased) running mean: it does not depend on this batch, so
  the statistics are one pass that XLA may fuse into the op producing `x`, and synchronized statistics
  take one round of `psum`. It is made common to the devices of `axis_name` (see
  `collectives.common_value`). A fresh layer's running mean is 0, so on the first training step the
  statistics have the precision of E[x²] − E[x]² there (the CPU lowering checks and repeats the pass
  where that would lose precision; GPU and TPU do not).
  """
  if config.stats_method != "shifted" or config.stats_shift == "batch":
    return None
  shift = running.shift_estimate(
    state.mean, state.count, momentum=config.momentum, debias=config.debias
  )
  shift = jax.lax.stop_gradient(shift.reshape(shape))
  if config.axis_name is not None:
    shift = collectives.common_value(shift, x, config.axis_name, config.axis_index_groups)
  return shift


def running_targets(config, mean, var, count):
  """Per-feature batch statistics for the running update: the count-weighted average over groups (with
  equal counts, i.e. without a mask, tf-keras' plain mean over virtual batches), and the total count."""
  if config.unbiased_running_var:
    var = jnp.where(count > 1, var * count / jnp.maximum(count - 1.0, 1.0), var)
  total = lowering.sum_leading(count)
  weight = count / jnp.maximum(total, 1.0)
  return lowering.sum_leading(weight * mean), lowering.sum_leading(weight * var), total


def check_finite_moments(batch_mean, batch_var, total):
  """`checkify.check` that every feature with a valid element has finite batch statistics."""
  bad = ((total > 0) & ~(jnp.isfinite(batch_mean) & jnp.isfinite(batch_var))).ravel()
  checkify.check(
    ~jnp.any(bad),
    "normjax batch_norm: the batch statistics of {count} feature(s) are "
    "not finite (the first at flat feature index {first}); their running statistics keep "
    "their previous values",
    count=jnp.sum(bad),
    first=jnp.argmax(bad),
  )


def updated_state(config, state, batch_mean, batch_var, total):
  """The running statistics after a training step (Ioffe & Szegedy 2015; Ioffe 2017 Alg. 1 for renorm).

  A feature with no valid element (`total == 0`) or whose new values would not be finite keeps its
  previous running values; the count advances when at least one feature was updated.
  """
  options = dict(momentum=config.momentum, debias=config.debias)
  mean = running.update(state.mean, batch_mean, state.count, **options)
  if config.renorm:  # the moving average is of σ = sqrt(var + ε), as the paper and Keras
    var = renorm_lib.running_var_update(
      state.var, batch_var, state.count, epsilon=config.epsilon, **options
    )
    # that update is finite exactly when the batch variance is (it stays below float32's overflow),
    # so the guard tests the batch variance: its square roots then feed one kernel on XLA:CPU
    valid = (total > 0) & jnp.isfinite(batch_var)
    (mean,), updated = running.select_finite((state.mean,), (mean,), valid)
    var = jnp.where(updated, var, state.var)
  else:
    var = running.update(state.var, batch_var, state.count, **options)
    (mean, var), updated = running.select_finite((state.mean, state.var), (mean, var), total > 0)
  count = state.count + lowering.any_true(updated).astype(state.count.dtype)
  return BatchNormState(
    *(jax.lax.stop_gradient(v.astype(o.dtype)) for v, o in zip((mean, var, count), state))
  )


def _per_feature_epilogue(config, state, bshape, feature_shape, moments):
  """Everything a training step computes per feature from the batch moments: renorm's corrections,
  the running update and the merged moments. It runs inside `moments_and_count` (its `epilogue`), so
  a CPU program keeps this work inside the precision check's branches.

  Returns:
    `((mean, var, count, rstd), (r, d), new_state, (batch_mean, batch_var, batch_total), (total, mean,
    var))`: the per-group moments with `rstd = 1 / sqrt(var + epsilon)`, renorm's corrections (None without renorm), the new `BatchNormState`, the
    running update's targets and the moments of the whole batch (feature shape).
  """
  mean, var, count = moments
  r = d = None
  if config.renorm:
    r, d = renorm_lib.corrections(
      mean,
      var,
      state.mean.reshape(bshape),
      state.var.reshape(bshape),
      state.count,
      r_max=config.r_max,
      d_max=config.d_max,
      epsilon=config.epsilon,
    )
  targets = tuple(v.reshape(feature_shape) for v in running_targets(config, mean, var, count))
  new_state = updated_state(config, state, *targets)
  merged = stats.merge_moments_along(count, mean, var, axis=0)
  merged = tuple(v.reshape(feature_shape) for v in merged)
  rstd = jax.lax.rsqrt(var + config.epsilon)
  return (mean, var, count, rstd), (r, d), new_state, targets, merged


def _apply(config: BatchNormConfig, params, state, x, *, training, mask=None):
  y, new_state, _ = apply_with_batch_moments(config, params, state, x, training=training, mask=mask)
  return y, new_state


def apply_with_batch_moments(
  config: BatchNormConfig, params, state, x, *, training, mask=None, closed_form: bool = True
):
  """`apply`, also returning the batch's per-feature `(count, mean, var)` (None when not training).

  The moments are those of the whole (global, valid) batch, ghost groups merged exactly; population
  recalibration (`normjax.linen.recalibrate_batch_stats`) accumulates them; they are held constant
  for differentiation. Unused, XLA drops them.
  `closed_form=False` differentiates by plain autodiff through `moments` instead of the closed-form
  rule (same values; the reference the tests and benchmarks compare against).
  """
  training = transform.check_training_flag(training)
  validation.check_float_input(x, "x")
  x = jnp.asarray(x)
  axes = feature_axes(config, x.ndim)
  feature_shape = tuple(x.shape[a] for a in axes)
  check_variables(config, params, state, feature_shape)
  mask = validation.prepare_mask(mask, x.shape)
  bshape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  scale = params["scale"].reshape(bshape) if config.use_scale else None
  bias = params["bias"].reshape(bshape) if config.use_bias else None
  dtype = config.dtype or x.dtype
  if not training:
    y = normalize_lib.normalize(
      x,
      state.mean.reshape(bshape),
      state.var.reshape(bshape),
      scale,
      bias,
      epsilon=config.epsilon,
      dtype=dtype,
    )
    return y, state, None
  xg, mask_g = _grouped(config, x, mask)
  reduce_axes = tuple(a for a in range(xg.ndim) if a != 0 and a - 1 not in axes)
  _check_group_count(config, xg, reduce_axes)
  per_feature = functools.partial(_per_feature_epilogue, config, state, bshape, feature_shape)
  step = _TrainingStep(
    config, params, state, mask_g, scale, bias, per_feature, reduce_axes, bshape, dtype, x.shape
  )
  xla = _no_statistics_tangents(functools.partial(_xla_training, step, closed_form))
  kernels = _kernels(config, x, mask, axes, dtype) if closed_form else ()
  if kernels:  # a TPU's Pallas kernel, a CPU's custom call; every other platform: the XLA program
    # both branches take (and keep for reverse mode) the same operand, so a vjp keeps one x; the
    # statistics leave the branches without tangents (or a vjp would keep residuals for them)
    branches = {
      platform: _no_statistics_tangents(functools.partial(_kernel_training, step, platform))
      for platform in kernels
    }
    y, new_state, targets, moments = jax.lax.platform_dependent(xg, **branches, default=xla)
  else:
    y, new_state, targets, moments = xla(xg)
  if config.check_finite:
    check_finite_moments(*targets)
  return y, new_state, moments


class _TrainingStep(NamedTuple):
  """What both ways of computing a training step (`_xla_training`, `_kernel_training`) share."""

  config: BatchNormConfig
  params: Any
  state: BatchNormState
  mask_g: Any  # the grouped mask, or None
  scale: Any  # keepdims-shaped, or None
  bias: Any
  per_feature: Any  # `_per_feature_epilogue` bound to the layer
  reduce_axes: Tuple[int, ...]  # of the grouped view
  bshape: Tuple[int, ...]
  dtype: Any
  shape: Tuple[int, ...]  # of the ungrouped input


def _xla_training(step: _TrainingStep, closed_form: bool, xg):
  """The portable training step: statistics (`stats.moments_and_count`) and the closed-form normalize.

  Returns `(y, new_state, targets, moments)` as `apply_with_batch_moments` uses them, `y` of
  `step.shape` (the ungrouped input's)."""
  config = step.config
  shift = stats_shift(config, step.state, xg, (1,) + step.bshape)
  strided = config.ghost_batch_size is not None and config.ghost_grouping == "strided"
  # strided ghost groups are not contiguous in x: the CPU kernel (`cpu_kernel.moments`) would need a
  # transposed copy of x, where XLA's reductions read the strided view in place
  kernel = cpu_kernel.switched(False) if strided else contextlib.nullcontext()
  with kernel:
    (mean, var, count, rstd), (r, d), new_state, targets, moments = _statistics(step, xg, shift)
  y = fused_batch_norm.normalize_training(  # closed-form derivatives (forward and reverse mode)
    xg,
    step.mask_g,
    step.scale,
    step.bias,
    r,
    d,
    (mean, var, count),
    reduce_axes=step.reduce_axes,
    axis_name=config.axis_name,
    axis_index_groups=config.axis_index_groups,
    epsilon=config.epsilon,
    dtype=step.dtype,
    closed_form=closed_form,
    rstd=rstd,
  )
  return _ungrouped(config, y, step.shape), new_state, targets, moments


def _statistics(step: _TrainingStep, xg, shift):
  """`stats.moments_and_count` of the grouped input with the layer's epilogue (`step.per_feature`)."""
  config = step.config
  return stats.moments_and_count(
    xg,
    step.reduce_axes,
    mask=step.mask_g,
    axis_name=config.axis_name,
    axis_index_groups=config.axis_index_groups,
    method=config.stats_method,
    shift=shift,
    grouped=True,
    epilogue=step.per_feature,
  )


def _no_statistics_tangents(training):
  """`training` with its per-feature results (`targets`, `moments`) held constant for differentiation."""

  def run(xg):
    y, new_state, targets, moments = training(xg)
    return y, new_state, jax.lax.stop_gradient(targets), jax.lax.stop_gradient(moments)

  return run


def _statistics_are_local(config) -> bool:
  """Whether each device's statistics are its own: no `axis_name`, or one known at trace time to pool
  a single device (an axis of size 1, or `axis_index_groups` of one device each). Synchronized
  BatchNorm is then exactly the local one, as PyTorch's `SyncBatchNorm` falls back to `batch_norm` on
  a world of one process."""
  if config.axis_name is None:
    return True
  if config.axis_index_groups is not None:
    return all(len(g) == 1 for g in config.axis_index_groups)
  return collectives._static_axis_size(config.axis_name) == 1  # pylint: disable=protected-access


def _kernels(config, x, mask, axes, dtype) -> Tuple[str, ...]:
  """The platforms ("tpu", "cpu") whose kernel runs this training step: features last, statistics of
  one device (`_statistics_are_local`) without a mask, accurate statistics (not "fast"). On a TPU, with
  `tpu_kernel=True`, the Pallas kernels (`pallas_batch_norm`, `pallas_backward` for the backward, or
  their two-sweep forms in `pallas_streaming`) for one group without renorm, where
  `pallas_plan.forward_kernel` finds one; on a
  CPU the custom call (`cpu_kernel`) where it is built, also for consecutive ghost batches and
  renorm (its corrections folded into the kernel's affine). (The other
  features-last steps on a CPU take their statistics from `cpu_kernel.moments` inside
  `stats.moments_and_count`, and XLA normalizes.)"""
  plain = _statistics_are_local(config) and mask is None
  if not (plain and config.stats_method != "fast" and axes == (x.ndim - 1,)):
    return ()
  one_group = config.ghost_batch_size is None
  tpu = config.tpu_kernel and one_group and not config.renorm
  tpu = tpu and pallas_plan.forward_kernel(x.shape, x.dtype, dtype) is not None
  cpu = one_group or config.ghost_grouping == "consecutive"  # groups: contiguous slices of x
  cpu = cpu and cpu_kernel.handles((1,) + x.shape, x.dtype, dtype, grouped=True)
  return ("tpu",) * tpu + ("cpu",) * cpu


def _kernel_training(step: _TrainingStep, platform: str, xg):
  """`_xla_training`'s results from `platform`'s kernel (the TPU's Pallas kernel: exact two-pass
  statistics and y in one read; the CPU's custom call: two reads). `xg` is the grouped view
  `(groups, g, ...)` (one group for the TPU), each group reduced over all axes but the last."""
  config = step.config
  scale = step.params["scale"] if config.use_scale else None
  bias = step.params["bias"] if config.use_bias else None
  renorm = None
  if config.renorm:  # the CPU kernel folds r and d into the affine (`_kernels`: no TPU kernel)
    limits = renorm_lib.limits(config.r_max, config.d_max, step.state.count)
    renorm = (step.state.mean, step.state.var, *limits)
  y, mean, var = fused_batch_norm.statistics_and_normalize(
    xg,
    scale,
    bias,
    epsilon=config.epsilon,
    dtype=step.dtype,
    kernel="pallas" if platform == "tpu" else "cpu",
    grouped=platform == "cpu",
    renorm=renorm,
  )
  if config.axis_name is not None:  # local statistics (`_kernels`); summed over the one device so
    # that they are typed, as synchronized ones are, invariant over the axis (`shard_map`'s check_vma)
    mean, var = collectives.cross_device_sum(
      (mean, var), config.axis_name, config.axis_index_groups
    )
  count = stats.valid_count(xg.shape, step.reduce_axes, None)  # keepdims, a NumPy constant
  moments = (mean.reshape(count.shape), var.reshape(count.shape), count)
  _, _, new_state, targets, moments = step.per_feature(moments)
  return y.reshape(step.shape), new_state, targets, moments


def batch_norm(
  *,
  axis: validation.Axes = -1,
  momentum: Optional[float] = 0.99,
  epsilon: float = 1e-5,
  debias: bool = False,
  unbiased_running_var: bool = False,
  use_scale: bool = True,
  use_bias: bool = True,
  stats_method: str = "shifted",
  stats_shift: str = "running",
  axis_name=None,
  axis_index_groups=None,
  ghost_batch_size: Optional[int] = None,
  ghost_grouping: str = "consecutive",
  renorm: bool = False,
  r_max: renorm_lib.ScalarOrSchedule = 3.0,
  d_max: renorm_lib.ScalarOrSchedule = 5.0,
  check_finite: bool = False,
  tpu_kernel: bool = False,
  dtype=None,
  param_dtype=jnp.float32,
) -> transform.Transform:
  """Batch Normalization as a pair of pure functions, with every variant as a composable option.

  In training, `y = scale * (x - μ_B) / sqrt(σ²_B + epsilon) + bias` with μ_B, σ²_B the mean and biased
  variance of the batch over every axis but the feature `axis`; the running statistics then move towards
  the batch's. In evaluation (`training=False`) the running statistics replace μ_B and σ²_B and the state
  is returned unchanged.

  Running statistics are never poisoned by one batch. A feature whose batch moments are not finite (a NaN
  or inf in the batch) keeps its previous running mean and variance; its output still shows the NaN, so
  the loss reveals it (`check_finite=True` stops at that batch). A feature with no valid element (masked
  out everywhere) keeps its running values too; `state.count` advances when at least one feature was
  updated (it is one scalar per layer, so with `debias` or `momentum=None` a feature that skipped a batch
  is weighted as if it had not). PyTorch and flax have no such guard: one NaN element makes that
  feature's running statistics NaN for good, and an all-masked batch pulls them towards 0.

  Args:
    axis: the feature axis or axes (default -1, channels last). Statistics reduce over all other axes.
    momentum: weight of the old running value: `new = momentum * old + (1 - momentum) * batch` (flax and
      Keras convention; PyTorch's momentum is `1 - momentum`). None gives the cumulative average of all
      batches seen, as PyTorch's `momentum=None`.
    epsilon: added to the variance before the square root.
    debias: zero-debiased EMA (Haiku): the running value is the EMA divided by `1 - momentum**t`, so it
      does not lean towards the initial value.
    unbiased_running_var: store the Bessel-corrected batch variance `n/(n-1) σ²_B` in the running
      variance, as PyTorch does. Training always normalizes with the biased batch variance.
    use_scale, use_bias: learn the per-feature `scale` (γ, init 1) and `bias` (β, init 0).
    stats_method: "shifted" (accurate one pass, default), "two_pass", or "fast" (flax's E[x²]−E[x]²).
    stats_shift: the shift K of the "shifted" one pass, which must lie near the batch mean.
      "running" (default): the running mean (debiased), a value that does not depend on this batch, so
      the pass can fuse into the op that produces `x` and synchronized statistics need one all-reduce;
      a fresh layer shifts by 0 on its first step, where GPU and TPU then have the precision of
      E[x²] − E[x]² (the CPU lowering detects |mean| > 3 std and repeats the pass). "batch": a probe of
      this batch (accurate from the first step everywhere; the pass waits for the probe, and
      synchronized statistics take two rounds of psum).
    axis_name: mapped axis over which statistics are synchronized (global-batch BN under `shard_map`,
      `pmap` or `vmap`); counts are summed, so unequal numbers of valid examples per device are exact.
      Under plain `jit` with a batch sharded by `NamedSharding`, no axis name is needed: the arrays are
      global and XLA inserts the cross-device reductions itself. Where the axis is known at trace time
      to pool one device (size 1, or `axis_index_groups` of one device each), the statistics are that
      device's own and the layer runs the local program (on a CPU, the fused kernel), as PyTorch's
      `SyncBatchNorm` does on one process; values and `shard_map` typing are unchanged.
    axis_index_groups: partition of the devices of `axis_name` into groups synchronized separately.
    ghost_batch_size: split the batch axis 0 (size n) into n / ghost_batch_size groups of this size g,
      each normalized by its own statistics (ghost / virtual BN, Hoffer et al. 2017). The running
      statistics move by the count-weighted mean of the groups' means and variances (without a mask: their
      plain mean, as tf-keras `virtual_batch_size`). With `axis_name`, group j of every device is pooled.
    ghost_grouping: which rows form a group. "consecutive" (default, Hoffer et al.): group j is rows
      j·g … j·g + g − 1. "strided" (tf-keras `virtual_batch_size`, which reshapes the batch to
      `[g, n/g, ...]` and reduces over the first axis): group j is rows j, j + n/g, j + 2n/g, …; with it
      normjax reproduces tf-keras' outputs and moving statistics. Keras 3 has no virtual batches.
    renorm: Batch Renormalization (Ioffe 2017): `y = γ((x−μ_B)/σ_B · r + d) + β` with
      `r = sg(clip(σ_B/σ, 1/r_max, r_max))`, `d = sg(clip((μ_B−μ)/σ, −d_max, d_max))`, μ and
      σ = sqrt(var + ε) the running statistics before this step's update. As in the paper's Algorithm 1
      the moving average is taken of σ_B = sqrt(σ²_B + ε), not of σ²_B, and the state keeps
      var = σ² − ε, so inference is unchanged. This is Keras' `BatchNormalization(renorm=True)` with
      `renorm_momentum=momentum`, `renorm_clipping={"rmin": 1/r_max, "rmax": r_max, "dmax": d_max}` and
      the same epsilon, step by step (Keras starts its moving σ at 1, normjax at sqrt(1 + ε)). `debias`
      and `momentum=None` average σ the same way; with `unbiased_running_var`, σ_B uses the
      Bessel-corrected variance. With ghost batches, r and d are per group (tf-keras computes them from
      the groups' averaged moments).
    r_max, d_max: renorm clip limits, numbers or schedules of the step count (`state.count`);
      `normjax.batch_renorm_paper_schedule()` gives the paper's.
    check_finite: when training, `jax.experimental.checkify.check` that every feature with a valid
      element has finite batch statistics, so a training loop can stop at the first non-finite batch.
      Functionalize the step with `checkify.checkify(step)` (required under `jit`), then `err.throw()`.
    tpu_kernel: on a TPU, run a plain training step (features last, no ghost batches, mask,
      synchronization across devices or renorm, `stats_method` not "fast") as the Pallas kernels
      (`pallas_batch_norm` forward: one read of `x`; `pallas_backward`: one read of `x` and `dy`)
      where their blocks fit the chip's VMEM, else in two sweeps over chunks that keep what fits
      in VMEM (`pallas_streaming`) where those move less than XLA; other steps and platforms keep
      the XLA program. Off
      by default: inside a network XLA fuses BatchNorm into the neighbouring convolutions and
      elementwise ops, which a kernel prevents. Compiled for one v5e chip, a ResNet-18 CIFAR train
      step at 32 images moves 1.41× the bytes with the kernels (BENCHMARKS.md); an isolated layer
      moves 5 N instead of 7 N (N = the bytes of `x`). Never run on a TPU: compiler figures only.
    dtype: output dtype (default: the input's). Statistics and arithmetic are float32 (float64 for
      float64 input); the running statistics are stored in float32 always.
    param_dtype: dtype of `scale` and `bias` (default float32).

  Returns:
    A `Transform` with `init(x) -> (params, state)` and
    `apply(params, state, x, *, training, mask=None) -> (y, new_state)`; `params` is a dict with
    `scale` and `bias` of the feature shape, `state` a `BatchNormState`. `mask` (boolean, True = valid)
    has x's rank with each dimension 1 or x's, or is 1-D of shape `(x.shape[0],)` (one flag per
    example along axis 0); masked elements do not count in the statistics.

  Raises:
    ValueError: bad options (momentum outside [0, 1), ghost_batch_size < 2, r_max < 1, d_max < 0, ...);
      at trace time: an axis out of range, a ghost batch size that does not divide the batch, a mask
      of another rank (other than a 1-D per-example mask) or that does not broadcast, params/state that
      do not match `x`, or a single element per feature in a statistics group when training.
    TypeError: integer or boolean `x`, a non-boolean mask, a non-bool `training`, `check_finite` or
      `tpu_kernel`.

  Example:
    >>> import jax, jax.numpy as jnp, normjax
    >>> bn = normjax.batch_norm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (32, 8)) * 3.0 + 5.0
    >>> params, state = bn.init(x)
    >>> y, state = bn.apply(params, state, x, training=True)
    >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5)), int(state.count)
    (True, 1)

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Hoffer et al. 2017, arXiv:1705.08741 (ghost BN);
    Ioffe 2017, arXiv:1702.03275 (Batch Renormalization).
  """
  options = dict(locals())
  return from_config(BatchNormConfig(**options))


def from_config(config: BatchNormConfig) -> transform.Transform:
  """The BatchNorm `Transform` for a validated `BatchNormConfig` (used by the Flax wrappers)."""
  return transform.Transform(
    init=functools.partial(init_for_config, config), apply=functools.partial(_apply, config)
  )


def ghost_batch_norm(ghost_batch_size: int, **options) -> transform.Transform:
  """`batch_norm(ghost_batch_size=ghost_batch_size, **options)`: ghost / virtual BN (arXiv:1705.08741).

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> bn = normjax.ghost_batch_norm(4)
    >>> params, state = bn.init(jnp.ones((16, 3)))
  """
  return batch_norm(ghost_batch_size=ghost_batch_size, **options)


def batch_renorm(
  r_max: renorm_lib.ScalarOrSchedule = 3.0, d_max: renorm_lib.ScalarOrSchedule = 5.0, **options
) -> transform.Transform:
  """`batch_norm(renorm=True, r_max=r_max, d_max=d_max, **options)` (Ioffe 2017, arXiv:1702.03275).

  Example:
    >>> import normjax
    >>> bn = normjax.batch_renorm(**normjax.batch_renorm_paper_schedule()._asdict())
  """
  return batch_norm(renorm=True, r_max=r_max, d_max=d_max, **options)
