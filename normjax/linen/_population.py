"""Population statistics recalibration for BatchNorm layers: precise BN and AdaBN.

Contract with the model. `apply_fn` is called as

    apply_fn(variables, batch, training=True, mutable=["batch_stats", "batch_moments"])

and must return `(output, mutated_collections)`, which is exactly what a linen `model.apply` does when
the model's `__call__` is `(x, *, training)`; wrap anything else in a function, e.g.
`lambda v, b, **kw: model.apply(v, b["image"], rngs={"dropout": key}, **kw)`. Every
`normjax.linen.BatchNorm` (and its subclasses) called in training mode with `batch_moments` mutable
stores its batch's per-feature valid `count`, `mean` and biased `var` (global batch, ghost groups merged)
in `batch_moments` at the path of its `batch_stats`; the weights are not changed, and the running
statistics that the training call also updates are discarded.
"""

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from normjax._src import stats

_COLLECTIONS = ["batch_stats", "batch_moments"]


def _layers(tree, path=()):
  """(path, {"count", "mean", "var"}) for every layer entry of a `batch_moments` tree."""
  if isinstance(tree, Mapping):
    if (
      "count" in tree and "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping)
    ):
      yield path, tree
      return
    for k, v in tree.items():
      yield from _layers(v, path + (k,))


def _to_dict(tree):
  return {k: _to_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _merge(total, new):
  out = {}
  for path, a in _layers(total):
    b = new
    for k in path:
      b = b[k]
    out[path] = dict(
      zip(
        ("count", "mean", "var"),
        stats.merge_moments(a["count"], a["mean"], a["var"], b["count"], b["mean"], b["var"]),
      )
    )
  return _nest(out)


def _nest(flat):
  root = {}
  for path, value in flat.items():
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    if path:
      node[path[-1]] = value
    else:
      root = value
  return root


def _step(apply_fn, variables, batch):
  _, mutated = apply_fn(variables, batch, training=True, mutable=_COLLECTIONS)
  return _to_dict(mutated.get("batch_moments", {}))


_merge_jit = jax.jit(_merge)
_STEP_CACHE = {}


def _jitted_step(apply_fn):
  """One compiled step per `apply_fn` (a bound `model.apply` is cached; a fresh lambda is not)."""
  try:
    key = hash(apply_fn), apply_fn
  except TypeError:
    return jax.jit(functools.partial(_step, apply_fn))
  if key not in _STEP_CACHE:
    if len(_STEP_CACHE) > 32:
      _STEP_CACHE.clear()
    _STEP_CACHE[key] = jax.jit(functools.partial(_step, apply_fn))
  return _STEP_CACHE[key]


def recalibrate_batch_stats(
  apply_fn: Callable[..., Any],
  variables,
  batches: Iterable[Any],
  *,
  unbiased: bool = False,
  jit: bool = True,
):
  """Recomputes every BatchNorm layer's running mean and variance as population statistics.

  Runs the model in training mode, weights fixed, on each batch; collects each BatchNorm layer's batch
  moments (see the module docstring for the `apply_fn` contract) and merges them over the batches with
  `normjax.merge_moments`: with per-batch counts n_k, means μ_k and biased variances σ²_k,
  `μ = Σ n_k μ_k / N` and `σ² = Σ n_k (σ²_k + (μ_k − μ)²) / N`, the mean of the batch variances plus the
  variance of the batch means, count-weighted. This is the statistics of the concatenation of the
  batches for every layer (precise BN). Running it on data from a new domain is AdaBN.

  Each layer's inputs depend on the earlier layers' *batch* statistics (training mode), as in the
  papers; the result is independent of the old running statistics. The batches may be sharded over
  devices (`jit` with `NamedSharding`): the arrays are global, so the moments are those of the global
  batch. Layers built with an `axis_name` need that axis bound: pass an `apply_fn` that runs the model
  under `jax.shard_map` (their moments are then already synchronized over the axis).

  Args:
    apply_fn: `apply_fn(variables, batch, training=True, mutable=[...]) -> (out, collections)`, e.g.
      `model.apply` of a `normjax.linen` model.
    variables: the model's variables, with `params` and `batch_stats`.
    batches: an iterable of batches, each passed to `apply_fn` as is.
    unbiased: store the Bessel-corrected variance `σ² N / (N − 1)` (for layers trained with
      `unbiased_running_var=True`); default: the biased population variance σ², as `batch_norm` stores.
    jit: compile the per-batch step (one compilation per batch shape).

  Returns:
    `variables` with every reporting layer's `batch_stats` `mean` and `var` replaced (float32); their
    `count` and every other variable are unchanged.

  Raises:
    ValueError: `batches` is empty, or no BatchNorm layer reported moments (the model has none, or its
      layers are not `normjax.linen.BatchNorm`).

  Example:
    >>> import jax, jax.numpy as jnp, normjax, normjax.linen as njl
    >>> model = njl.BatchNorm()
    >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(4)]
    >>> variables = model.init(jax.random.key(0), batches[0], training=False)
    >>> variables = normjax.linen.recalibrate_batch_stats(model.apply, variables, batches)
    >>> bool(jnp.allclose(variables["batch_stats"]["mean"], jnp.concatenate(batches).mean(0), atol=1e-6))
    True

  References:
    Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576 (precise BN); Li et al.
    2016, "Revisiting Batch Normalization For Practical Domain Adaptation", arXiv:1603.04779 (AdaBN).
  """
  step_fn = _jitted_step(apply_fn) if jit else functools.partial(_step, apply_fn)
  merge_fn = _merge_jit if jit else _merge
  total = None
  for batch in batches:
    moments = step_fn(variables, batch)
    if not any(True for _ in _layers(moments)):
      raise ValueError(
        "no BatchNorm layer reported batch moments: apply_fn must call normjax.linen.BatchNorm layers "
        "in training mode and pass through the `mutable` collections it is given"
      )
    total = moments if total is None else merge_fn(total, moments)
  if total is None:
    raise ValueError("batches is empty; recalibration needs at least one batch")
  new = _to_dict(variables)
  for path, layer in _layers(total):
    node = new["batch_stats"]
    for k in path:
      node = node[k]
    var = layer["var"]
    if unbiased:
      n = layer["count"]
      var = jnp.where(n > 1, var * n / jnp.maximum(n - 1.0, 1.0), var)
    node["mean"] = layer["mean"].astype(jnp.float32).reshape(jnp.shape(node["mean"]))
    node["var"] = var.astype(jnp.float32).reshape(jnp.shape(node["var"]))
  return new
