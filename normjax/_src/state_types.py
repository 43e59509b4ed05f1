"""State NamedTuples that JAX flattens by registry lookup: a cheaper call into a jitted function.

Every call of a jitted function flattens its arguments. jaxlib finds a `dict`, `tuple` or registered
type by one lookup of its exact type, but recognizes a NamedTuple only by probing it for a `_fields`
attribute, a generic Python attribute lookup on every call. With the CPU caches flushed before each
call, as `benchmarks/op_batch_norm.py` times, that probe cost about 7 µs per state argument on the
2-core AMD EPYC VM (`benchmarks/dispatch.py`; jax 0.10.2): the 1-3 % by which the evaluation rows,
whose compiled program is flax.linen's own, trailed flax. Registered, they sit at the benchmark's
A/A level (BENCHMARKS.md).

`registered_state` registers a state NamedTuple with `jax.tree_util.register_dataclass`, its fields as
data fields. Nothing else changes: the state is still a NamedTuple (a tuple, `_replace`, positional
unpacking), JAX flattens it to the same leaves in the same order, key paths still name the fields
(`.mean`, `.var`, ...), and unflattening rebuilds the same class. Only the tree's node kind, as
`repr(jax.tree_util.tree_structure(state))` prints it, reads as a custom node. Serialization by flax
(`flax.serialization`) and Orbax goes by the NamedTuple itself or by key paths, both unchanged.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from typing import NamedTuple
  >>> from normjax._src.state_types import registered_state
  >>> @registered_state
  ... class Moments(NamedTuple):
  ...   mean: jax.Array  # f32[C]
  ...   var: jax.Array  # f32[C]
  >>> state = Moments(jnp.zeros(2), jnp.ones(2))
  >>> [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  ['.mean', '.var']
  >>> jax.tree_util.tree_map(lambda v: v + 1, state)._replace(var=None).mean
  Array([1., 1.], dtype=float32)
"""

from typing import Type, TypeVar

import jax

State = TypeVar("State")


def registered_state(cls: Type[State]) -> Type[State]:
  """Registers the NamedTuple class `cls` as a JAX pytree of its fields, in order; returns `cls`.

  Args:
    cls: a `typing.NamedTuple` subclass whose fields are all array leaves (or subtrees).

  Raises:
    TypeError: `cls` is not a NamedTuple class.
  """
  if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
    raise TypeError(f"registered_state expects a NamedTuple class; got {cls!r}")
  return jax.tree_util.register_dataclass(cls, data_fields=list(cls._fields), meta_fields=[])
