"""Population statistics recalibration (precise BN, AdaBN) for flax nnx models with normjax BatchNorm."""

from typing import Any, Callable, Iterable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from normjax._src import stats
from normjax.nnx import _batch_norm


def _name(path) -> str:
  return "/".join(map(str, path)) or "<root>"


def _default_forward(model, batch):
  return model(batch)


def recalibrate_batch_stats(
  model: nnx.Module,
  batches: Iterable[Any],
  *,
  forward: Optional[Callable[[nnx.Module, Any], Any]] = None,
  unbiased: bool = False,
  jit: bool = True,
) -> None:
  """Sets every normjax nnx BatchNorm's running `mean` / `var` to population statistics, in place.

  A copy of the model, with every `normjax.nnx.BatchNorm` (and subclass) in training mode
  (`use_running_average=False`), runs `forward(copy, batch)` on each batch; each layer's batch moments
  (valid count, mean, biased variance of the global batch, ghost groups merged; a layer called twice in
  a forward pools both calls) are merged over the batches with `normjax.merge_moments`:
  `μ = Σ n_k μ_k / N`, `σ² = Σ n_k (σ²_k + (μ_k − μ)²) / N`, the statistics of the concatenated
  batches (precise BN). Run on data from a new domain, it is AdaBN. The weights, the update counters and
  every other variable of `model` are unchanged, and so is the mode attribute.

  Each layer's input depends on the earlier layers' batch statistics (training mode), as in the papers.
  `forward` must leave the BatchNorm mode to the attribute (or pass `training=True`); a layer it calls
  in evaluation mode reports nothing, which is an error. Batches may be sharded (`jit` with
  `NamedSharding`): the arrays are global, so the moments are the global batch's.

  Args:
    model: an nnx model containing `normjax.nnx.BatchNorm` layers.
    batches: an iterable of batches, each passed to `forward` as is.
    forward: `forward(model, batch)`; default `model(batch)`. Use it for other call signatures, e.g.
      `lambda m, b: m(b["image"])`.
    unbiased: store the Bessel-corrected `σ² N / (N − 1)` (layers trained with
      `unbiased_running_var=True`); default the biased σ², as `batch_norm` stores.
    jit: compile the per-batch step (one compilation per batch shape).

  Raises:
    ValueError: no normjax BatchNorm in `model`, `batches` empty, or a BatchNorm that `forward` did not
      call in training mode.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import normjax.nnx as njn
    >>> model = njn.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(4)]
    >>> njn.recalibrate_batch_stats(model, batches)
    >>> bool(jnp.allclose(model.mean[...], jnp.concatenate(batches).mean(0), atol=1e-6))
    True

  References:
    Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576 (precise BN); Li et al.
    2016, "Revisiting Batch Normalization For Practical Domain Adaptation", arXiv:1603.04779 (AdaBN).
  """
  layers = _batch_norm.batch_norm_layers(model)
  if not layers:
    raise ValueError("model has no normjax.nnx.BatchNorm layer to recalibrate")
  forward = _default_forward if forward is None else forward
  graphdef, state = nnx.split(model)

  def step(state, batch):
    copy = nnx.merge(graphdef, state)
    copies = _batch_norm.batch_norm_layers(copy)
    for _, layer in copies:
      layer.use_running_average = False
    with _batch_norm.recording() as records:
      forward(copy, batch)
    return {_name(path): records[id(layer)] for path, layer in copies if id(layer) in records}

  step_fn = jax.jit(step) if jit else step
  total = None
  for batch in batches:
    moments = step_fn(state, batch)
    total = (
      moments if total is None else {k: stats.merge_moments(*total[k], *moments[k]) for k in total}
    )
  if total is None:
    raise ValueError("batches is empty; recalibration needs at least one batch")
  missing = [_name(path) for path, _ in layers if _name(path) not in total]
  if missing:
    raise ValueError(
      f"BatchNorm layer(s) {missing} reported no batch moments: forward(model, batch) "
      "must call every normjax.nnx.BatchNorm in training mode (leave the mode to the "
      "layer attribute, or pass training=True)"
    )
  for path, layer in layers:
    count, mean, var = total[_name(path)]
    if unbiased:
      var = jnp.where(count > 1, var * count / jnp.maximum(count - 1.0, 1.0), var)
    layer.mean[...] = mean.astype(jnp.float32).reshape(layer.mean[...].shape)
    layer.var[...] = var.astype(jnp.float32).reshape(layer.var[...].shape)
