"""`normjax.equinox.BatchNorm`: `normjax.batch_norm` with `equinox.nn.BatchNorm`'s interface.

Equinox models see one example per call and run under `jax.vmap(model, axis_name=...)`. The layer hands
the core the example as a batch of one (`x[None]`, channels on axis 1) with the layer's `axis_name`, so
the core's statistics (`normjax.moments`, exact count-weighted merging over the named axis) are those of
the whole vmapped batch. The running statistics are a `BatchNormState` kept in an `eqx.nn.State`.

Ghost batches and `axis_index_groups` partition the vmapped axis: the examples of each group are
normalized with their group's statistics (the groups are the core's `axis_index_groups`; ghost groups are
built from `ghost_batch_size`, `ghost_grouping` and the axis size). The running statistics then move by
the count-weighted mean of the groups' statistics, reduced over the whole axis and handed to the core's
update, so the one state returned does not vary over the axis (`out_axes=None` works) and equals the
core's ghost update on the stacked batch.
"""

import dataclasses
import math
from typing import Hashable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import collectives
from normjax._src import compat
from normjax._src import modes
from normjax._src import validation

_LAYER = "normjax.equinox.BatchNorm"
# BatchNormConfig fields spoken under Equinox's names here (normjax option -> this layer's argument).
RENAMED_OPTIONS = {"epsilon": "eps", "param_dtype": "dtype", "dtype": "output_dtype"}
# BatchNormConfig fields fixed by Equinox's layout (normjax option -> why).
FIXED_OPTIONS = {
  "axis": "the channel axis is axis 0 of each example (Equinox's layout: input_size "
  "channels first); the core sees the example as a batch of one, channels on "
  "axis 1"
}
# BatchNormConfig fields that are named arguments of the constructor.
NAMED_OPTIONS = ("momentum", "axis_name")
REFUSED_MODES = {
  "ema": "Equinox's mode='ema' normalizes training batches with the running averages",
  "legacy": "Equinox's mode='legacy' is its mode='ema'",
}


def default_floating_dtype():
  """Equinox's default parameter dtype: float64 when JAX runs in 64-bit mode, float32 otherwise."""
  return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def passthrough_options():
  """The `BatchNormConfig` fields this layer takes as normjax keyword options, under their own names."""
  names = (f.name for f in dataclasses.fields(bn_lib.BatchNormConfig))
  return tuple(
    n
    for n in names
    if n not in RENAMED_OPTIONS and n not in FIXED_OPTIONS and n not in NAMED_OPTIONS
  )


def _check_options(options):
  allowed = passthrough_options()
  for name in options:
    if name in RENAMED_OPTIONS:
      raise TypeError(
        f"{_LAYER}: normjax's option {name}= is spelt {RENAMED_OPTIONS[name]}= here "
        f"(Equinox's name; got {name}={options[name]!r})"
      )
    if name in FIXED_OPTIONS:
      raise TypeError(f"{_LAYER}: {name}={options[name]!r} cannot be set: {FIXED_OPTIONS[name]}")
    if name not in allowed:
      raise TypeError(
        f"{_LAYER}: unknown option {name}={options[name]!r}; expected Equinox's arguments "
        "(input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, "
        f"mode), output_dtype, or normjax's options {list(allowed)}"
      )


def _check_mode(mode, options, momentum):
  if mode is None:
    return
  if mode in REFUSED_MODES:
    raise ValueError(
      f"{_LAYER}: mode={mode!r} is not supported ({REFUSED_MODES[mode]}); use "
      "mode='batch' for Equinox's mode='batch' numbers, or leave mode=None for "
      "normjax's semantics"
    )
  if mode != "batch":
    raise ValueError(
      f"{_LAYER}: mode={mode!r} must be 'batch' (Equinox's mode='batch') or None "
      "(normjax's semantics)"
    )
  if momentum is None:
    raise ValueError(
      f"{_LAYER}: mode='batch' keeps Equinox's zero-debiased EMA and needs a momentum "
      "in [0, 1); got momentum=None (for a cumulative average use mode=None)"
    )
  for name in ("debias", "renorm"):
    if options.get(name):
      raise ValueError(
        f"{_LAYER}: mode='batch' stores Equinox's hidden (not yet debiased) EMA, which "
        f"{name}=True cannot use; got {name}=True. Use mode=None (normjax's "
        "semantics) for it"
      )


def _check_input_size(input_size):
  if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
    raise ValueError(
      f"{_LAYER}: input_size={input_size!r} must be a positive int (the number of "
      "channels, axis 0 of each example)"
    )


def _check_bool(value, name):
  if not isinstance(value, bool):
    raise TypeError(f"{_LAYER}: {name}={value!r} must be a bool")


def _axis_name_tuple(axis_name):
  if axis_name is None:
    raise ValueError(
      f"{_LAYER}: axis_name=None; the layer normalizes one example per call, so give "
      "the name of the vmapped batch axis, e.g. jax.vmap(model, axis_name='batch', "
      "in_axes=(0, None), out_axes=(0, None)) with BatchNorm(C, 'batch')"
    )
  if isinstance(axis_name, list):
    return tuple(axis_name)
  return axis_name


def _bound_axis_size(axis_name) -> int:
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as error:
    raise NameError(
      f"{_LAYER}: axis_name={axis_name!r} is not bound. Equinox layers see one example "
      f"per call: train under jax.vmap(model, axis_name={axis_name!r}, in_axes=(0, None), "
      "out_axes=(0, None)) (or pmap / shard_map with that axis name), or use "
      "inference=True"
    ) from error


def ghost_groups(axis_size: int, ghost_batch_size: int, grouping: str):
  """The ghost groups of a vmapped batch of `axis_size` examples as `axis_index_groups`.

  `"consecutive"`: group k holds examples k·g … k·g + g − 1 (Hoffer et al.). `"strided"` (tf-keras
  `virtual_batch_size`, the batch reshaped to `[g, n/g, ...]`): group j holds examples j, j + n/g,
  j + 2n/g, …. Each group has `g = ghost_batch_size` examples.

  Raises:
    ValueError: `ghost_batch_size` does not divide `axis_size`.
  """
  g = ghost_batch_size
  if axis_size % g:
    raise ValueError(
      f"{_LAYER}: ghost_batch_size={g} must divide the batch size {axis_size} (the size "
      "of the vmapped axis)"
    )
  count = axis_size // g
  if grouping == "strided":
    return tuple(tuple(j + t * count for t in range(g)) for j in range(count))
  return tuple(tuple(k * g + t for t in range(g)) for k in range(count))


def _example_mask(mask, x):
  """One example's mask: a scalar (the whole example) or an array of x's rank (dimensions 1 or x's)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.ndim == 0:
    mask = mask.reshape((1,) * x.ndim)
  return validation.prepare_mask(mask, x.shape)


def _example_count(x, mask):
  """f32[C]: the number of valid elements of each channel in this example."""
  per_channel = math.prod(x.shape[1:])
  if mask is None:
    return jnp.full(x.shape[:1], per_channel, jnp.float32)
  valid = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  return jnp.sum(valid.reshape(x.shape[0], per_channel), axis=1)


def grouped_running_update(config, state, group_moments, count, axis_name):
  """The running statistics after a step whose examples were normalized by their groups' statistics.

  Each example holds its group's `(n_G, μ_G, σ²_G)` (`group_moments`) and its own valid count `count`.
  The running statistics move by the count-weighted mean of the groups' statistics over the whole axis,
  `Σ_G n_G μ_G / Σ_G n_G` (each group's variance Bessel-corrected first with `unbiased_running_var`),
  formed as `Σ_i c_i μ_G(i) / Σ_i c_i` with psums over the vmapped axis and handed to the core's own
  update: exactly the core's ghost batches on the stacked batch, renorm's σ average and the guards
  against empty or non-finite statistics included. The result does not vary over the axis.
  """
  total, mean, var = (v[None] for v in group_moments)
  mean, var, _ = bn_lib.running_targets(config, mean, var, total)
  count = count.reshape(mean.shape)
  total, weighted_mean, weighted_var = collectives.cross_device_sum(
    (count, count * mean, count * var), axis_name
  )
  batch_mean = weighted_mean / jnp.maximum(total, 1.0)
  batch_var = weighted_var / jnp.maximum(total, 1.0)
  if config.check_finite:
    bn_lib.check_finite_moments(batch_mean, batch_var, total)
  # pylint: disable-next=protected-access
  return bn_lib.updated_state(config, state, batch_mean, batch_var, total)


def batch_mode_evaluation_state(
  state: bn_lib.BatchNormState, momentum: float
) -> bn_lib.BatchNormState:
  """Equinox's `mode="batch"` inference statistics from its hidden EMA (started at mean 0, var 1).

  Equinox divides both hidden averages by `1 − momentum**t` after t updates (by 1 before any): the mean
  is then Haiku's zero-debiased EMA, the variance carries the extra `momentum**t / (1 − momentum**t)` of
  its start at 1.
  """
  steps = state.count
  scale = jnp.where(steps == 0, 1.0, 1.0 - momentum ** steps.astype(jnp.float32))
  return bn_lib.BatchNormState(state.mean / scale, state.var / scale, state.count)


class BatchNorm(eqx.nn.StatefulLayer):
  """`normjax.batch_norm` with `equinox.nn.BatchNorm`'s constructor, call and state conventions.

  `BatchNorm(input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, mode)` means
  what it means in Equinox; normjax's options (`ghost_batch_size`, `ghost_grouping`, `renorm`, `r_max`,
  `d_max`, `axis_index_groups`, `debias`, `unbiased_running_var`, `stats_method`, `use_scale`,
  `use_bias`, ...) are keywords. Each call normalizes one example `x` of shape `(input_size, *spatial)`
  under `jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))`; the statistics
  are those of the whole vmapped batch (and of every other named axis in a tuple `axis_name`).

  Where Equinox and normjax differ, Equinox's meaning holds:

  * `dtype` is the dtype of `weight` and `bias` (default float32, float64 under `jax_enable_x64`, as
    Equinox). The running statistics are float32 always (normjax's state invariant); the output has
    the input's dtype unless `output_dtype` is given.
  * `channelwise_affine` sets both `use_scale` and `use_bias` (either may be given to override it).
  * `mode="batch"` reproduces `eqx.nn.BatchNorm(mode="batch")`: the state holds Equinox's hidden EMA
    (started at mean 0, variance 1, weight of the old value `momentum`) and inference divides it by
    `1 − momentum**t`. `mode="ema"` (and Equinox's "legacy") is refused. Without `mode`, normjax's
    semantics: inference uses the running statistics as stored.

  The parameters are `weight` and `bias` (Equinox's names); the state is one `BatchNormState` under
  `state_index`, so `eqx.nn.make_with_state(BatchNorm)(...)` works. `eqx.nn.inference_mode` sets
  `inference`; the call's `inference=` overrides it. Both must be bools (`modes.check_flag`).

  Ghost batches and `axis_index_groups` partition the vmapped axis (ghost groups of consecutive
  examples, or strided ones with `ghost_grouping="strided"`); each group is normalized by its own
  statistics and the running state moves by the count-weighted mean of the groups' statistics, as the
  core's ghost batches. Masks (`mask=`, per example: a scalar, or x's rank with dimensions 1 or x's)
  drop whole examples or elements from the statistics, exactly, however unequal the valid counts.

  Attributes:
    weight, bias: `(input_size,)` arrays of `dtype`, or None without `channelwise_affine`.
    state_index: the `eqx.nn.StateIndex` of the `BatchNormState(mean, var, count)`.
    inference: the mode when the call gives none (True: running statistics).
    input_size, mode: as given.
    config: the core's `BatchNormConfig` (channels on axis 1 of `x[None]`).

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, normjax.equinox as nje
    >>> model, state = eqx.nn.make_with_state(nje.BatchNorm)(3, "batch", momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3, 4, 4)) * 2.0 + 1.0
    >>> batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> y, state = batched(x, state)
    >>> bool(jnp.allclose(y.mean((0, 2, 3)), 0.0, atol=1e-5)), int(state.get(model.state_index).count)
    (True, 1)
    >>> evaluation = jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None))
    >>> y_eval, _ = evaluation(x, state)

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Hoffer et al. 2017, arXiv:1705.08741 (ghost BN);
    Ioffe 2017, arXiv:1702.03275 (Batch Renormalization).
  """

  weight: Optional[jax.Array]
  bias: Optional[jax.Array]
  state_index: eqx.nn.StateIndex
  inference: Optional[bool]
  input_size: int = eqx.field(static=True)
  mode: Optional[str] = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  config: bn_lib.BatchNormConfig = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    axis_name: Union[Hashable, Sequence[Hashable]],
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: Optional[float] = 0.99,
    inference: Optional[bool] = False,
    dtype=None,
    mode: Optional[str] = None,
    *,
    output_dtype=None,
    **options,
  ):
    """Builds the layer; see the class docstring.

    Args:
      input_size: number of channels (axis 0 of each example).
      axis_name: the vmapped (or pmapped / shard_mapped) batch axis, or a tuple of axis names.
      eps: added to the variance inside the square root (normjax's `epsilon`).
      channelwise_affine: learn `weight` (γ, init 1) and `bias` (β, init 0).
      momentum: weight of the old running value (Equinox's and normjax's convention); None: the
        cumulative average (not with mode="batch").
      inference: True: normalize with the running statistics (None: the call must say).
      dtype: dtype of `weight` and `bias` (Equinox's meaning); the running statistics stay float32.
      mode: None (normjax's semantics) or "batch" (Equinox's mode="batch"); "ema" is refused.
      output_dtype: output dtype (normjax's `dtype`; default: the input's).
      **options: normjax's options by keyword (`passthrough_options()`).

    Raises:
      TypeError: an unknown option, a normjax option under its normjax name where Equinox's is used
        (`epsilon`, `param_dtype`, `axis`), or a non-bool `channelwise_affine` / `inference`.
      ValueError: a bad value (input_size, mode, momentum, ...; the core's checks), `axis_name=None`,
        or ghost batches together with `axis_index_groups`.
    """
    _check_options(options)
    _check_input_size(input_size)
    _check_bool(channelwise_affine, "channelwise_affine")
    _check_mode(mode, options, momentum)
    modes.check_flag(inference, "inference")
    if options.get("ghost_batch_size") is not None and options.get("axis_index_groups") is not None:
      raise ValueError(
        f"{_LAYER}: ghost_batch_size={options['ghost_batch_size']} and axis_index_groups="
        f"{options['axis_index_groups']!r} both partition the vmapped batch axis; "
        "give one"
      )
    param_dtype = default_floating_dtype() if dtype is None else jnp.dtype(dtype)
    options = {"use_scale": channelwise_affine, "use_bias": channelwise_affine, **options}
    self.config = bn_lib.BatchNormConfig(
      axis=1,
      momentum=momentum,
      epsilon=eps,
      axis_name=_axis_name_tuple(axis_name),
      dtype=output_dtype,
      param_dtype=param_dtype,
      **options,
    )
    params, state = bn_lib.init_variables(
      (input_size,),
      use_scale=self.config.use_scale,
      use_bias=self.config.use_bias,
      param_dtype=param_dtype,
    )
    self.weight = params.get("scale")
    self.bias = params.get("bias")
    self.state_index = eqx.nn.StateIndex(state)
    self.inference = inference
    self.input_size = input_size
    self.mode = mode
    self.channelwise_affine = channelwise_affine

  @property
  def axis_name(self):
    """The vmapped axis name (or tuple of names) the statistics reduce over."""
    return self.config.axis_name

  @property
  def eps(self) -> float:
    """Equinox's name for the core's `epsilon`."""
    return self.config.epsilon

  @property
  def momentum(self) -> Optional[float]:
    """Weight of the old running value (Equinox's and normjax's convention); None: cumulative average."""
    return self.config.momentum

  def __call__(
    self, x, state: eqx.nn.State, *, key=None, inference: Optional[bool] = None, mask=None
  ):
    """Normalizes one example; returns `(y, state)` with the running statistics updated when training.

    Args:
      x: one example of shape `(input_size, *spatial)`, floating point.
      state: the `eqx.nn.State` holding this layer's `BatchNormState`.
      key: ignored (Equinox's API).
      inference: overrides the `inference` attribute when given (a bool).
      mask: optional boolean mask of this example: a scalar (keeps or drops the whole example) or an
        array of x's rank, each dimension 1 or x's (e.g. `(1, H, W)`); False elements do not count in
        the statistics (their outputs are still normalized).

    Returns:
      `(y, state)`: `y` of x's shape (dtype: `output_dtype` or x's), the state updated when training.

    Raises:
      TypeError: a non-bool mode flag, non-float `x`, a non-boolean mask.
      ValueError: no mode given, `x` not of shape `(input_size, ...)`, a mask that does not broadcast,
        a ghost batch size that does not divide the vmapped axis.
      NameError: training outside a transform that binds `axis_name`.
    """
    del key
    training = modes.merge_override(
      self.inference,
      inference,
      None,
      attribute_name="inference",
      negate_attribute=True,
      argument_name="inference",
      negate_argument=True,
      layer=_LAYER,
    )
    x = self._check_input(x)
    mask = _example_mask(mask, x)
    batch_mask = None if mask is None else mask[None]
    params = {k: v for k, v in (("scale", self.weight), ("bias", self.bias)) if v is not None}
    bn_state = state.get(self.state_index)
    if not training:
      if self.mode == "batch":
        bn_state = batch_mode_evaluation_state(bn_state, self.config.momentum)
      y, _ = bn_lib.from_config(self.config).apply(
        params, bn_state, x[None], training=False, mask=batch_mask
      )
      return y[0], state
    config = self._training_config()
    y, new_state, group_moments = bn_lib.apply_with_batch_moments(
      config, params, bn_state, x[None], training=True, mask=batch_mask
    )
    if config.axis_index_groups is not None:  # per-group states: one update for the whole axis
      new_state = grouped_running_update(
        config, bn_state, group_moments, _example_count(x, mask), config.axis_name
      )
    _check_state_varies_like(bn_state, new_state)
    return y[0], state.set(self.state_index, new_state)

  def _check_input(self, x):
    validation.check_float_input(x, "x")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] != self.input_size:
      raise ValueError(
        f"{_LAYER}: x has shape {x.shape}; expected one example of shape "
        f"({self.input_size}, ...) with the input_size={self.input_size} channels first. "
        "Batches go through jax.vmap(model, axis_name=..., in_axes=(0, None), "
        "out_axes=(0, None))"
      )
    return x

  def _training_config(self) -> bn_lib.BatchNormConfig:
    """The core's config for this call: ghost batches become `axis_index_groups` over the vmapped
    axis."""
    config = self.config
    size = _bound_axis_size(config.axis_name)
    if config.ghost_batch_size is None:
      return config
    groups = ghost_groups(size, config.ghost_batch_size, config.ghost_grouping)
    return dataclasses.replace(config, ghost_batch_size=None, axis_index_groups=groups)


def _check_state_varies_like(old, new):
  """ValueError when the updated running statistics vary over `shard_map` axes the old ones do not.

  Inside `shard_map(check_vma=True)` statistics reduced over the examples of one device (a vmap axis)
  differ per device, so the new running state varies over the mesh axes; `eqx.nn.State.set` then
  refuses it with a message that prints the same shapes twice. This names the axes and the two fixes.
  """
  missing = sorted(compat.vma(new.mean) - compat.vma(old.mean))
  if missing:
    raise ValueError(
      f"{_LAYER}: the updated running statistics vary over the shard_map axes {missing} (each "
      "device's batch statistics differ) but the state passed in does not. Pass the state varying "
      f"over them (e.g. jax.lax.pcast(state, {tuple(missing)}, to='varying'), or in_specs that "
      "split it), or synchronize the statistics over them too: "
      f"axis_name={tuple(missing) + ('<the vmap axis>',)}"
    )
