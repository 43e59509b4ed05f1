"""Ghost batches: `ghost_grouping="consecutive"` (Hoffer et al. 2017) and `"strided"` (tf-keras
`virtual_batch_size`), against hand-computed numbers and a float64 transcription of tf-keras' algorithm."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import normjax
from tests import references as ref


def _uniform(shape, seed):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_hand_computed_groups():
  """x = 0..7, ghost_batch_size 2: strided pairs rows {j, j + 4}, consecutive pairs {2j, 2j + 1}."""
  eps = 1e-3
  x = jnp.arange(8.0).reshape(8, 1)
  strided = normjax.batch_norm(
    ghost_batch_size=2, ghost_grouping="strided", momentum=0.0, epsilon=eps
  )
  consecutive = normjax.batch_norm(ghost_batch_size=2, momentum=0.0, epsilon=eps)
  params, state = strided.init(x)
  y, s = strided.apply(params, state, x, training=True)
  # each strided pair is {j, j + 4}: mean j + 2, variance 4, so y = ∓2 / sqrt(4 + ε)
  np.testing.assert_allclose(y[:, 0], np.repeat([-1.0, 1.0], 4) * 2 / np.sqrt(4 + eps), rtol=1e-6)
  np.testing.assert_allclose(s.mean, [3.5]), np.testing.assert_allclose(s.var, [4.0])
  y, s = consecutive.apply(params, state, x, training=True)
  # each consecutive pair is {2j, 2j + 1}: variance 1/4, so y = ∓0.5 / sqrt(0.25 + ε)
  np.testing.assert_allclose(
    y[:, 0], np.tile([-1.0, 1.0], 4) * 0.5 / np.sqrt(0.25 + eps), rtol=1e-6
  )
  np.testing.assert_allclose(s.mean, [3.5]), np.testing.assert_allclose(s.var, [0.25])


@pytest.mark.parametrize(
  "shape, axis, virtual_batch_size",
  [
    ((6, 2), -1, 3),  # tf-keras testGhostBN2Dims
    ((6, 10, 10, 3), 3, 2),  # testGhostBN4DimsAxis3
    ((6, 3, 10, 10), 1, 2),  # testGhostBN4DimsAxis1
  ],
)
def test_strided_matches_tf_keras_virtual_batch_size(shape, axis, virtual_batch_size):
  """tf-keras reshapes to [virtual_batch_size, n / virtual_batch_size, ...], normalizes over the first axis
  and moves the moving statistics by the plain mean of the groups' moments; five steps as its tests."""
  gamma, beta, momentum, eps = 3.0, 2.0, 0.8, 1e-3
  feature_axes = (axis % len(shape),)
  channels = shape[feature_axes[0]]
  bn = normjax.batch_norm(
    axis=axis,
    momentum=momentum,
    epsilon=eps,
    ghost_batch_size=virtual_batch_size,
    ghost_grouping="strided",
  )
  params, state = bn.init(jnp.zeros(shape))
  params = {"scale": jnp.full(channels, gamma), "bias": jnp.full(channels, beta)}
  train = jax.jit(lambda s, x: bn.apply(params, s, x, training=True))
  evaluate = jax.jit(lambda s, x: bn.apply(params, s, x, training=False)[0])
  moving_mean, moving_var = np.zeros(channels), np.ones(channels)
  bshape = tuple(channels if a in feature_axes else 1 for a in range(len(shape)))
  for step in range(5):
    x = _uniform(shape, seed=step)
    want_y, means, variances = ref.ghost_batch_norm_train(
      x, virtual_batch_size, "strided", feature_axes, gamma, beta, eps
    )
    moving_mean = momentum * moving_mean + (1 - momentum) * means.mean(0)
    moving_var = momentum * moving_var + (1 - momentum) * variances.mean(0)
    y, state = train(state, x)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, moving_mean, rtol=1e-5)
    np.testing.assert_allclose(state.var, moving_var, rtol=1e-5)
    want_test = (x - moving_mean.reshape(bshape)) / np.sqrt(
      moving_var.reshape(bshape) + eps
    ) * gamma + beta
    np.testing.assert_allclose(evaluate(state, x), want_test, rtol=1e-5, atol=1e-5)
  # the grouping matters: consecutive groups give other outputs on the same batch
  other, _, _ = ref.ghost_batch_norm_train(
    x, virtual_batch_size, "consecutive", feature_axes, gamma, beta, eps
  )
  assert np.abs(other - want_y).max() > 1e-2


def _permutation(n, g):
  """Rows in strided-group order: consecutive grouping of x[perm] is strided grouping of x."""
  return np.concatenate(ref.ghost_groups(n, g, "strided"))


@pytest.mark.parametrize("with_mask", [False, True])
def test_strided_equals_consecutive_on_regrouped_rows_values_and_gradients(with_mask):
  n, g = 12, 3
  rng = np.random.default_rng(0)
  x = (2.0 + 3.0 * rng.standard_normal((n, 2, 4))).astype(np.float32)
  dy = rng.standard_normal(x.shape).astype(np.float32)
  mask = None
  if with_mask:
    mask = np.ones((n, 1, 1), bool)
    mask[[0, 5, 7]] = False
  perm = _permutation(n, g)
  strided = normjax.batch_norm(ghost_batch_size=g, ghost_grouping="strided", momentum=0.5)
  consecutive = normjax.batch_norm(ghost_batch_size=g, momentum=0.5)
  params, state = strided.init(x)
  params = {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-1.0, 1.0, 4)}

  def run(bn, x, dy, mask):
    f = lambda p, x: bn.apply(
      p, state, x, training=True, mask=None if mask is None else jnp.asarray(mask)
    )
    (y, new_state), pullback = jax.vjp(f, params, jnp.asarray(x))
    dparams, dx = pullback((jnp.asarray(dy), jax.tree_util.tree_map(jnp.zeros_like, new_state)))
    return y, new_state, dx, dparams

  y1, s1, dx1, dp1 = run(strided, x, dy, mask)
  y2, s2, dx2, dp2 = run(consecutive, x[perm], dy[perm], None if mask is None else mask[perm])
  inverse = np.argsort(perm)
  np.testing.assert_allclose(y1, np.asarray(y2)[inverse], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx1, np.asarray(dx2)[inverse], rtol=1e-5, atol=1e-6)
  for k in params:
    np.testing.assert_allclose(dp1[k], dp2[k], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s1.mean, s2.mean, rtol=1e-6)
  np.testing.assert_allclose(s1.var, s2.var, rtol=1e-6)


def test_strided_with_mask_uses_count_weighted_group_statistics():
  n, g, eps = 8, 4, 1e-5
  rng = np.random.default_rng(1)
  x = (1.0 + 2.0 * rng.standard_normal((n, 3))).astype(np.float32)
  mask = np.ones(n, bool)
  mask[[1, 3, 5]] = False  # 1-D: one flag per example
  bn = normjax.batch_norm(
    ghost_batch_size=g,
    ghost_grouping="strided",
    momentum=0.0,
    epsilon=eps,
    use_scale=False,
    use_bias=False,
  )
  params, state = bn.init(x)
  y, s = bn.apply(params, state, x, training=True, mask=jnp.asarray(mask))
  groups = ref.ghost_groups(n, g, "strided")
  np.testing.assert_array_equal(groups, [[0, 2, 4, 6], [1, 3, 5, 7]])
  means, variances, counts = [], [], []
  x64 = x.astype(np.float64)
  for rows in groups:
    valid = rows[mask[rows]]
    mean, var = x64[valid].mean(0), x64[valid].var(0)
    np.testing.assert_allclose(
      np.asarray(y)[valid], (x64[valid] - mean) / np.sqrt(var + eps), rtol=1e-5, atol=1e-5
    )
    means.append(mean), variances.append(var), counts.append(len(valid))
  w = np.array(counts, np.float64)[:, None] / sum(counts)  # 4 and 1 valid rows
  np.testing.assert_allclose(s.mean, (w * np.array(means)).sum(0), rtol=1e-5)
  np.testing.assert_allclose(s.var, (w * np.array(variances)).sum(0), rtol=1e-5, atol=1e-7)


def test_strided_ghost_batches_pool_group_j_of_every_device():
  devices = jax.devices()[:8]
  if len(devices) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py)")
  mesh = jax.make_mesh((8,), ("batch",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  per_device, g = 4, 2
  x = (np.random.default_rng(2).standard_normal((8 * per_device, 3)) + 1.0).astype(np.float32)
  bn = normjax.batch_norm(
    ghost_batch_size=g,
    ghost_grouping="strided",
    axis_name="batch",
    momentum=0.0,
    use_scale=False,
    use_bias=False,
  )
  params, state = bn.init(x[:per_device])
  fn = jax.jit(
    jax.shard_map(
      lambda x: bn.apply(params, state, x, training=True),
      mesh=mesh,
      in_specs=P("batch"),
      out_specs=(P("batch"), P()),
    )
  )
  y, s = fn(jnp.asarray(x))
  x64 = x.astype(np.float64).reshape(8, per_device, 3)
  y = np.asarray(y).reshape(8, per_device, 3)
  means, variances = [], []
  for local_rows in ref.ghost_groups(per_device, g, "strided"):  # {0, 2} and {1, 3} on every device
    pooled = x64[:, local_rows].reshape(-1, 3)
    mean, var = pooled.mean(0), pooled.var(0)
    np.testing.assert_allclose(
      y[:, local_rows], (x64[:, local_rows] - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5
    )
    means.append(mean), variances.append(var)
  np.testing.assert_allclose(s.mean, np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(s.var, np.mean(variances, 0), rtol=1e-5)


def test_bad_grouping_and_indivisible_batch_raise():
  with pytest.raises(
    ValueError, match=r"ghost_grouping='rows' must be one of \('consecutive', 'strided'\)"
  ):
    normjax.batch_norm(ghost_batch_size=2, ghost_grouping="rows")
  bn = normjax.batch_norm(ghost_batch_size=4, ghost_grouping="strided")
  params, state = bn.init(jnp.ones((6, 2)))
  with pytest.raises(
    ValueError, match="ghost_batch_size=4 must divide the batch size 6 along axis 0"
  ):
    bn.apply(params, state, jnp.ones((6, 2)), training=True)
