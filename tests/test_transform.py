"""normjax._src.transform: the `Transform(init, apply)` protocol, `EmptyState`, and the `training` flag."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax._src import transform


def test_transform_is_a_named_tuple_of_two_functions():
  init, apply = lambda x: ({}, transform.EmptyState()), lambda p, s, x, *, training: (x, s)
  t = transform.Transform(init, apply)
  assert t._fields == ("init", "apply") and t.init is init and t.apply is apply
  assert normjax.Transform is transform.Transform and normjax.EmptyState is transform.EmptyState
  for factory in (normjax.batch_norm, normjax.layer_norm, normjax.virtual_batch_norm):
    assert isinstance(factory(), transform.Transform)


def test_empty_state_is_an_empty_pytree():
  state = transform.EmptyState()
  assert jax.tree_util.tree_leaves(state) == [] and state == ()
  _, layer_state = normjax.layer_norm().init(jnp.ones((2, 3)))
  assert isinstance(layer_state, transform.EmptyState)


@pytest.mark.parametrize(
  "value, want", [(True, True), (False, False), (np.bool_(True), True), (np.array(False), False)]
)
def test_check_training_flag_accepts_bools(value, want):
  assert transform.check_training_flag(value) is want


def test_check_training_flag_refuses_none_with_both_choices_named():
  with pytest.raises(TypeError, match=r"training=None: pass training=True .* or training=False"):
    transform.check_training_flag(None)


@pytest.mark.parametrize(
  "value, kind",
  [
    ("no", "str"),
    (1, "int"),
    (0.0, "float"),
    (jnp.bool_(True), "ArrayImpl"),
    (np.array([True]), "ndarray"),
  ],
  ids=repr,
)
def test_check_training_flag_refuses_non_bools(value, kind):
  with pytest.raises(
    TypeError,
    match=rf"training=.* must be a Python or NumPy bool .*got a {kind}\. Pass "
    "training=True or training=False",
  ):
    transform.check_training_flag(value)


def test_a_traced_training_flag_is_refused():
  with pytest.raises(TypeError, match=r"training=.* must be a Python or NumPy bool"):
    jax.jit(transform.check_training_flag)(True)
