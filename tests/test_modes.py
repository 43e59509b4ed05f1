"""normjax._src.modes: one resolver for the mode flags of every face, and the same TypeError everywhere."""

import equinox as eqx
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.equinox as nje
import normjax.linen as njl
import normjax.nnx as njn
from normjax._src import modes

_BAD = ["no", "False", 1, 0.0, np.int32(1), jnp.bool_(True), np.array([True])]


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.array(False)])
def test_python_and_numpy_bools_are_accepted(value):
  assert modes.check_flag(value, "training") is bool(value)
  assert modes.check_flag(None, "training") is None


@pytest.mark.parametrize("value", _BAD, ids=repr)
def test_every_face_refuses_a_non_bool_flag_with_the_same_type_error(value):
  x = jnp.ones((4, 3))
  with pytest.raises(TypeError) as expected:
    modes.check_flag(value, "training")
  message = str(expected.value)
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  linen = njl.BatchNorm()
  variables = linen.init(jax.random.key(0), x, training=False)
  nnx_layer = njn.BatchNorm(3, rngs=nnx.Rngs(0))
  eqx_layer, eqx_state = eqx.nn.make_with_state(nje.BatchNorm)(3, "batch")
  faces = {
    "functional": lambda: bn.apply(params, state, x, training=value),
    "linen": lambda: linen.apply(variables, x, training=value, mutable=["batch_stats"]),
    "nnx": lambda: nnx_layer(x, training=value),
    "equinox": lambda: jax.vmap(
      lambda e: eqx_layer(e, eqx_state, inference=value), axis_name="batch"
    )(x),
  }
  for face, call in faces.items():
    with pytest.raises(TypeError) as raised:
      call()
    got = str(raised.value)
    if face == "equinox":  # Equinox's flag is `inference`; the message is the same one, renamed
      assert got == message.replace("training", "inference"), (face, got)
    else:
      assert got == message, (face, got)


def test_linen_merge_refuses_two_sources_even_when_they_agree():
  assert modes.merge_linen(True, None, None) is False
  assert modes.merge_linen(None, False, None) is True
  assert modes.merge_linen(None, None, True) is True
  for args in [(True, True, None), (None, False, True), (False, None, True), (None, None, None)]:
    with pytest.raises(ValueError, match="exactly one of use_running_average"):
      modes.merge_linen(*args)


def test_override_lets_the_call_win_over_the_attribute():
  assert modes.merge_override(True, False, None) is True  # attribute eval, call says train
  assert modes.merge_override(False, None, False) is False
  assert modes.merge_override(True, None, None) is False
  with pytest.raises(ValueError, match="both use_running_average=True and training=True"):
    modes.merge_override(None, True, True)
  with pytest.raises(ValueError, match="no mode given"):
    modes.merge_override(None, None, None)


def test_flax_use_fast_variance_maps_to_stats_method():
  assert modes.stats_method_from_flax(None, "two_pass") == "two_pass"
  assert modes.stats_method_from_flax(True, "shifted") == "fast"
  assert modes.stats_method_from_flax(False, "shifted") == "two_pass"
  with pytest.raises(ValueError, match="give one of them"):
    modes.stats_method_from_flax(True, "two_pass")
