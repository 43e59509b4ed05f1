"""normjax._src.virtual_batch_norm: reference-batch virtual BN (Salimans et al. 2016, arXiv:1606.03498,
§3.4) against float64 statistics of the union reference ∪ {example}, with masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax._src import virtual_batch_norm as vbn_lib
from tests import helpers
from tests import references as ref

EPS = 1e-5


def _params(channels, seed=3):
  rng = np.random.default_rng(seed)
  return {
    "scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=channels), jnp.float32),
  }


def _union_reference(reference, example, scale, bias, *, reference_mask=None, example_mask=None):
  """float64: the example normalized with the biased mean / variance of the valid elements of
  reference ∪ {example}, per feature (last axis)."""
  c = reference.shape[-1]
  ref_rows = np.asarray(reference, np.float64).reshape(-1, c)
  ex_rows = np.asarray(example, np.float64).reshape(-1, c)
  if reference_mask is not None:
    ref_rows = ref_rows[np.broadcast_to(reference_mask, reference.shape).reshape(-1, c)[:, 0]]
  keep = (
    ex_rows
    if example_mask is None
    else ex_rows[np.broadcast_to(example_mask, example.shape).reshape(-1, c)[:, 0]]
  )
  pooled = np.concatenate([ref_rows, keep])
  mean, var = pooled.mean(0), pooled.var(0)
  y = (np.asarray(example, np.float64) - mean) / np.sqrt(var + EPS)
  return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64), mean, var


def test_init_keeps_the_reference_statistics_in_float32():
  reference = helpers.normal_data((32, 3, 3, 2), mean=1.0, std=2.0)
  params, state = normjax.virtual_batch_norm().init(reference)
  assert isinstance(state, normjax.VirtualBatchNormState)
  assert all(v.dtype == jnp.float32 and v.shape == (2,) for v in state)
  r64 = reference.astype(np.float64)
  np.testing.assert_allclose(state.mean, r64.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(state.var, r64.var((0, 1, 2)), rtol=1e-5)
  np.testing.assert_array_equal(state.count, [32 * 9, 32 * 9])
  np.testing.assert_array_equal(params["scale"], [1.0, 1.0])
  np.testing.assert_array_equal(params["bias"], [0.0, 0.0])


def test_each_example_uses_the_union_of_reference_and_example():
  reference = helpers.normal_data((32, 3, 3, 2), mean=1.0, std=2.0)
  x = helpers.normal_data((5, 3, 3, 2), mean=2.0, seed=7)
  vbn = normjax.virtual_batch_norm()
  _, state = vbn.init(reference)
  params = _params(2)
  y, same = vbn.apply(params, state, x, training=True)
  assert same is state  # the state never changes
  y_eval, _ = vbn.apply(params, state, x, training=False)
  np.testing.assert_allclose(y, y_eval)  # training and evaluation compute the same thing
  for i in range(5):  # each example normalized with the statistics of reference ∪ {example}
    pooled = np.concatenate([reference, x[i : i + 1]]).astype(np.float64)
    want, _, _ = ref.batch_norm_train(
      pooled,
      (0, 1, 2),
      np.asarray(params["scale"], np.float64),
      np.asarray(params["bias"], np.float64),
      EPS,
    )
    np.testing.assert_allclose(y[i], want[-1], rtol=1e-4, atol=1e-5)
  # an example's output does not depend on the rest of its batch
  np.testing.assert_allclose(vbn.apply(params, state, x[:1], training=True)[0], y[:1], rtol=1e-6)
  np.testing.assert_allclose(
    vbn.apply(params, state, x[::-1], training=True)[0], y[::-1], rtol=1e-6
  )


def test_dense_layer_weights_the_example_one_over_b_plus_one():
  """Salimans et al.: with one element per example, the statistics are those of the B reference rows
  plus the example, i.e. weights B/(B+1) for the reference and 1/(B+1) for the example."""
  b = 16
  reference = helpers.normal_data((b, 4), mean=-1.0, std=0.5, seed=2)
  x = helpers.normal_data(
    (3, 4), mean=4.0, std=3.0, seed=3
  )  # far from the reference: the term matters
  vbn = normjax.virtual_batch_norm()
  _, state = vbn.init(reference)
  params = _params(4, seed=5)
  y, _ = jax.jit(lambda s, x: vbn.apply(params, s, x, training=False))(state, x)
  r64 = reference.astype(np.float64)
  for i in range(3):
    xi = x[i].astype(np.float64)
    mean = b / (b + 1) * r64.mean(0) + xi / (b + 1)
    var = (b / (b + 1) * (r64**2).mean(0) + xi**2 / (b + 1)) - mean**2
    want = (xi - mean) / np.sqrt(var + EPS) * np.asarray(params["scale"]) + np.asarray(
      params["bias"]
    )
    np.testing.assert_allclose(y[i], want, rtol=1e-5, atol=1e-5)
    # and plain BN with the reference statistics alone would differ clearly
    alone = (xi - r64.mean(0)) / np.sqrt(r64.var(0) + EPS)
    assert (
      np.abs(alone * np.asarray(params["scale"]) + np.asarray(params["bias"]) - want).max() > 0.5
    )


def test_a_reference_mask_drops_rows_from_the_reference_statistics():
  reference = helpers.normal_data((12, 4, 3), mean=1.0, std=2.0, seed=1)
  reference_mask = np.arange(12) < 7  # 1-D: one flag per example
  vbn = normjax.virtual_batch_norm()
  _, state = vbn.init(reference, mask=jnp.asarray(reference_mask))
  np.testing.assert_array_equal(state.count, [7 * 4] * 3)
  np.testing.assert_allclose(state.mean, reference[:7].astype(np.float64).mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(state.var, reference[:7].astype(np.float64).var((0, 1)), rtol=1e-5)
  _, unmasked = vbn.init(reference[:7])
  for a, b in zip(state, unmasked):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_an_apply_mask_drops_elements_from_the_example_statistics():
  reference = helpers.normal_data((10, 6, 3), mean=0.5, std=1.5, seed=11)
  x = helpers.normal_data((4, 6, 3), mean=3.0, std=2.0, seed=12)
  mask = np.random.default_rng(13).random((4, 6, 1)) < 0.6
  mask[:, 0] = True  # at least one valid element per example
  vbn = normjax.virtual_batch_norm()
  _, state = vbn.init(reference)
  params = _params(3)
  y, _ = vbn.apply(params, state, x, training=True, mask=jnp.asarray(mask))
  y_full, _ = vbn.apply(params, state, x, training=True)
  for i in range(4):
    want, _, _ = _union_reference(
      reference, x[i : i + 1], params["scale"], params["bias"], example_mask=mask[i : i + 1]
    )
    np.testing.assert_allclose(y[i], want[0], rtol=1e-4, atol=1e-5)  # masked elements still output
  assert np.abs(np.asarray(y) - np.asarray(y_full)).max() > 1e-3  # the mask changed the statistics


def test_a_fully_masked_example_uses_the_reference_statistics_alone():
  reference = helpers.normal_data((10, 5, 2), mean=0.5, seed=21)
  x = helpers.normal_data((2, 5, 2), mean=-2.0, seed=22)
  vbn = normjax.virtual_batch_norm()
  _, state = vbn.init(reference)
  params = _params(2)
  mask = np.array([False, True])
  y, _ = vbn.apply(params, state, x, training=True, mask=jnp.asarray(mask))
  r64 = reference.astype(np.float64)
  want = (x[0] - r64.mean((0, 1))) / np.sqrt(r64.var((0, 1)) + EPS) * np.asarray(
    params["scale"]
  ) + np.asarray(params["bias"])
  np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(y)).all()


def test_half_precision_input_keeps_float32_state_and_its_dtype():
  reference = jnp.asarray(helpers.normal_data((32, 4), mean=50.0, std=2.0), jnp.bfloat16)
  x = jnp.asarray(helpers.normal_data((3, 4), mean=50.0, std=2.0, seed=4), jnp.bfloat16)
  vbn = normjax.virtual_batch_norm()
  params, state = vbn.init(reference)
  assert all(v.dtype == jnp.float32 for v in state)
  y, _ = vbn.apply(params, state, x, training=True)
  assert y.dtype == jnp.bfloat16
  for i in range(3):
    want, _, _ = _union_reference(
      np.asarray(reference.astype(jnp.float32)),
      np.asarray(x[i : i + 1].astype(jnp.float32)),
      1.0,
      0.0,
    )
    np.testing.assert_allclose(np.asarray(y[i], np.float32), want[0], atol=0.03)
  y32, _ = normjax.virtual_batch_norm(dtype=jnp.float32).apply(params, state, x, training=True)
  assert y32.dtype == jnp.float32


def test_feature_axes_other_than_last():
  reference = helpers.normal_data((8, 3, 5), mean=1.0, seed=31)  # features on axis 1
  x = helpers.normal_data((2, 3, 5), seed=32)
  vbn = normjax.virtual_batch_norm(axis=1, use_scale=False, use_bias=False)
  params, state = vbn.init(reference)
  assert params == {} and state.mean.shape == (3,)
  y, _ = vbn.apply(params, state, x, training=True)
  moved_ref, moved_x = np.moveaxis(reference, 1, -1), np.moveaxis(x, 1, -1)
  for i in range(2):
    want, _, _ = _union_reference(moved_ref, moved_x[i : i + 1], 1.0, 0.0)
    np.testing.assert_allclose(
      np.moveaxis(np.asarray(y[i : i + 1]), 1, -1), want, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
  "options, error, match",
  [
    (dict(epsilon=0.0), ValueError, r"epsilon=0.0 must be a positive number"),
    (dict(stats_method="naive"), ValueError, r"stats_method='naive' must be one of"),
  ],
)
def test_bad_options_raise_at_construction(options, error, match):
  with pytest.raises(error, match=match):
    normjax.virtual_batch_norm(**options)
  with pytest.raises(error, match=match):
    vbn_lib.VirtualBatchNormConfig(**options)


def test_state_that_does_not_match_x_raises():
  vbn = normjax.virtual_batch_norm()
  params, state = vbn.init(jnp.ones((4, 3)) + jnp.arange(3.0))
  with pytest.raises(
    ValueError, match=r"scale has shape \(3,\) and dtype float32; expected shape \(5,\)"
  ):
    vbn.apply(params, state, jnp.ones((2, 5)), training=True)
  with pytest.raises(
    ValueError, match=r"mean has shape \(3,\) and dtype float32; expected shape \(5,\)"
  ):
    vbn.apply(_params(5), state, jnp.ones((2, 5)), training=True)
  with pytest.raises(TypeError, match="training=None"):
    vbn.apply(params, state, jnp.ones((2, 3)), training=None)
