"""Running statistics that one batch cannot poison: non-finite batches, features with no valid element,
the step count, the opt-in `check_finite`, and the mask shapes every layer accepts."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 reads it once, at its first import

import jax
from jax.experimental import checkify
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import normjax
from normjax._src import running
from tests import helpers


def _data(shape, seed=0, mean=1.0, std=2.0):  # this module's data default to N(1, 2²)
  return helpers.normal_data(shape, mean=mean, std=std, seed=seed)


def _state(channels):
  return normjax.BatchNormState(
    jnp.linspace(-1.0, 1.0, channels), jnp.linspace(0.5, 2.0, channels), jnp.array(3, jnp.int32)
  )


def _step(bn, state, x, mask=None):
  params, _ = bn.init(x)
  return bn.apply(params, state, x, training=True, mask=mask)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
  "options",
  [
    {},
    {"renorm": True},
    {"ghost_batch_size": 4},
    {"momentum": None},
    {"debias": True, "momentum": 0.9},
    {"unbiased_running_var": True},
  ],
)
def test_a_non_finite_element_leaves_its_features_running_statistics(bad, options):
  x = _data((8, 3))
  x[5, 1] = bad
  bn = normjax.batch_norm(**options)
  state = _state(3)
  y, new_state = jax.jit(lambda s, x: _step(bn, s, x))(state, x)
  y, new_state, state = (
    np.asarray(y),
    jax.tree_util.tree_map(np.asarray, new_state),
    jax.tree_util.tree_map(np.asarray, state),
  )
  # the poisoned feature keeps its previous running values exactly ...
  assert float(new_state.mean[1]) == float(state.mean[1])
  assert float(new_state.var[1]) == float(state.var[1])
  # ... its output shows the problem (the loss reveals it), the other features are untouched by it
  assert not np.isfinite(y[:, 1]).all()
  assert np.isfinite(y[:, [0, 2]]).all()
  clean = x.copy()
  clean[:, 1] = 0.0
  _, clean_state = _step(bn, jax.tree_util.tree_map(jnp.asarray, state), clean)
  clean_state = jax.tree_util.tree_map(np.asarray, clean_state)
  np.testing.assert_allclose(new_state.mean[[0, 2]], clean_state.mean[[0, 2]], rtol=1e-6)
  np.testing.assert_allclose(new_state.var[[0, 2]], clean_state.var[[0, 2]], rtol=1e-6)
  assert not np.allclose(new_state.mean[[0, 2]], state.mean[[0, 2]])
  assert int(new_state.count) == 4  # other features were updated


def _nan_batch():
  x = _data((8, 3))
  x[5, 1] = np.nan
  return x


def test_peers_running_statistics_stay_nan_after_one_nan_element():
  """What the README contrasts: flax, Haiku and Keras have no guard; normjax keeps feature 1's values."""
  x, results = _nan_batch(), {}
  flax_nn = pytest.importorskip("flax.linen")
  layer = flax_nn.BatchNorm(use_running_average=False, momentum=0.9)
  variables = layer.init(jax.random.key(0), x)
  _, updates = layer.apply(variables, x, mutable=["batch_stats"])
  results["flax"] = updates["batch_stats"]["mean"], updates["batch_stats"]["var"]
  try:
    import haiku as hk  # pylint: disable=import-outside-toplevel
  except ImportError:
    hk = None
  if hk is not None:
    f = hk.transform_with_state(
      lambda x: hk.BatchNorm(True, True, decay_rate=0.9)(x, is_training=True)
    )
    params, state = f.init(jax.random.key(0), x)
    _, state = f.apply(params, state, None, x)
    results["haiku"] = (
      state["batch_norm/~/mean_ema"]["average"],
      state["batch_norm/~/var_ema"]["average"],
    )
  try:
    import keras  # pylint: disable=import-outside-toplevel
  except ImportError:
    keras = None
  if keras is not None:
    keras_layer = keras.layers.BatchNormalization(momentum=0.9)
    keras_layer(x, training=True)
    results["keras"] = keras_layer.moving_mean.value, keras_layer.moving_variance.value
  for name, (mean, var) in results.items():
    mean, var = np.ravel(mean), np.ravel(var)
    assert np.isnan(mean[1]) and np.isnan(var[1]), name
    assert np.isfinite(mean[[0, 2]]).all(), name
  bn = normjax.batch_norm(momentum=0.9)
  _, state = _step(bn, bn.init(x)[1], x)
  np.testing.assert_array_equal(np.asarray(state.mean)[1], 0.0)
  np.testing.assert_array_equal(np.asarray(state.var)[1], 1.0)


def test_an_all_non_finite_batch_leaves_the_whole_state_and_count():
  x = np.full((6, 2), np.nan, np.float32)
  bn = normjax.batch_norm()
  state = _state(2)
  _, new_state = _step(bn, state, x)
  for new, old in zip(new_state, state):
    np.testing.assert_array_equal(new, old)


def test_a_nan_in_one_feature_is_not_forever():
  """Before: one NaN element made that running mean NaN for good. Now the next batches update it."""
  bn = normjax.batch_norm(momentum=0.5)
  state = _state(2)
  x = _data((8, 2))
  x[0, 0] = np.nan
  _, state = _step(bn, state, x)
  for seed in (1, 2):
    _, state = _step(bn, state, _data((8, 2), seed=seed))
  assert np.isfinite(np.asarray(state.mean)).all() and np.isfinite(np.asarray(state.var)).all()
  # feature 0 moved twice from -1 (its value before the NaN batch), feature 1 three times from 1
  batch_means = [_data((8, 2), seed=s).astype(np.float64).mean(0) for s in (1, 2)]
  np.testing.assert_allclose(
    state.mean[0], 0.25 * -1.0 + 0.25 * batch_means[0][0] + 0.5 * batch_means[1][0], rtol=1e-5
  )
  assert int(state.count) == 6


@pytest.mark.parametrize(
  "options", [{}, {"renorm": True}, {"ghost_batch_size": 2}, {"momentum": None}]
)
def test_an_all_false_mask_changes_nothing(options):
  x = _data((6, 3))
  bn = normjax.batch_norm(**options)
  state = _state(3)
  y, new_state = _step(bn, state, x, mask=jnp.zeros((6, 1), bool))
  for new, old in zip(new_state, state):
    np.testing.assert_array_equal(new, old)  # count included: no element was valid
  assert np.isfinite(np.asarray(y)).all()


def test_a_feature_with_no_valid_element_keeps_its_statistics_others_update():
  x = _data((6, 3))
  mask = np.ones((1, 3), bool)
  mask[0, 2] = False  # feature 2 masked out everywhere
  bn = normjax.batch_norm(momentum=0.75)
  state = _state(3)
  _, new_state = _step(bn, state, x, mask=jnp.asarray(mask))
  x64 = x.astype(np.float64)
  old_mean = np.asarray(state.mean[:2])
  np.testing.assert_allclose(
    new_state.mean[:2], 0.75 * old_mean + 0.25 * x64[:, :2].mean(0), rtol=1e-5
  )
  np.testing.assert_allclose(
    new_state.var[:2], 0.75 * np.asarray(state.var[:2]) + 0.25 * x64[:, :2].var(0), rtol=1e-5
  )
  assert float(new_state.mean[2]) == float(state.mean[2]) and float(new_state.var[2]) == float(
    state.var[2]
  )
  assert int(new_state.count) == 4


def test_a_non_finite_batch_on_one_device_is_skipped_on_every_device():
  devices = jax.devices()[:8]
  if len(devices) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py)")
  mesh = jax.make_mesh((8,), ("batch",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  x = _data((16, 2))
  x[3, 0] = np.nan  # on device 1
  bn = normjax.batch_norm(axis_name="batch", momentum=0.5)
  params, _ = bn.init(x[:2])
  state = _state(2)
  fn = jax.jit(
    jax.shard_map(
      lambda x: bn.apply(params, state, x, training=True)[1],
      mesh=mesh,
      in_specs=P("batch"),
      out_specs=P(),
    )
  )
  new_state = fn(jnp.asarray(x))
  assert float(new_state.mean[0]) == float(state.mean[0])
  want = 0.5 * float(state.mean[1]) + 0.5 * x[:, 1].astype(np.float64).mean()
  np.testing.assert_allclose(new_state.mean[1], want, rtol=1e-5)


def test_check_finite_stops_a_checkified_step_and_names_the_features():
  bn = normjax.batch_norm(check_finite=True)
  x = _data((8, 4))
  params, state = bn.init(x)
  step = jax.jit(checkify.checkify(lambda s, x: bn.apply(params, s, x, training=True)))
  err, (y, new_state) = step(state, x)
  assert err.get() is None
  bad = x.copy()
  bad[2, 1], bad[0, 3] = np.nan, np.inf
  err, (y, new_state) = step(state, bad)
  assert err.get() is not None
  assert "batch statistics of 2 feature(s) are not finite" in err.get()
  assert "first at flat feature index 1" in err.get()
  with pytest.raises(Exception, match="not finite"):
    err.throw()
  np.testing.assert_array_equal(np.asarray(new_state.mean)[[1, 3]], np.asarray(state.mean)[[1, 3]])
  # a fully masked feature has no statistics to check
  mask = jnp.asarray(np.array([[True, False, True, True]]))
  masked = x.copy()
  masked[:, 1] = np.nan
  masked_step = jax.jit(
    checkify.checkify(lambda s, x, m: bn.apply(params, s, x, training=True, mask=m))
  )
  err, _ = masked_step(state, masked, mask)
  assert err.get() is None
  # evaluation never checks; without check_finite no check is staged (plain jit works)
  y, _ = bn.apply(params, state, bad, training=False)
  plain = normjax.batch_norm()
  jax.jit(lambda s, x: plain.apply(params, s, x, training=True))(state, bad)


def test_check_finite_must_be_a_bool():
  with pytest.raises(TypeError, match="check_finite='yes' must be a bool"):
    normjax.batch_norm(check_finite="yes")


def test_select_finite():
  (mean, var), updated = running.select_finite(
    (jnp.zeros(4), jnp.ones(4)),
    (jnp.array([1.0, jnp.nan, 2.0, 3.0]), jnp.array([4.0, 5.0, jnp.inf, 6.0])),
    jnp.array([True, True, True, False]),
  )
  np.testing.assert_array_equal(mean, [1.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(var, [4.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(updated, [True, False, False, False])


# --- mask shapes: x's rank, or 1-D per example along axis 0; never right-aligned ---------------------


def test_a_1d_mask_is_per_example_even_when_batch_equals_features():
  """(B,) on (B, C) with B == C used to mask features silently; it now masks examples."""
  x = _data((3, 3))
  bn = normjax.batch_norm(momentum=0.0)
  state = _state(3)
  flags = np.array([True, False, True])
  _, per_example = _step(bn, state, x, mask=jnp.asarray(flags))
  _, explicit = _step(bn, state, x, mask=jnp.asarray(flags[:, None]))
  np.testing.assert_array_equal(per_example.mean, explicit.mean)
  np.testing.assert_allclose(per_example.mean, x[[0, 2]].astype(np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(per_example.var, x[[0, 2]].astype(np.float64).var(0), rtol=1e-5)


def test_a_1d_mask_on_a_4d_input_and_in_moments_and_feature_norms():
  x = _data((4, 2, 2, 3))
  flags = np.array([True, True, False, True])
  mean, var = normjax.moments(jnp.asarray(x), (0, 1, 2), mask=jnp.asarray(flags))
  np.testing.assert_allclose(mean, x[flags].astype(np.float64).mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(var, x[flags].astype(np.float64).var((0, 1, 2)), rtol=1e-5)
  ln = normjax.layer_norm(use_scale=False, use_bias=False)
  y, _ = ln.apply({}, normjax.EmptyState(), jnp.asarray(x), training=False, mask=jnp.asarray(flags))
  y_all, _ = ln.apply({}, normjax.EmptyState(), jnp.asarray(x), training=False)
  # the same valid data; the sums differ in float32 rounding only (CPU: masked sums multiply by 0/1)
  np.testing.assert_allclose(np.asarray(y)[flags], np.asarray(y_all)[flags], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "mask_shape, match",
  [
    (
      (3,),
      r"mask of shape \(3,\) does not broadcast to x of shape \(4, 3\): a 1-D mask is one flag per "
      r"example along axis 0 and needs shape \(4,\)",
    ),
    ((2, 3), r"mask of shape \(2, 3\) does not broadcast to x of shape \(4, 3\): each dimension"),
    (
      (4, 1, 3),
      r"mask of shape \(4, 1, 3\) does not broadcast to x of shape \(4, 3\): a mask needs x's "
      r"rank 2",
    ),
  ],
)
def test_a_mask_of_another_shape_raises_naming_both(mask_shape, match):
  bn = normjax.batch_norm()
  x = jnp.ones((4, 3))
  params, state = bn.init(x)
  with pytest.raises(ValueError, match=match):
    bn.apply(params, state, x, training=True, mask=jnp.ones(mask_shape, bool))


def test_a_lower_rank_mask_is_not_right_aligned():
  x = jnp.ones((4, 2, 3))
  with pytest.raises(ValueError, match=r"mask of shape \(2, 3\) .* needs x's rank 3"):
    normjax.moments(x, (0, 1), mask=jnp.ones((2, 3), bool))


@pytest.mark.parametrize(
  "momentum, debias, count, want",
  [
    (0.99, False, 0, 5.0),  # a fresh layer (or flax variables without a count): the stored value
    (0.99, False, 1, 500.0),  # one update of an EMA started at 0: that batch's mean, 5 / (1 - 0.99)
    (0.9, False, 3, 5.0 / (1 - 0.9**3)),
    (0.0, False, 7, 5.0),
    (0.99, True, 1, 5.0),  # stored debiased already
    (None, False, 4, 5.0),  # cumulative average: unbiased
  ],
)
def test_shift_estimate_debiases_the_plain_ema(momentum, debias, count, want):
  got = running.shift_estimate(
    jnp.asarray(5.0), jnp.asarray(count), momentum=momentum, debias=debias
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_running_shift_follows_the_data_from_the_second_step():
  """After one update the shift is the first batch's mean, so a far-from-zero input is accurate."""
  x = _data((64, 4), mean=1e4)
  bn = normjax.batch_norm(momentum=0.99)
  params, state = bn.init(x)
  state = bn.apply(params, state, jnp.asarray(x), training=True)[1]
  shift = running.shift_estimate(state.mean, state.count, momentum=0.99, debias=False)
  # float32 rounding of the stored 0.01·mean, divided by 0.01; a shift only needs to be within a few std
  np.testing.assert_allclose(shift, x.astype(np.float64).mean(0), rtol=1e-5)
