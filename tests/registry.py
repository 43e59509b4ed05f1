"""The registry: one entry per public constructor / face configuration, driven by generic checks.

Haiku-style descriptor list (Haiku's `module_descriptors.py`): each `Entry` names a configuration, the
public names it exercises (`covers`) and a factory `make(param_dtype)` returning a `Driver`, an object
with the core's protocol whatever it wraps:

  * `params, state = driver.init(x)`
  * `y, new_state = driver.apply(params, state, x, training=bool)`

so that `tests/test_registry.py` runs the same checks (jit equals eager, no retrace, float64 finite
differences, vmap, bfloat16 input, state structure, golden state trees) over every one of them:

  * `CoreDriver` — a `normjax.Transform` (optionally with a fixed mask, or under `checkify`).
  * `NamedAxisDriver` — a `Transform` with `axis_name`, run under `jax.vmap(..., axis_name=...)` over
    the leading axis of `x` (one slice per simulated device).
  * `KernelDriver` — a `WeightTransform` or a `Constraint` in a Dense layer `y = x @ w`: the kernel
    `(x.shape[-1], features)` is drawn with a fixed key in `param_dtype`; a constraint's `update` (as an
    optax step chained after SGD) produces the kernel used.
  * `LinenDriver` — a linen module: `params` is `variables["params"]`, `state` the other collections;
    the mode through flax's `use_running_average` (field or call argument) or normjax's `training=`.
  * `NnxDriver` — an nnx module split into `nnx.Param` and the rest; the mode through `model.train()` /
    `model.eval()`, the call's `use_running_average`, or `training=`.
  * `EqxDriver` — an Equinox module (one example per call) under `jax.vmap(..., axis_name="batch")`;
    `params` are its inexact arrays, `state` its `eqx.nn.State`; the mode through
    `eqx.nn.inference_mode` or the call's `inference=`.

`param_dtype` is the dtype of every parameter the entry creates (float32 by default; the float64
finite-difference check rebuilds each entry with float64 parameters). `Entry.fd_modes` lists the modes
whose gradient is the derivative of the forward map; where a mode is left out, `fd_note` says why.
"""

import dataclasses
import functools
import importlib
from typing import Any, Callable, Optional, Tuple

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import normjax
import normjax.linen as njl
import normjax.nnx as njn
from normjax._src import compat

try:
  import equinox as eqx
  import normjax.equinox as nje
except ImportError:  # Equinox is an optional dependency: its entries are left out
  eqx = nje = None

F32 = jnp.float32


# ----------------------------------------------------------------------------------------- drivers


def _kernel(shape, dtype, seed=1):
  """A fixed kernel (the same for every dtype: drawn in float64, then cast)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@dataclasses.dataclass
class CoreDriver:
  """A `normjax.Transform`; `mask(x)` (optional) gives the `mask=` of every apply."""

  transform: Any
  mask: Optional[Callable] = None

  def init(self, x):
    return self.transform.init(x)

  def apply(self, params, state, x, *, training):
    mask = None if self.mask is None else self.mask(x)
    return self.transform.apply(params, state, x, training=training, mask=mask)


@dataclasses.dataclass
class NamedAxisDriver:
  """A `Transform` with an `axis_name`: `x` is `(devices, batch, ...)`, each device's slice mapped by
  `jax.vmap(..., axis_name=axis_name)`. Without device groups the state is one (synchronized, so not
  mapped: `out_axes=None`); with `axis_index_groups` each device keeps its own, stacked on axis 0."""

  transform: Any
  axis_name: str = "devices"
  per_device_state: bool = False

  def init(self, x):
    params, state = self.transform.init(x[0])
    if self.per_device_state:
      state = jax.tree.map(lambda s: jnp.broadcast_to(s, (x.shape[0],) + s.shape), state)
    return params, state

  def apply(self, params, state, x, *, training):
    axis = 0 if self.per_device_state else None
    fn = lambda s, xi: self.transform.apply(params, s, xi, training=training)  # noqa: E731
    return jax.vmap(fn, in_axes=(axis, 0), out_axes=(0, axis), axis_name=self.axis_name)(state, x)


@dataclasses.dataclass
class KernelDriver:
  """A `WeightTransform` or a `Constraint` in a Dense layer `y = x @ w` with `features` outputs."""

  transform: Any
  features: int = 4
  param_dtype: Any = F32

  def init(self, x):
    kernel = _kernel((x.shape[-1], self.features), self.param_dtype)
    if isinstance(self.transform, normjax.Constraint):
      params = {"kernel": kernel}
      return params, self.transform.init(params)
    return self.transform.init(kernel)

  def apply(self, params, state, x, *, training):
    if isinstance(self.transform, normjax.Constraint):  # one SGD step, then the constraint's update
      sgd_step = jax.tree.map(lambda p: -0.25 * p, params)
      updates, state = self.transform.update(sgd_step, state, params)
      kernel = optax.apply_updates(params, updates)["kernel"]
    else:
      kernel, state = self.transform.apply(params, state, training=training)
    return jnp.dot(x, kernel), state


def _mode_kwargs(mode, training):
  if mode == "training":
    return {"training": training}
  if mode == "use_running_average":
    return {"use_running_average": not training}
  if mode == "inference":
    return {"inference": not training}
  return {}


@dataclasses.dataclass
class LinenDriver:
  """A linen module. `mode`: "training" (normjax's keyword), "use_running_average" (flax's call
  argument), "field" (flax's `use_running_average` field, set by `clone`) or None (no mode)."""

  module: nn.Module
  mode: Optional[str] = "training"
  mask: Optional[Callable] = None

  def _bound(self, training):
    if self.mode == "field":
      return self.module.clone(use_running_average=not training), {}
    return self.module, _mode_kwargs(self.mode, training)

  def init(self, x):
    module, kwargs = self._bound(False)
    variables = dict(module.init(jax.random.key(0), x, **kwargs))
    params = variables.pop("params", {})
    return params, variables

  def apply(self, params, state, x, *, training):
    module, kwargs = self._bound(training)
    if self.mask is not None:
      kwargs["mask"] = self.mask(x)
    variables = {"params": params, **state}
    if not state:
      return module.apply(variables, x, **kwargs), state
    y, updates = module.apply(variables, x, mutable=list(state), **kwargs)
    return y, {**state, **updates}


@dataclasses.dataclass
class NnxDriver:
  """An nnx module built by `build(x)`, split into `nnx.Param`s (params) and every other variable
  (state). `mode`: "attribute" (`model.train()` / `model.eval()`), "use_running_average" (the call's
  argument), "training" (normjax's keyword) or None (no mode)."""

  build: Callable
  mode: Optional[str] = "attribute"
  graphdef: Any = None

  def init(self, x):
    self.graphdef, params, state = nnx.split(self.build(x), nnx.Param, ...)
    return params, state

  def apply(self, params, state, x, *, training):
    model = nnx.merge(
      self.graphdef, params, state, copy=True
    )  # fresh variables at this trace level
    if self.mode == "attribute" and training:
      model.train()
    elif self.mode == "attribute":
      model.eval()
    y = model(x, **_mode_kwargs(self.mode, training))
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return y, new_state


@dataclasses.dataclass
class EqxDriver:
  """An Equinox module built by `build(x)` (its `(module, state)`, or the module alone when
  stateless), called on each example of `x` under `jax.vmap(..., axis_name="batch")`. `mode`:
  "attribute" (`eqx.nn.inference_mode`) or "inference" (the call's `inference=`)."""

  build: Callable
  mode: str = "attribute"
  static: Any = None

  def init(self, x):
    built = self.build(x)
    model, state = built if isinstance(built, tuple) else (built, {})
    params, self.static = eqx.partition(model, eqx.is_inexact_array)
    return params, state

  def apply(self, params, state, x, *, training):
    model = eqx.combine(params, self.static)
    kwargs = _mode_kwargs(self.mode, training)
    if self.mode == "attribute":
      model = eqx.nn.inference_mode(model, value=not training)
    if isinstance(state, dict):  # a stateless layer
      return jax.vmap(lambda xi: model(xi))(x), state
    one = lambda xi, s: model(xi, s, **kwargs)  # noqa: E731
    # inside shard_map each device keeps its own running state: typed as varying like the data
    state = jax.tree.map(lambda s: compat.vary_like(x, s), state)
    return jax.vmap(one, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


# ----------------------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public constructor or face configuration.

  Attributes:
    name: unique id (pytest parameter and golden-file key).
    covers: the public names (`normjax.x`, `normjax.linen.X`, ...) this entry constructs.
    make: `make(param_dtype) -> Driver`, a fresh driver whose parameters have `param_dtype`.
    shape: the input shape.
    param_dtype: the parameters' dtype under the default `make` (what the bfloat16 check expects).
    offset, scale: the input is `offset + scale * N(0, 1)` (fixed draw per entry).
    fd_modes: the modes (training flags) whose gradient must equal float64 finite differences.
    fd_note: why a mode is left out of `fd_modes` (required when it is not both).
    frozen_params: the parameters get no gradient by design (finite differences over `x` only, and
      their gradient must be exactly zero).
    checkify: the apply contains `checkify.check`s (run through `checkify.checkify` when staged).
  """

  name: str
  covers: Tuple[str, ...]
  make: Callable[..., Any]
  shape: Tuple[int, ...] = (8, 3)  # DENSE
  param_dtype: Any = F32
  offset: float = 1.0
  scale: float = 2.0
  fd_modes: Tuple[bool, ...] = (True, False)
  fd_note: str = ""
  frozen_params: bool = False
  checkify: bool = False

  def driver(self, param_dtype=None):
    return self.make(self.param_dtype if param_dtype is None else param_dtype)

  def input(self, dtype=F32, offset_shift=0.0):
    seed = sum(map(ord, self.name))
    x = (
      np.random.default_rng(seed).normal(size=self.shape) * self.scale + self.offset + offset_shift
    )
    return jnp.asarray(x, dtype)


def per_example_mask(x):
  """One flag per example along axis 0: every fourth example left out of the statistics."""
  return jnp.arange(x.shape[0]) % 4 != 3


def element_mask(x):
  """A mask of x's rank, varying along axis 0 and the last axis' neighbour (dimension 1 elsewhere)."""
  shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
  return (np.arange(np.prod(shape)).reshape(shape) % 5) != 2


def _core(constructor, **options):
  return lambda pd: CoreDriver(constructor(param_dtype=pd, **options))


_CAST_NOTE = (
  "training and evaluation: the output is cast to dtype=bfloat16, so float64 finite "
  "differences would measure the cast's rounding; gradients are checked finite only"
)
_SPECTRAL_NOTE = (
  "training: the gradient holds the power-iteration vectors u, v constant (Miyato et "
  "al. 2018), which equals the derivative only at convergence; in evaluation v is the "
  "maximizer of uᵀWv, so the gradient is exact there"
)


DENSE, CONV, DEVICES = (8, 3), (4, 2, 2, 4), (4, 2, 3)  # few shapes: XLA's caches are shared


def core_entries():
  """The functional core: `batch_norm` under each option (options combined, each in some entry),
  its shortcuts, and every other constructor of `normjax`."""
  bn, ghost, renorm = normjax.batch_norm, normjax.ghost_batch_norm, normjax.batch_renorm
  schedule = normjax.batch_renorm_paper_schedule()
  # Renorm's r and d are stop-gradient'ed (Ioffe 2017): the gradient is the forward map's derivative
  # only where both are clipped, so the renorm entries' inputs have a batch σ ≫ r_max and a batch mean
  # ≫ d_max (running statistics 0 / 1): r = r_max and d = d_max, constants, in every feature.
  big = dict(offset=100.0, scale=30.0)
  return [
    Entry("batch_norm", ("normjax.batch_norm",), _core(bn)),
    Entry(
      "batch_norm/cumulative+unbiased_running_var+two_pass",
      ("normjax.batch_norm",),
      _core(bn, momentum=None, unbiased_running_var=True, stats_method="two_pass"),
    ),
    Entry(
      "batch_norm/debias+fast+no_affine",
      ("normjax.batch_norm",),
      _core(bn, momentum=0.9, debias=True, stats_method="fast", use_scale=False, use_bias=False),
    ),
    Entry(
      "batch_norm/nchw+element_mask+scale_only",
      ("normjax.batch_norm",),
      lambda pd: CoreDriver(bn(param_dtype=pd, axis=1, use_bias=False), mask=element_mask),
      shape=CONV,
    ),
    Entry(
      "batch_norm/two_feature_axes+ghost_strided",
      ("normjax.batch_norm",),
      _core(bn, axis=(1, 3), ghost_batch_size=2, ghost_grouping="strided"),
      shape=CONV,
    ),
    Entry(
      "batch_norm/renorm",
      ("normjax.batch_norm",),
      _core(bn, renorm=True, r_max=2.0, d_max=1.0),
      **big,
    ),
    Entry(
      "batch_norm/tpu_kernel",  # the Pallas kernels on a TPU (features last, 16 rows); XLA elsewhere
      ("normjax.batch_norm",),
      _core(bn, tpu_kernel=True),
      shape=(2, 16, 128),
    ),
    Entry(
      "batch_norm/check_finite",
      ("normjax.batch_norm",),
      _core(bn, check_finite=True),
      checkify=True,
    ),
    Entry(
      "batch_norm/dtype_bfloat16",
      ("normjax.batch_norm",),
      _core(bn, dtype=jnp.bfloat16),
      fd_modes=(),
      fd_note=_CAST_NOTE,
    ),
    Entry(
      "batch_norm/param_dtype_bfloat16+example_mask",
      ("normjax.batch_norm",),
      lambda pd: CoreDriver(bn(param_dtype=pd), mask=per_example_mask),
      param_dtype=jnp.bfloat16,
    ),
    Entry(
      "batch_norm/axis_name",
      ("normjax.batch_norm",),
      lambda pd: NamedAxisDriver(bn(param_dtype=pd, axis_name="devices")),
      shape=DEVICES,
    ),
    Entry(
      "batch_norm/axis_index_groups",
      ("normjax.batch_norm",),
      lambda pd: NamedAxisDriver(
        bn(param_dtype=pd, axis_name="devices", axis_index_groups=((0, 1), (2, 3))),
        per_device_state=True,
      ),
      shape=DEVICES,
    ),
    Entry(
      "batch_norm/axis_name+ghost_strided+cumulative",
      ("normjax.batch_norm",),
      lambda pd: NamedAxisDriver(
        bn(
          param_dtype=pd,
          axis_name="devices",
          ghost_batch_size=2,
          ghost_grouping="strided",
          momentum=None,
        )
      ),
      shape=DEVICES,
    ),
    Entry(
      "batch_norm/ghost+renorm+debias+two_pass+unbiased+example_mask",
      ("normjax.batch_norm",),
      lambda pd: CoreDriver(
        bn(
          param_dtype=pd,
          ghost_batch_size=4,
          renorm=True,
          r_max=2.0,
          d_max=1.0,
          momentum=0.9,
          debias=True,
          stats_method="two_pass",
          unbiased_running_var=True,
        ),
        mask=per_example_mask,
      ),
      **big,
    ),
    Entry(
      "ghost_batch_norm",
      ("normjax.ghost_batch_norm",),
      lambda pd: CoreDriver(ghost(4, param_dtype=pd)),
    ),
    Entry(
      "batch_renorm",
      ("normjax.batch_renorm",),
      lambda pd: CoreDriver(renorm(param_dtype=pd)),
      **big,
    ),
    Entry(
      "batch_renorm/paper_schedule",
      ("normjax.batch_renorm", "normjax.batch_renorm_paper_schedule"),
      lambda pd: CoreDriver(renorm(*schedule, param_dtype=pd)),
    ),
    Entry("frozen_batch_norm", ("normjax.frozen_batch_norm",), _core(normjax.frozen_batch_norm)),
    Entry(
      "frozen_batch_norm/frozen_affine",
      ("normjax.frozen_batch_norm",),
      _core(normjax.frozen_batch_norm, trainable_affine=False),
      frozen_params=True,
    ),
    Entry("virtual_batch_norm", ("normjax.virtual_batch_norm",), _core(normjax.virtual_batch_norm)),
    Entry(
      "virtual_batch_norm/spatial",
      ("normjax.virtual_batch_norm",),
      _core(normjax.virtual_batch_norm),
      shape=CONV,
    ),
    Entry("layer_norm", ("normjax.layer_norm",), _core(normjax.layer_norm)),
    Entry(
      "layer_norm/hwc",
      ("normjax.layer_norm",),
      _core(normjax.layer_norm, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3)),
      shape=CONV,
    ),
    Entry(
      "group_norm/num_groups",
      ("normjax.group_norm",),
      _core(normjax.group_norm, num_groups=2),
      shape=CONV,
    ),
    Entry(
      "group_norm/group_size",
      ("normjax.group_norm",),
      _core(normjax.group_norm, group_size=2),
      shape=CONV,
    ),
    Entry("instance_norm", ("normjax.instance_norm",), _core(normjax.instance_norm), shape=CONV),
    Entry("rms_norm", ("normjax.rms_norm",), _core(normjax.rms_norm)),
    Entry(
      "weight_norm",
      ("normjax.weight_norm",),
      lambda pd: KernelDriver(normjax.weight_norm(), param_dtype=pd),
    ),
    Entry(
      "weight_standardization",
      ("normjax.weight_standardization",),
      lambda pd: KernelDriver(normjax.weight_standardization(), param_dtype=pd),
    ),
    Entry(
      "spectral_norm",
      ("normjax.spectral_norm",),
      lambda pd: KernelDriver(normjax.spectral_norm(), param_dtype=pd),
      fd_modes=(False,),
      fd_note=_SPECTRAL_NOTE,
    ),
    Entry(
      "max_norm",
      ("normjax.max_norm",),
      lambda pd: KernelDriver(normjax.max_norm(1.0), param_dtype=pd),
    ),
    Entry(
      "unit_norm",
      ("normjax.unit_norm",),
      lambda pd: KernelDriver(normjax.unit_norm(), param_dtype=pd),
    ),
    Entry(
      "min_max_norm",
      ("normjax.min_max_norm",),
      lambda pd: KernelDriver(normjax.min_max_norm(0.5, 1.0, rate=0.5), param_dtype=pd),
    ),
    Entry(
      "non_neg", ("normjax.non_neg",), lambda pd: KernelDriver(normjax.non_neg(), param_dtype=pd)
    ),
  ]


def _linen(cls, mode="training", mask=None, **fields):
  return lambda pd: LinenDriver(cls(param_dtype=pd, **fields), mode=mode, mask=mask)


def linen_entries():
  return [
    Entry(
      "linen.BatchNorm",
      ("normjax.linen.BatchNorm",),
      _linen(njl.BatchNorm, mode="use_running_average"),
    ),
    Entry(
      "linen.BatchNorm/field", ("normjax.linen.BatchNorm",), _linen(njl.BatchNorm, mode="field")
    ),
    Entry(
      "linen.BatchNorm/training+mask+fast",
      ("normjax.linen.BatchNorm",),
      _linen(njl.BatchNorm, mask=per_example_mask, use_fast_variance=True),
    ),
    Entry(
      "linen.GhostBatchNorm",
      ("normjax.linen.GhostBatchNorm",),
      _linen(njl.GhostBatchNorm, ghost_batch_size=4),
    ),
    Entry(
      "linen.BatchRenorm",
      ("normjax.linen.BatchRenorm",),
      _linen(njl.BatchRenorm),
      offset=100.0,
      scale=30.0,
    ),
    Entry(
      "linen.VirtualBatchNorm", ("normjax.linen.VirtualBatchNorm",), _linen(njl.VirtualBatchNorm)
    ),
    Entry(
      "linen.FrozenBatchNorm",
      ("normjax.linen.FrozenBatchNorm",),
      _linen(njl.FrozenBatchNorm, mode="use_running_average"),
    ),
    Entry("linen.LayerNorm", ("normjax.linen.LayerNorm",), _linen(njl.LayerNorm)),
    Entry(
      "linen.GroupNorm",
      ("normjax.linen.GroupNorm",),
      _linen(njl.GroupNorm, num_groups=2),
      shape=CONV,
    ),
    Entry(
      "linen.InstanceNorm", ("normjax.linen.InstanceNorm",), _linen(njl.InstanceNorm), shape=CONV
    ),
    Entry("linen.RMSNorm", ("normjax.linen.RMSNorm",), _linen(njl.RMSNorm, mode=None)),
    Entry(
      "linen.SpectralNormDense",
      ("normjax.linen.SpectralNormDense",),
      _linen(njl.SpectralNormDense, features=4),
      fd_modes=(False,),
      fd_note=_SPECTRAL_NOTE,
    ),
    Entry(
      "linen.WeightNormDense",
      ("normjax.linen.WeightNormDense",),
      _linen(njl.WeightNormDense, mode=None, features=4),
    ),
    Entry(
      "linen.WeightStandardizedConv",
      ("normjax.linen.WeightStandardizedConv",),
      _linen(njl.WeightStandardizedConv, mode=None, features=4, kernel_size=(2, 2)),
      shape=CONV,
    ),
  ]


def _rngs():
  return nnx.Rngs(0)


def nnx_entries():
  def channels(x):
    return x.shape[-1]

  return [
    Entry(
      "nnx.BatchNorm",
      ("normjax.nnx.BatchNorm",),
      lambda pd: NnxDriver(lambda x: njn.BatchNorm(channels(x), param_dtype=pd, rngs=_rngs())),
    ),
    Entry(
      "nnx.BatchNorm/use_running_average",
      ("normjax.nnx.BatchNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.BatchNorm(channels(x), param_dtype=pd, rngs=_rngs()),
        mode="use_running_average",
      ),
    ),
    Entry(
      "nnx.BatchNorm/training+debias+nchw",
      ("normjax.nnx.BatchNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.BatchNorm(x.shape[1], axis=1, debias=True, param_dtype=pd, rngs=_rngs()),
        mode="training",
      ),
      shape=CONV,
    ),
    Entry(
      "nnx.GhostBatchNorm",
      ("normjax.nnx.GhostBatchNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.GhostBatchNorm(channels(x), ghost_batch_size=4, param_dtype=pd)
      ),
    ),
    Entry(
      "nnx.BatchRenorm",
      ("normjax.nnx.BatchRenorm",),
      lambda pd: NnxDriver(lambda x: njn.BatchRenorm(channels(x), param_dtype=pd)),
      offset=100.0,
      scale=30.0,
    ),
    Entry(
      "nnx.FrozenBatchNorm",
      ("normjax.nnx.FrozenBatchNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.FrozenBatchNorm(channels(x), param_dtype=pd), mode="training"
      ),
    ),
    Entry(
      "nnx.VirtualBatchNorm",
      ("normjax.nnx.VirtualBatchNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.VirtualBatchNorm(channels(x), reference=x, param_dtype=pd), mode="training"
      ),
    ),
    Entry(
      "nnx.LayerNorm",
      ("normjax.nnx.LayerNorm",),
      lambda pd: NnxDriver(lambda x: njn.LayerNorm(channels(x), param_dtype=pd), mode=None),
    ),
    Entry(
      "nnx.GroupNorm",
      ("normjax.nnx.GroupNorm",),
      lambda pd: NnxDriver(
        lambda x: njn.GroupNorm(channels(x), num_groups=2, param_dtype=pd),
        mode="use_running_average",
      ),
      shape=CONV,
    ),
    Entry(
      "nnx.InstanceNorm",
      ("normjax.nnx.InstanceNorm",),
      lambda pd: NnxDriver(lambda x: njn.InstanceNorm(channels(x), param_dtype=pd), mode=None),
      shape=CONV,
    ),
    Entry(
      "nnx.RMSNorm",
      ("normjax.nnx.RMSNorm",),
      lambda pd: NnxDriver(lambda x: njn.RMSNorm(channels(x), param_dtype=pd), mode=None),
    ),
    Entry(
      "nnx.SpectralNormLinear",
      ("normjax.nnx.SpectralNormLinear", "normjax.nnx.SpectralNormDense"),
      lambda pd: NnxDriver(
        lambda x: njn.SpectralNormLinear(channels(x), 4, param_dtype=pd, rngs=_rngs())
      ),
      fd_modes=(False,),
      fd_note=_SPECTRAL_NOTE,
    ),
    Entry(
      "nnx.WeightNormLinear",
      ("normjax.nnx.WeightNormLinear", "normjax.nnx.WeightNormDense"),
      lambda pd: NnxDriver(
        lambda x: njn.WeightNormLinear(channels(x), 4, param_dtype=pd, rngs=_rngs()), mode=None
      ),
    ),
    Entry(
      "nnx.WeightStandardizedConv",
      ("normjax.nnx.WeightStandardizedConv",),
      lambda pd: NnxDriver(
        lambda x: njn.WeightStandardizedConv(channels(x), 4, (2, 2), param_dtype=pd, rngs=_rngs()),
        mode=None,
      ),
      shape=CONV,
    ),
  ]


def _eqx_bn(pd, **options):
  def build(x):
    return eqx.nn.make_with_state(nje.BatchNorm)(x.shape[1], "batch", dtype=pd, **options)

  return build


def equinox_entries():
  if nje is None:
    return []
  return [
    Entry(
      "equinox.BatchNorm",
      ("normjax.equinox.BatchNorm",),
      lambda pd: EqxDriver(_eqx_bn(pd)),
      shape=CONV,
    ),
    Entry(
      "equinox.BatchNorm/inference_argument",
      ("normjax.equinox.BatchNorm",),
      lambda pd: EqxDriver(_eqx_bn(pd, inference=None), mode="inference"),
      shape=DENSE,
    ),
    Entry(
      "equinox.BatchNorm/mode_batch",
      ("normjax.equinox.BatchNorm",),
      lambda pd: EqxDriver(_eqx_bn(pd, momentum=0.9, mode="batch")),
      shape=CONV,
    ),
    Entry(
      "equinox.BatchNorm/ghost_strided",
      ("normjax.equinox.BatchNorm",),
      lambda pd: EqxDriver(_eqx_bn(pd, ghost_batch_size=4, ghost_grouping="strided")),
      shape=DENSE,
    ),
    Entry(
      "equinox.LayerNorm",
      ("normjax.equinox.LayerNorm",),
      lambda pd: EqxDriver(lambda x: nje.LayerNorm(x.shape[1:], dtype=pd)),
      shape=CONV,
    ),
    Entry(
      "equinox.RMSNorm",
      ("normjax.equinox.RMSNorm",),
      lambda pd: EqxDriver(lambda x: nje.RMSNorm(x.shape[1:], dtype=pd)),
      shape=DENSE,
    ),
    Entry(
      "equinox.GroupNorm",
      ("normjax.equinox.GroupNorm",),
      lambda pd: EqxDriver(lambda x: nje.GroupNorm(2, x.shape[1], dtype=pd)),
      shape=CONV,
    ),
    Entry(
      "equinox.InstanceNorm",
      ("normjax.equinox.InstanceNorm",),
      lambda pd: EqxDriver(lambda x: nje.InstanceNorm(x.shape[1], dtype=pd)),
      shape=CONV,
    ),
  ]


@functools.lru_cache(maxsize=None)
def entries() -> Tuple[Entry, ...]:
  """Every registry entry, in a fixed order (names unique)."""
  all_entries = tuple(core_entries() + linen_entries() + nnx_entries() + equinox_entries())
  names = [e.name for e in all_entries]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"registry entry names must be unique; repeated: {duplicates}")
  return all_entries


def by_name(name: str) -> Entry:
  return {e.name: e for e in entries()}[name]


# ------------------------------------------------------------------------------- public names


# Public names that are not layers: each says why it has no registry entry. A name here that is no
# longer public fails `test_registry.py`, as does a public name that is neither here nor covered.
EXCLUDED = {
  # Types of the protocol and of states: their fields are pinned by the golden state trees.
  "normjax.Transform": "the protocol type every core entry returns (not a constructor of a layer)",
  "normjax.WeightTransform": "the protocol type of the weight entries",
  "normjax.Constraint": "the protocol type of the constraint entries",
  "normjax.BatchNormState": "a state type; its fields are pinned by the golden state trees",
  "normjax.EmptyState": "a state type (stateless norms); pinned by the golden state trees",
  "normjax.SpectralNormState": "a state type; pinned by the golden state trees",
  "normjax.VirtualBatchNormState": "a state type; pinned by the golden state trees",
  "normjax.BatchNormConfig": "the options dataclass behind batch_norm (every option has an entry)",
  "normjax.RenormClipping": "the NamedTuple batch_renorm_paper_schedule returns",
  "normjax.nnx.BatchCount": "an nnx Variable type; the golden trees record it on every nnx BatchNorm",
  # Pure functions and tools, not layers; their numbers are tested in their own modules.
  "normjax.moments": "the statistics kernel every entry calls (tests/test_stats.py)",
  "normjax.merge_moments": "a pure function merging moments (tests/test_stats.py)",
  "normjax.normalize": "the normalization arithmetic every entry calls",
  "normjax.standardize_kernel": "the function inside weight_standardization (tests/test_weights.py)",
  "normjax.weight_norm_data_init": "a one-off initializer of weight_norm's params (test_weights.py)",
  "normjax.is_kernel": "the default leaf predicate of the constraints",
  "normjax.fold_batch_norm": "a conversion of trained variables (tests/test_folding.py)",
  "normjax.linen.fold_batch_norm_model": "a conversion of a trained model (tests/test_folding.py)",
  "normjax.nnx.fold_batch_norm_pair": "a conversion of a trained model (tests/test_folding.py)",
  "normjax.linen.recalibrate_batch_stats": "a population-statistics loop (test_population.py)",
  "normjax.nnx.recalibrate_batch_stats": "a population-statistics loop (test_population.py)",
  "normjax.linen.to_flax_variables": "a checkpoint conversion (tests/test_linen.py)",
  "normjax.nnx.to_flax_state": "a checkpoint conversion (tests/test_nnx.py)",
  "normjax.nnx.from_flax_state": "a checkpoint conversion (tests/test_nnx.py)",
}


def public_names():
  """Every public name of `normjax` and its faces: non-underscore, non-module names of each namespace
  (`dir()`), plus the faces' `__all__`."""
  namespaces = {"normjax": normjax, "normjax.linen": njl, "normjax.nnx": njn}
  if nje is not None:
    namespaces["normjax.equinox"] = nje
  names = set()
  for prefix, module in namespaces.items():
    listed = set(getattr(module, "__all__", ())) | set(dir(module))
    names |= {
      f"{prefix}.{n}"
      for n in listed  # `__version__` and other dunders are metadata
      if not n.startswith("_") and not isinstance(getattr(module, n), type(importlib))
    }
  return sorted(names)


def resolve(qualified_name: str):
  module, _, attr = qualified_name.rpartition(".")
  return getattr(importlib.import_module(module), attr)


__all__ = ["Entry", "EXCLUDED", "by_name", "entries", "public_names", "resolve"]
