"""`normjax.batch_norm` as flax nnx modules, with `flax.nnx.BatchNorm`'s variables and mode handling.

The modules hold no arithmetic: they store `nnx.Param` `scale` / `bias`, `nnx.BatchStat` `mean` / `var`
and normjax's update counter `count` (a `BatchCount`, itself an `nnx.BatchStat`), build the core's
`BatchNormConfig` from their explicit arguments and call the pure transform.
"""

import contextlib
import contextvars
import inspect
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Union

from flax import nnx
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import modes
from normjax._src import renorm as renorm_lib
from normjax._src import stats
from normjax._src import validation
from normjax.nnx import _common

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class BatchCount(nnx.BatchStat):
  """normjax's number of training updates (int32 scalar), the one BatchNorm variable flax lacks.

  It is an `nnx.BatchStat`, so `nnx.state(model, nnx.BatchStat)` and optimizers see it as flax's
  statistics; `to_flax_state` drops it by this type.
  """


# Population recalibration (`normjax.nnx.recalibrate_batch_stats`) sets a dict here; every training
# call of a BatchNorm then records its batch's (count, mean, var) under `id(module)`.
_RECORDER: contextvars.ContextVar = contextvars.ContextVar(
  "normjax_nnx_batch_moments", default=None
)


@contextlib.contextmanager
def recording():
  """Collects the batch moments of every normjax nnx BatchNorm called in training mode inside."""
  records = {}
  token = _RECORDER.set(records)
  try:
    yield records
  finally:
    _RECORDER.reset(token)


def _record(module, moments) -> None:
  records = _RECORDER.get()
  if records is None or moments is None:
    return
  previous = records.get(id(module))
  if previous is not None:  # a layer called twice in one forward: the union of its batches
    moments = stats.merge_moments(*previous, *moments)
  records[id(module)] = tuple(moments)


class BatchNorm(nnx.Module):
  """Batch Normalization (`normjax.batch_norm`) as a flax nnx module, a drop-in for `flax.nnx.BatchNorm`.

  Variables are flax's, with the same names, types and shapes: `scale`, `bias` (`nnx.Param`), `mean`,
  `var` (`nnx.BatchStat`, float32), plus `count` (`BatchCount`, an int32 `nnx.BatchStat`). A state
  made by `flax.nnx.BatchNorm` loads with `nnx.update(layer, flax_state)` (count stays 0); the other
  way, `nnx.update(flax_layer, normjax.nnx.to_flax_state(layer))`.

  The mode is flax's: the attribute `use_running_average` (set by `model.eval()` / `model.train()`,
  `nnx.view(model, use_running_average=...)` or the constructor) unless the call gives
  `use_running_average` or normjax's `training=` (not both). Training normalizes with the batch
  statistics and moves the running ones; evaluation uses the running statistics and changes nothing.

  Args:
    num_features: size of the feature `axis` (a tuple of sizes when `axis` is a tuple).
    use_running_average: the mode when the call gives none (flax's attribute; default False).
    axis, momentum, epsilon, debias, unbiased_running_var, use_scale, use_bias, stats_method,
      stats_shift, axis_name, axis_index_groups, ghost_batch_size, ghost_grouping, renorm, r_max, d_max, check_finite,
      tpu_kernel,
      dtype, param_dtype: the options of `normjax.batch_norm`, with its defaults (see its docstring).
    use_fast_variance: flax's flag; None (default) keeps `stats_method`, True is `stats_method="fast"`
      (flax's E[x²]−E[x]², flax's default), False `"two_pass"`.
    scale_init, bias_init: flax initializers `(key, shape, dtype)` (default ones / zeros).
    scale_metadata, bias_metadata: metadata of the `nnx.Param`s (e.g. sharding), as flax.
    rngs: `nnx.Rngs` for the initializers (keys drawn as flax draws them); may be None with the
      default initializers.

  Differences from `flax.nnx.BatchNorm`: statistics default to the accurate `"shifted"` method (flax:
  E[x²]−E[x]², inaccurate when |mean| ≫ std); the output dtype defaults to the input's (flax: the
  promotion of input and parameter dtypes); cross-device counts are summed, not averaged; there is no
  `promote_dtype`. Options that read `count` (`debias`, `momentum=None`, callable `r_max` / `d_max`)
  need normjax's count: after loading a flax state, use `from_flax_state(..., count=steps)`.

  Raises:
    ValueError: invalid options (those of `BatchNormConfig`), a bad `num_features`, a custom
      initializer without `rngs`; at call time no mode, or both `use_running_average` and `training`.
    TypeError: a mode flag that is not a Python or NumPy bool.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> layer = njn.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (16, 3)) + 4.0
    >>> y = layer(x)                      # training (use_running_average=False): statistics move
    >>> int(layer.count[...]), bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5))
    (1, True)
    >>> layer.eval()
    >>> y = layer(x)                      # running statistics; state unchanged
    >>> int(layer.count[...])
    1

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167; Hoffer et al. 2017, arXiv:1705.08741 (ghost batches);
    Ioffe 2017, arXiv:1702.03275 (Batch Renormalization).
  """

  def __init__(
    self,
    num_features: Union[int, Sequence[int]],
    *,
    use_running_average: Optional[bool] = False,
    axis: validation.Axes = -1,
    momentum: Optional[float] = 0.99,
    epsilon: float = 1e-5,
    debias: bool = False,
    unbiased_running_var: bool = False,
    use_scale: bool = True,
    use_bias: bool = True,
    stats_method: str = "shifted",
    stats_shift: str = "running",
    use_fast_variance: Optional[bool] = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    ghost_batch_size: Optional[int] = None,
    ghost_grouping: str = "consecutive",
    renorm: bool = False,
    r_max: renorm_lib.ScalarOrSchedule = 3.0,
    d_max: renorm_lib.ScalarOrSchedule = 5.0,
    check_finite: bool = False,
    tpu_kernel: bool = False,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scale_init: Any = _common.ONES,
    bias_init: Any = _common.ZEROS,
    scale_metadata: Mapping[str, Any] = _EMPTY,
    bias_metadata: Mapping[str, Any] = _EMPTY,
    rngs: Optional[nnx.Rngs] = None,
  ):
    layer = type(self).__name__
    use_running_average = modes.check_flag(use_running_average, "use_running_average")
    method = _common.stats_method(use_fast_variance, stats_method)
    config = _common.config_from(bn_lib.BatchNormConfig, locals(), layer, stats_method=method)
    shape = _common.feature_shape(num_features, config.axis, layer)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.use_fast_variance = use_fast_variance
    _common.store_options(self, config, stats_method=stats_method)
    _, state = bn_lib.init_variables(shape, use_scale=False, use_bias=False)
    self.mean = nnx.BatchStat(state.mean)
    self.var = nnx.BatchStat(state.var)
    self.count = BatchCount(state.count)
    _common.affine(
      self,
      shape,
      use_scale=use_scale,
      use_bias=use_bias,
      scale_init=scale_init,
      bias_init=bias_init,
      param_dtype=param_dtype,
      rngs=rngs,
      scale_metadata=scale_metadata,
      bias_metadata=bias_metadata,
      layer=layer,
    )

  @property
  def config(self) -> bn_lib.BatchNormConfig:
    """The core configuration built from the current attributes (validated)."""
    return _common.build_config(self, bn_lib.BatchNormConfig)

  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes `x`; in training also updates `mean`, `var` and `count`.

    Args:
      x: float input with the features on `axis`.
      use_running_average: overrides the attribute for this call (flax's argument).
      training: normjax's flag, `not use_running_average`; give at most one of the two.
      mask: optional boolean array broadcastable to `x`; False elements do not count in the statistics.

    Returns:
      The normalized `x`, in `dtype` (default: `x`'s).
    """
    training = modes.merge_override(
      self.use_running_average,
      use_running_average,
      training,
      layer=f"normjax.nnx.{type(self).__name__}",
    )
    state = bn_lib.BatchNormState(self.mean[...], self.var[...], self.count[...])
    y, new_state, moments = bn_lib.apply_with_batch_moments(
      self.config, _common.affine_params(self), state, x, training=training, mask=mask
    )
    if training:
      self.mean[...], self.var[...], self.count[...] = new_state
      _record(self, moments)
    return y

  def set_view(self, use_running_average: Optional[bool] = None):
    """Used by `nnx.view(model, use_running_average=...)`, as flax's BatchNorm.

    Args:
      use_running_average: if given, the new mode attribute.
    """
    if use_running_average is not None:
      self.use_running_average = modes.check_flag(use_running_average, "use_running_average")


def _signature_with_defaults(cls, **defaults) -> inspect.Signature:
  sig = inspect.signature(cls.__init__)
  return sig.replace(
    parameters=[
      p.replace(default=defaults[p.name]) if p.name in defaults else p
      for p in sig.parameters.values()
    ]
  )


class GhostBatchNorm(BatchNorm):
  """`BatchNorm` with ghost batches of `ghost_batch_size` (default 128; Hoffer et al. 2017).

  Every other argument is `BatchNorm`'s (`inspect.signature` lists them all).

  Example:
    >>> import jax.numpy as jnp, normjax.nnx as njn
    >>> y = njn.GhostBatchNorm(3, ghost_batch_size=4)(jnp.arange(24.0).reshape(8, 3))

  References:
    Hoffer, Hubara & Soudry 2017, arXiv:1705.08741.
  """

  _DEFAULTS = {"ghost_batch_size": 128}

  def __init__(self, num_features, **options):
    super().__init__(num_features, **{**self._DEFAULTS, **options})


class BatchRenorm(BatchNorm):
  """`BatchNorm` with Batch Renormalization (`renorm=True`); `r_max`, `d_max` numbers or schedules.

  Every other argument is `BatchNorm`'s (`inspect.signature` lists them all).

  Example:
    >>> import jax.numpy as jnp, normjax, normjax.nnx as njn
    >>> layer = njn.BatchRenorm(3, **normjax.batch_renorm_paper_schedule()._asdict())
    >>> y = layer(jnp.arange(24.0).reshape(8, 3))

  References:
    Ioffe 2017, arXiv:1702.03275.
  """

  _DEFAULTS = {"renorm": True}

  def __init__(self, num_features, **options):
    super().__init__(num_features, **{**self._DEFAULTS, **options})


GhostBatchNorm.__init__.__signature__ = _signature_with_defaults(
  BatchNorm, **GhostBatchNorm._DEFAULTS
)
BatchRenorm.__init__.__signature__ = _signature_with_defaults(BatchNorm, **BatchRenorm._DEFAULTS)


def to_flax_state(state_or_model):
  """The state of a normjax nnx model as `flax.nnx.BatchNorm` expects it: every `count` dropped.

  One call converts a whole model: `nnx.update(flax_model, normjax.nnx.to_flax_state(model))` loads a
  model built with `normjax.nnx.BatchNorm` into the same model built with `flax.nnx.BatchNorm` (same
  options). Parameters and every other variable are kept unchanged.

  Args:
    state_or_model: an `nnx.Module`, an `nnx.State` (e.g. `nnx.state(model)`), or a nested dict of
      plain arrays (`State.to_pure_dict()`, where a `count` beside `mean` and `var` is dropped).

  Returns:
    An `nnx.State` (a dict for a dict) without normjax's update counters.

  Example:
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> ours = njn.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> nnx.update(theirs, njn.to_flax_state(ours))
    >>> sorted(njn.to_flax_state(ours).keys())
    ['bias', 'mean', 'scale', 'var']
  """
  if isinstance(state_or_model, nnx.Module):
    return nnx.state(state_or_model, nnx.Not(BatchCount))
  if isinstance(state_or_model, nnx.State):
    return nnx.filter_state(state_or_model, nnx.Not(BatchCount))
  if isinstance(state_or_model, Mapping):
    return _drop_counts(state_or_model)
  raise TypeError(
    f"state_or_model is a {type(state_or_model).__name__}; expected an nnx.Module, an "
    "nnx.State or a nested dict of arrays"
  )


def _drop_counts(tree):
  if not isinstance(tree, Mapping):
    return tree
  is_bn = (
    "count" in tree and "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping)
  )
  return {k: _drop_counts(v) for k, v in tree.items() if not (is_bn and k == "count")}


_COUNT_OPTIONS = "debias=True, momentum=None or a callable r_max / d_max"


def _needs_count(module) -> bool:
  if not isinstance(module, BatchNorm):
    return False
  uses_schedule = module.renorm and (callable(module.r_max) or callable(module.d_max))
  return module.debias or module.momentum is None or uses_schedule


def from_flax_state(model: nnx.Module, flax_state, *, count: Optional[int] = None) -> None:
  """Loads a state made by `flax.nnx.BatchNorm` layers into a normjax model, in place.

  `nnx.update(model, flax_state)` does the same when no layer reads its update counter; this also
  sets every normjax BatchNorm's `count` to `count` (the number of training steps the flax model
  took), which `debias=True`, `momentum=None` and renorm schedules need, and refuses to guess it.

  Args:
    model: a model built with `normjax.nnx.BatchNorm` layers.
    flax_state: `nnx.state(flax_model)` (or any part of it), as `nnx.update` takes.
    count: the number of training updates behind the flax statistics; None keeps the counters.

  Raises:
    ValueError: `count` is None and a layer uses `debias=True`, `momentum=None` or a callable
      `r_max` / `d_max`; or `count` is not a non-negative int.

  Example:
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> ours = njn.BatchNorm(3, debias=True, rngs=nnx.Rngs(0))
    >>> njn.from_flax_state(ours, nnx.state(theirs), count=100)
    >>> int(ours.count[...])
    100
  """
  if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
    raise ValueError(
      f"count={count!r} must be a non-negative int (training steps behind the state)"
    )
  layers = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
  if count is None:
    needy = ["/".join(map(str, path)) or "<root>" for path, m in layers if _needs_count(m)]
    if needy:
      raise ValueError(
        f"count=None but the BatchNorm layer(s) {needy} use {_COUNT_OPTIONS}, which "
        "read the update count that a flax state does not have; pass count=<number "
        "of training steps behind flax_state>"
      )
  nnx.update(model, flax_state)
  if count is not None:
    for _, m in layers:
      m.count[...] = jnp.asarray(count, jnp.int32)


def batch_norm_layers(model: nnx.Module):
  """[(path, layer)] for every normjax nnx BatchNorm (and subclass) in `model`."""
  return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
