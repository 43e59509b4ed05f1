"""Weight constraints (Keras semantics) as pure projections and as optax gradient transformations.

A `Constraint` is a NamedTuple `(init, update, project)`:
  * `project(params) -> params` maps every selected leaf onto the constraint set and leaves the other
    leaves untouched (the same objects);
  * `init` / `update` make it an `optax.GradientTransformation` to chain *after* an optimizer:
    `update(updates, state, params)` returns `project(params + updates) - params` for selected leaves, so
    after `optax.apply_updates` the parameters lie inside the constraint after every step (up to one
    float rounding of the subtraction and re-addition); other leaves' updates pass through unchanged.

Axis semantics are Keras's: `axis` names the axes a norm is taken over, so for a Dense kernel of shape
`(in, out)` `axis=0` constrains each unit's incoming weight vector. The default `axis=None` means "every
axis but the last", which is Keras's `axis=0` for a Dense kernel and `axis=[0, 1, 2]` for a channels-last
Conv2D kernel `(h, w, in, out)`: each output unit's fan-in.

Leaf selection: `where` is a predicate `where(path, leaf) -> bool` (`path` as in
`jax.tree_util.tree_map_with_path`) or a pytree of bools of the params' structure. The default selects
leaves named `kernel` with at least two dimensions (Dense and Conv kernels; not biases nor norm scales).
"""

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from normjax._src import validation

Where = Union[None, Callable[[Any, Any], bool], Any]
_EPSILON = 1e-7  # Keras's backend epsilon, in the denominator of the rescaling


class Constraint(NamedTuple):
  """A constraint: an optax `GradientTransformation` (`init`, `update`) plus its `project`."""

  init: Callable[..., Any]
  update: Callable[..., Any]
  project: Callable[[Any], Any]


def is_kernel(path, leaf) -> bool:
  """The default selection: leaves whose last key is `kernel` and that have at least two dimensions."""
  last = path[-1] if path else None
  name = getattr(last, "key", getattr(last, "name", None))
  return name == "kernel" and jnp.ndim(leaf) >= 2


def l2_norms(w: jax.Array, axes) -> jax.Array:
  """Euclidean norms over `axes` (keepdims), accumulated in float32: `sqrt(Σ w²)`."""
  wf = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(wf * wf, axis=axes, keepdims=True))


def _leaf_axes(axis, leaf, path):
  ndim = jnp.ndim(leaf)
  if axis is None:
    if ndim < 2:
      raise ValueError(
        f"axis=None (every axis but the last) needs a leaf of rank >= 2; the leaf at "
        f"{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}"
      )
    return tuple(range(ndim - 1))
  try:
    return validation.normalize_axes(axis, ndim, "axis")
  except ValueError as e:
    raise ValueError(
      f"{e} (the leaf at {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)})"
    ) from None


def _selected(where, params):
  """A pytree of Python bools, one per leaf of `params`."""
  if where is None:
    where = is_kernel
  if callable(where):
    return jax.tree_util.tree_map_with_path(lambda p, leaf: bool(where(p, leaf)), params)
  return where


def _make(leaf_projection, axis, where, needs_axis=True) -> Constraint:
  def project(params):
    selected = _selected(where, params)

    def one(path, leaf, chosen):
      if not chosen:
        return leaf
      axes = _leaf_axes(axis, leaf, path) if needs_axis else None
      return leaf_projection(leaf, axes).astype(jnp.result_type(leaf))

    return jax.tree_util.tree_map_with_path(one, params, selected)

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("a constraint's update needs params: call tx.update(updates, state, params)")
    selected = _selected(where, params)
    projected = project(jax.tree_util.tree_map(lambda p, u: p + u, params, updates))
    new_updates = jax.tree_util.tree_map(
      lambda chosen, u, p, q: q - p if chosen else u, selected, updates, params, projected
    )
    return new_updates, state

  return Constraint(init, update, project)


def _rescale(w, axes, target_fn):
  norms = l2_norms(w, axes)
  return w * (target_fn(norms) / (_EPSILON + norms))


def _check_value(value, name, lower=0.0):
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= lower:
    raise ValueError(f"{name}={value!r} must be a number >= {lower}")


def max_norm(max_value: float = 2.0, *, axis=None, where: Where = None) -> Constraint:
  """Max-norm: rescale every unit's weight vector whose norm exceeds `max_value` back onto the ball.

  `w ← w · min(‖w‖, c) / (1e-7 + ‖w‖)` (Keras's `MaxNorm`), norms over `axis`.

  Args:
    max_value: the radius c >= 0 (Srivastava et al. use c between 3 and 4 with dropout).
    axis: axes the norm is taken over (Keras semantics); None: every axis but the last.
    where: which leaves to constrain (default: Dense/Conv `kernel`s), see the module docstring.

  Returns:
    A `Constraint`: `project(params)`, and `init` / `update` as an optax transformation.

  Raises:
    ValueError: negative `max_value`; when projecting, an `axis` out of range for a selected leaf.

  Example:
    >>> import jax.numpy as jnp, optax, normjax
    >>> params = {"dense": {"kernel": jnp.full((4, 2), 3.0), "bias": jnp.full((2,), 9.0)}}
    >>> tx = optax.chain(optax.sgd(0.1), normjax.max_norm(3.0))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> [round(float(n), 4) for n in jnp.linalg.norm(new["dense"]["kernel"], axis=0)]
    [3.0, 3.0]

  References:
    Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR
    15 (§5.1, max-norm regularization); Keras `keras.constraints.MaxNorm`.
  """
  _check_value(max_value, "max_value")
  return _make(
    lambda w, axes: _rescale(w, axes, lambda n: jnp.clip(n, 0.0, max_value)), axis, where
  )


def unit_norm(*, axis=None, where: Where = None) -> Constraint:
  """Unit-norm: `w ← w / (1e-7 + ‖w‖)` per unit (Keras's `UnitNorm`); args as in `max_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> out = normjax.unit_norm().project({"kernel": jnp.array([[3.0], [4.0]])})
    >>> [round(float(v), 3) for v in out["kernel"][:, 0]]
    [0.6, 0.8]
  """
  return _make(lambda w, axes: _rescale(w, axes, jnp.ones_like), axis, where)


def min_max_norm(
  min_value: float = 0.0,
  max_value: float = 1.0,
  rate: float = 1.0,
  *,
  axis=None,
  where: Where = None,
) -> Constraint:
  """Min-max-norm: `w ← w · (rate · clip(‖w‖, min, max) + (1 − rate) · ‖w‖) / (1e-7 + ‖w‖)` (Keras).

  `rate=1` enforces the bounds strictly; a smaller rate moves the norm only part of the way each step.

  Args:
    min_value, max_value: bounds on each unit's norm, `0 <= min_value <= max_value`.
    rate: in [0, 1], the fraction of the way to the clipped norm.
    axis, where: as in `max_norm`.

  Raises:
    ValueError: a negative bound, `min_value > max_value`, or `rate` outside [0, 1].

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> out = normjax.min_max_norm(1.0, 2.0).project({"kernel": jnp.array([[0.3], [0.4]])})
    >>> round(float(jnp.linalg.norm(out["kernel"])), 4)
    1.0
  """
  _check_value(min_value, "min_value")
  _check_value(max_value, "max_value")
  if min_value > max_value:
    raise ValueError(f"min_value={min_value!r} must not exceed max_value={max_value!r}")
  if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate={rate!r} must be a number in [0, 1]")
  target = lambda n: rate * jnp.clip(n, min_value, max_value) + (1.0 - rate) * n  # noqa: E731
  return _make(lambda w, axes: _rescale(w, axes, target), axis, where)


def non_neg(*, where: Where = None) -> Constraint:
  """Non-negativity: `w ← w · [w >= 0]` elementwise (Keras's `NonNeg`); `where` as in `max_norm`.

  Example:
    >>> import jax.numpy as jnp, normjax
    >>> normjax.non_neg().project({"kernel": jnp.array([[-1.0, 2.0]])})["kernel"].tolist()
    [[0.0, 2.0]]
  """
  return _make(
    lambda w, axes: jnp.where(w >= 0, w, jnp.zeros_like(w)), None, where, needs_axis=False
  )
