"""linen modules that hold no arithmetic: they store variables and call the pure transforms.

They speak flax's language: `use_running_average` as a field or a `__call__` argument (merged as
`flax.linen.merge_param` does), flax's `scale_init` / `bias_init` / `use_fast_variance`, and flax's
variable layout (`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`), so `normjax.linen.BatchNorm`
replaces `flax.linen.BatchNorm` by changing the import and loads its checkpoints. normjax adds
`batch_stats/count`, the number of training updates; variables without it (a flax checkpoint) work for
every option that does not need it, and `to_flax_variables` drops it.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax._src import batch_norm as bn_lib
from normjax._src import modes
from normjax._src import virtual_batch_norm as vbn_lib

Initializer = Callable[..., Any]


def needs_count(config: bn_lib.BatchNormConfig) -> bool:
  """Whether the running update or renorm's clipping reads `state.count`."""
  schedule = config.renorm and (callable(config.r_max) or callable(config.d_max))
  return config.momentum is None or config.debias or schedule


class BatchNorm(nn.Module):
  """`normjax.batch_norm` as a linen module, a drop-in for `flax.linen.BatchNorm`.

  Fields are flax's (`use_running_average`, `axis`, `momentum`, `epsilon`, `dtype`, `param_dtype`,
  `use_bias`, `use_scale`, `bias_init`, `scale_init`, `axis_name`, `axis_index_groups`,
  `use_fast_variance`, `force_float32_reductions` — normjax always reduces in float32) followed by every other option of `normjax.batch_norm` (see its docstring).
  Differences from flax: statistics default to normjax's accurate one-pass method (`use_fast_variance=True`
  or `stats_method="fast"` gives flax's E[x²]−E[x]²), and `dtype=None` means the input's dtype (flax
  promotes the input and parameter dtypes).

  The mode comes from exactly one of: the field `use_running_average`, the `__call__` argument
  `use_running_average` (both as in flax, where setting both raises even when they agree), or normjax's
  keyword `training` (`training = not use_running_average`). None given, or two, raises ValueError; a
  given flag that is not a Python or NumPy bool raises TypeError.

  `scale` and `bias` live in `params`; `mean`, `var` and `count` in the mutable `batch_stats` collection.
  Variables without `count` (e.g. made by `flax.linen.BatchNorm`) apply unchanged unless an option needs
  the count (`debias`, `momentum=None`, renorm schedules); such variables stay without it. `model.init`
  neither updates the statistics nor needs a bound `axis_name` (flax#1250): while initializing, the layer
  normalizes with the initial running statistics, whatever the mode. When the collection
  `batch_moments` is mutable, a training call also stores the batch's per-feature `count`, `mean` and
  `var` there (`normjax.linen.recalibrate_batch_stats` reads them).

  Example:
    >>> import jax, jax.numpy as jnp, normjax.linen as njl
    >>> layer = njl.BatchNorm(use_running_average=False, momentum=0.9)
    >>> x = jnp.ones((8, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    >>> y = njl.BatchNorm(momentum=0.9).apply(variables, x, training=False)  # normjax's keyword
  """

  use_running_average: Optional[bool] = None
  axis: Any = -1
  momentum: Optional[float] = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: Optional[bool] = None
  force_float32_reductions: bool = True
  debias: bool = False
  unbiased_running_var: bool = False
  stats_method: str = "shifted"
  stats_shift: str = "running"
  ghost_batch_size: Optional[int] = None
  ghost_grouping: str = "consecutive"
  renorm: bool = False
  r_max: Any = 3.0
  d_max: Any = 5.0
  check_finite: bool = False
  tpu_kernel: bool = False

  def _config(self, **overrides) -> bn_lib.BatchNormConfig:
    options = {f.name: getattr(self, f.name) for f in dataclasses.fields(bn_lib.BatchNormConfig)}
    options["stats_method"] = modes.stats_method_from_flax(
      self.use_fast_variance, self.stats_method
    )
    if modes.check_flag(self.force_float32_reductions, "force_float32_reductions") is False:
      raise ValueError(
        "force_float32_reductions=False: normjax always reduces in float32 (float64 for "
        "float64 input); leave it True"
      )
    return bn_lib.BatchNormConfig(**{**options, **overrides})

  def _variables(self, config, feature_shape):
    """(params, state, stats variables); `count` is absent from `stats` for count-less variables."""
    params = {
      name: self.param(name, getattr(self, f"{name}_init"), feature_shape, self.param_dtype)
      for name in ("scale", "bias")
      if getattr(self, f"use_{name}")
    }
    stats = {
      "mean": self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32),
      "var": self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32),
    }
    if self.is_initializing() or self.has_variable("batch_stats", "count"):
      stats["count"] = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
    elif needs_count(config):
      raise ValueError(
        f"{self.name or type(self).__name__}: batch_stats has no 'count' (variables from "
        "flax.linen.BatchNorm?), but debias, momentum=None or a renorm schedule needs the number of "
        "updates; add batch_stats['count'] = jnp.zeros((), jnp.int32) (or the number of steps "
        "trained) to the variables"
      )
    count = stats["count"].value if "count" in stats else jnp.zeros((), jnp.int32)
    return params, bn_lib.BatchNormState(stats["mean"].value, stats["var"].value, count), stats

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes `x`; see the class docstring for how the mode is chosen.

    Args:
      x: the input.
      use_running_average: flax's flag (merged with the field of the same name).
      training: normjax's flag, `not use_running_average`.
      mask: optional boolean mask of valid elements (see `normjax.batch_norm`).

    Returns:
      The normalized `x`.
    """
    training = modes.merge_linen(
      self.use_running_average, use_running_average, training, layer=type(self).__name__
    )
    initializing = self.is_initializing()
    config = (
      self._config(axis_name=None, axis_index_groups=None) if initializing else self._config()
    )
    axes = bn_lib.feature_axes(config, jnp.ndim(x))
    feature_shape = tuple(jnp.shape(x)[a] for a in axes)
    params, state, stats = self._variables(config, feature_shape)
    update = training and not initializing
    y, new_state, moments = bn_lib.apply_with_batch_moments(
      config, params, state, x, training=update, mask=mask
    )
    if update:
      for name, variable in stats.items():
        variable.value = getattr(new_state, name)
      if self.is_mutable_collection(
        "batch_moments"
      ):  # read by normjax.linen.recalibrate_batch_stats
        for k, v in zip(("count", "mean", "var"), moments):
          self.put_variable("batch_moments", k, v)
    return y


class GhostBatchNorm(BatchNorm):
  """`BatchNorm` with ghost batches of `ghost_batch_size` (default 128, Hoffer et al. 2017)."""

  ghost_batch_size: Optional[int] = 128


class BatchRenorm(BatchNorm):
  """`BatchNorm` with Batch Renormalization on (Ioffe 2017); `r_max`, `d_max` numbers or schedules."""

  renorm: bool = True


def to_flax_variables(variables):
  """`variables` of normjax.linen BatchNorm layers in `flax.linen.BatchNorm`'s layout (one call).

  Drops every `count` that sits beside `mean` and `var` in `batch_stats`; everything else is returned
  unchanged (`params` already match). Loading the other way needs no conversion: flax variables apply
  to `normjax.linen.BatchNorm` as they are.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, normjax.linen as njl
    >>> x = jnp.ones((4, 3))
    >>> variables = njl.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    >>> y = nn.BatchNorm(use_running_average=True).apply(njl.to_flax_variables(variables), x)
  """

  def strip(tree):
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
      return tree
    tree = dict(tree.items())
    if "mean" in tree and "var" in tree and "count" in tree and not hasattr(tree["mean"], "items"):
      tree.pop("count")
    return {k: strip(v) for k, v in tree.items()}

  variables = dict(variables.items())
  if "batch_stats" in variables:
    variables["batch_stats"] = strip(variables["batch_stats"])
  return variables


class VirtualBatchNorm(nn.Module):
  """`normjax.virtual_batch_norm` as a linen module: the batch given to `init` is the reference batch.

  Its statistics are stored in `batch_stats` and never change afterwards. Training and evaluation
  compute the same thing, so the mode flags (`use_running_average`, `training`) are optional here; a
  given one is still type-checked.

  Example:
    >>> import jax, normjax.linen as njl
    >>> reference = jax.random.normal(jax.random.key(0), (64, 4))
    >>> variables = njl.VirtualBatchNorm().init(jax.random.key(1), reference)
  """

  use_running_average: Optional[bool] = None
  axis: Any = -1
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  stats_method: str = "shifted"

  @nn.compact
  def __call__(
    self,
    x,
    use_running_average: Optional[bool] = None,
    *,
    training: Optional[bool] = None,
    mask=None,
  ):
    """Normalizes each example of `x` with the statistics of the reference batch together with that example."""
    for name, flag in (
      ("use_running_average", self.use_running_average),
      ("use_running_average", use_running_average),
      ("training", training),
    ):
      modes.check_flag(flag, name)
    options = {
      f.name: getattr(self, f.name) for f in dataclasses.fields(vbn_lib.VirtualBatchNormConfig)
    }
    vbn = vbn_lib.from_config(vbn_lib.VirtualBatchNormConfig(**options))
    if self.is_initializing():
      _, init_state = vbn.init(x, mask=mask)
    else:  # flax may still trace the initializers for their shapes
      init_state = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(vbn.init, x)[1]
      )
    feature_shape = init_state.mean.shape
    params = {
      name: self.param(name, getattr(self, f"{name}_init"), feature_shape, self.param_dtype)
      for name in ("scale", "bias")
      if getattr(self, f"use_{name}")
    }
    fields = vbn_lib.VirtualBatchNormState._fields
    state = vbn_lib.VirtualBatchNormState(
      *(self.variable("batch_stats", k, lambda k=k: getattr(init_state, k)).value for k in fields)
    )
    y, _ = vbn.apply(params, state, x, training=False, mask=mask)
    return y
