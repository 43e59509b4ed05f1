"""The protocol every normjax layer follows: a NamedTuple of two pure functions."""

from typing import Any, Callable, NamedTuple

from normjax._src import modes
from normjax._src import state_types


class Transform(NamedTuple):
  """A normalization as pure functions, in the style of optax's `GradientTransformation`.

  Attributes:
    init: `init(x) -> (params, state)`; `x` may be an array or a `jax.ShapeDtypeStruct`.
    apply: `apply(params, state, x, *, training, mask=None) -> (y, new_state)`; `training` is
      keyword-only and has no default.
  """

  init: Callable[..., Any]
  apply: Callable[..., Any]


@state_types.registered_state
class EmptyState(NamedTuple):
  """The state of a stateless normalization (layer, group, instance, RMS norm)."""


def check_training_flag(training) -> bool:
  """Returns `training` as a Python bool; raises TypeError unless it is a Python or NumPy bool."""
  return modes.training_flag(training)
