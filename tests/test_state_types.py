"""State NamedTuples registered with JAX by field (`normjax/_src/state_types.py`)."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

import normjax
from normjax._src import state_types
from normjax._src.virtual_batch_norm import VirtualBatchNormState
from normjax._src.weights import SpectralNormState

STATE_CLASSES = [
  normjax.BatchNormState,
  VirtualBatchNormState,
  SpectralNormState,
  normjax.EmptyState,
]


def _instance(cls):
  return cls(*[jnp.full((2,), float(i)) for i in range(len(cls._fields))])


@pytest.mark.parametrize("cls", STATE_CLASSES, ids=lambda c: c.__name__)
def test_state_is_found_by_type_in_jaxs_registry(cls):
  state = _instance(cls)
  # A NamedTuple that JAX recognizes by probing `_fields` prints as `BatchNormState(mean=*, ...)`;
  # a registered type prints as a custom node.
  assert repr(jax.tree_util.tree_structure(state)).startswith(
    f"PyTreeDef(CustomNode({cls.__name__}"
  )


@pytest.mark.parametrize("cls", STATE_CLASSES, ids=lambda c: c.__name__)
def test_state_flattens_like_its_namedtuple(cls):
  state = _instance(cls)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  assert all(a is b for a, b in zip(leaves, state, strict=True))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert paths == [f".{name}" for name in cls._fields]
  rebuilt = jax.tree_util.tree_unflatten(treedef, [leaf + 1 for leaf in leaves])
  assert type(rebuilt) is cls and isinstance(rebuilt, tuple)
  for field, before, after in zip(cls._fields, state, rebuilt, strict=True):
    assert float(getattr(rebuilt, field)[0]) == float(before[0]) + 1 == float(after[0])


def test_batch_norm_state_keeps_its_type_and_compilation_through_jit():
  bn = normjax.batch_norm(momentum=0.9)
  x = jax.random.normal(jax.random.key(0), (8, 3)) * 2.0 + 1.0
  params, state = bn.init(x)
  traces = []

  @jax.jit
  def step(p, s, x):
    traces.append(jax.tree_util.tree_structure(s))
    return bn.apply(p, s, x, training=True)

  _, state1 = step(params, state, x)
  _, state2 = step(params, state1, x)
  assert type(state1) is type(state2) is normjax.BatchNormState
  assert len(traces) == 1  # the updated state has the structure of the first: no second trace
  assert int(state2.count) == 2
  mean = jnp.mean(x, axis=0)
  assert jnp.allclose(state2.mean, 0.19 * mean, rtol=1e-5)  # 0.9·(0.1·μ) + 0.1·μ
  assert state2._replace(count=jnp.int32(7)).count == 7


def test_a_class_that_is_not_a_namedtuple_is_refused_by_name():
  @dataclasses.dataclass
  class NotATuple:
    mean: jax.Array

  class PlainTuple(tuple):
    pass

  for cls in (NotATuple, PlainTuple, NotATuple(jnp.zeros(1))):
    with pytest.raises(
      TypeError, match=r"expects a NamedTuple class; got .*(NotATuple|PlainTuple)"
    ):
      state_types.registered_state(cls)


def test_registering_leaves_the_class_a_namedtuple():
  @state_types.registered_state
  class Pair(NamedTuple):
    a: jax.Array
    b: jax.Array

  pair = Pair(jnp.ones(1), jnp.zeros(1))
  a, b = pair
  assert Pair._fields == ("a", "b") and a is pair.a and b is pair.b
  doubled = jax.tree_util.tree_map(lambda v: 2 * v, pair)
  assert type(doubled) is Pair and float(doubled.a[0]) == 2.0
