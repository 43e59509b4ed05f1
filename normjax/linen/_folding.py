"""Conv-BN folding of a whole linen model: every BatchNorm that follows a Conv or Dense is merged into it.

The arithmetic is the pure `normjax.fold_batch_norm`; this module finds the pairs in a linen model and
rewrites its variables.
"""

from typing import Mapping

import flax.linen as nn
import jax

from normjax._src import folding
from normjax._src import modes
from normjax._src import validation
from normjax.linen import _batch_norm
from normjax.linen import _frozen_batch_norm


def _is_bn(module):
  return isinstance(module, (_batch_norm.BatchNorm, _frozen_batch_norm.FrozenBatchNorm))


def _trains(module, call_args, call_kwargs) -> bool:
  """Whether a BatchNorm call uses batch statistics (FrozenBatchNorm never does)."""
  if isinstance(module, _frozen_batch_norm.FrozenBatchNorm):
    return False
  argument = call_args[1] if len(call_args) > 1 else call_kwargs.get("use_running_average")
  return modes.merge_linen(
    module.use_running_average, argument, call_kwargs.get("training"), layer=type(module).__name__
  )


def _find_pairs(model, variables, args, kwargs):
  """[(conv path, bn path, epsilon, conv has bias)] for every BatchNorm of an eval-mode forward."""
  producers, keep_alive, pairs, errors = {}, [], [], []

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    if _is_bn(module):
      x = call_args[0] if call_args else call_kwargs.get("x")
      path = "/".join(module.path)
      if _trains(module, call_args, call_kwargs):
        raise ValueError(
          f"BatchNorm at {path!r} is called in training mode; folding needs the "
          "eval-mode call (training=False or use_running_average=True)"
        )
      producer = producers.pop(id(x), None)
      axis = validation.normalize_axes(module.axis, x.ndim, "axis")
      if producer is None:
        errors.append(
          f"BatchNorm at {path!r} does not directly follow a Conv or Dense (its input is not "
          "the output of one, or that output feeds another BatchNorm); it cannot be folded"
        )
      elif axis != (x.ndim - 1,):
        errors.append(
          f"BatchNorm at {path!r} normalizes axis={module.axis!r}, not the last axis that "
          f"holds the features of the preceding {producer[0]!r}"
        )
      else:
        pairs.append((producer[1], module.path, module.epsilon, producer[2]))
    out = next_fun(*call_args, **call_kwargs)
    if type(module) in (nn.Dense, nn.Conv):  # pylint: disable=unidiomatic-typecheck
      keep_alive.append(out)
      producers[id(out)] = (type(module).__name__, module.path, module.use_bias)
    return out

  def run(v):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *args, **kwargs)

  jax.eval_shape(run, variables)
  if errors:
    raise ValueError("; ".join(errors))
  return pairs


def _node(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _to_dict(tree):
  return {k: _to_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def fold_batch_norm_model(model: nn.Module, variables, *args, **kwargs):
  """Folds every BatchNorm of a linen model (in eval mode) into the Conv/Dense that feeds it.

  The model is traced once with `model.apply(variables, *args, **kwargs)` (pass the eval-mode
  arguments, e.g. a sample input and `training=False`) to find each `normjax.linen.BatchNorm` or
  `FrozenBatchNorm` whose input is the output of a `flax.linen.Dense` or `Conv` (the same array, with
  the features on its last axis). Each pair's kernel and bias are replaced by `fold_batch_norm`'s, the
  BatchNorm's params and `batch_stats` are removed, and the returned `apply_fn` runs the same model with
  those BatchNorm calls replaced by the identity (a Conv/Dense created with `use_bias=False` gets its
  folded bias added to its output).

  The Conv/Dense output must feed only the BatchNorm (folding changes that array for every other use;
  this is not checked).

  Args:
    model: a linen module.
    variables: its variables (`params`, `batch_stats`, ...).
    *args, **kwargs: the arguments of an eval-mode call, as for `model.apply`.

  Returns:
    `(apply_fn, folded_variables)`; `apply_fn(folded_variables, *args, **kwargs)` has `model.apply`'s
    signature and equals the eval-mode model's output up to float rounding.

  Raises:
    ValueError: a BatchNorm that does not directly follow a Conv/Dense on the same (last) features, or
      one called with `training=True`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, normjax, normjax.linen as njl
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, *, training):
    ...     return njl.BatchNorm()(nn.Dense(4)(x), training=training)
    >>> x = jnp.ones((2, 3))
    >>> variables = Net().init(jax.random.key(0), x, training=False)
    >>> apply_fn, folded = njl.fold_batch_norm_model(Net(), variables, x, training=False)
    >>> bool(jnp.allclose(apply_fn(folded, x, training=False), Net().apply(variables, x, training=False)))
    True
  """
  pairs = _find_pairs(model, variables, args, kwargs)
  new = _to_dict(variables)
  biasless = set()
  for conv_path, bn_path, epsilon, has_bias in pairs:
    conv = _node(new["params"], conv_path)
    bn_params = (
      dict(_node(new["params"], bn_path)) if bn_path and _has(new["params"], bn_path) else {}
    )
    bn_state = _node(new["batch_stats"], bn_path)
    conv["kernel"], conv["bias"] = folding.fold_batch_norm(
      conv["kernel"], conv.get("bias"), bn_params, bn_state, epsilon=epsilon
    )
    if not has_bias:
      biasless.add(tuple(conv_path))
    for collection in ("params", "batch_stats"):
      if _has(new.get(collection, {}), bn_path):
        del _node(new[collection], bn_path[:-1])[bn_path[-1]]
  bn_paths = {tuple(p) for _, p, _, _ in pairs}

  def apply_fn(folded_variables, *call_args, **call_kwargs):
    def interceptor(next_fun, a, kw, context):
      path = tuple(context.module.path)
      if context.method_name == "__call__" and path in bn_paths:
        return a[0] if a else kw.get("x")
      out = next_fun(*a, **kw)
      if context.method_name == "__call__" and path in biasless:
        out = out + context.module.get_variable("params", "bias").astype(out.dtype)
      return out

    with nn.intercept_methods(interceptor):
      return model.apply(folded_variables, *call_args, **call_kwargs)

  return apply_fn, new


def _has(tree, path):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return False
    tree = tree[k]
  return True
