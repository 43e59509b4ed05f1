"""The protocol every normjax layer follows: a NamedTuple of two pure functions."""

from typing import Any, Callable, NamedTuple


class Transform(NamedTuple):
  """A normalization as pure functions, in the style of optax's `GradientTransformation`.

  Attributes:
    init: `init(x) -> (params, state)`; `x` may be an array or a `jax.ShapeDtypeStruct`.
    apply: `apply(params, state, x, *, training, mask=None) -> (y, new_state)`; `training` is
      keyword-only and has no default.
  """
  init: Callable[..., Any]
  apply: Callable[..., Any]


class EmptyState(NamedTuple):
  """The state of a stateless normalization (layer, group, instance, RMS norm)."""


def check_training_flag(training) -> None:
  if not isinstance(training, bool):
    raise TypeError(f"training={training!r} must be a Python bool (it selects the computation at trace "
                    "time); pass training=True or training=False")
