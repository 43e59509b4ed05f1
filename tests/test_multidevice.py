"""Synchronized BatchNorm on 8 real CPU devices: shard_map, pmap and jit with NamedSharding."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import normjax
from tests import helpers
from tests import references as ref

EPS = 1e-5
pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)"
)


_data = helpers.normal_data


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("batch",))


def _params(c):
  rng = np.random.default_rng(4)
  return {
    "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
  }


def _sharded_step(bn, mapping):
  """(params, state, x, mask, dy) -> (y, new_state, grads of <y, dy> w.r.t. params and x)."""

  def local(params, state, x, mask):
    return bn.apply(params, state, x, training=True, mask=mask)

  if mapping == "shard_map":  # the state comes back per device (it differs between device groups)

    def local_state_per_device(params, state, x, mask):
      y, s = local(params, state, x, mask)
      return y, jax.tree_util.tree_map(lambda v: v[None], s)

    per_device = jax.shard_map(
      local_state_per_device,
      mesh=_mesh(),
      in_specs=(P(), P(), P("batch"), P("batch")),
      out_specs=(P("batch"), P("batch")),
    )

    def mapped(params, state, x, mask):
      y, s = per_device(params, state, x, mask)
      return y, jax.tree_util.tree_map(lambda v: v[0], s)
  else:

    def mapped(params, state, x, mask):
      rep = lambda t: jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (8,) + v.shape), t)
      y, s = jax.pmap(local, axis_name="batch")(
        rep(params),
        rep(state),
        x.reshape((8, -1) + x.shape[1:]),
        mask.reshape((8, -1) + mask.shape[1:]),
      )
      return y.reshape((-1,) + y.shape[2:]), jax.tree_util.tree_map(lambda v: v[0], s)

  def run(params, state, x, mask, dy):
    (y, s), pullback = jax.vjp(lambda p, x: mapped(p, state, x, mask), params, x)
    dparams, dx = pullback((dy, jax.tree_util.tree_map(jnp.zeros_like, s)))
    return y, s, dparams, dx

  return run


def _global_reference(x, dy, mask, params, groups):
  """float64 BN of each group's concatenated valid data: y, dx, dscale, dbias, mean, var."""
  scale, bias = (np.asarray(params[k], np.float64) for k in ("scale", "bias"))
  y, dx = np.zeros(x.shape), np.zeros(x.shape)
  dscale, dbias, stats = [], [], []
  per_device = x.shape[0] // 8
  for group in groups:
    rows = np.concatenate([np.arange(d * per_device, (d + 1) * per_device) for d in group])
    valid_rows = rows[mask[rows].ravel()]
    xv, dyv = x[valid_rows], dy[valid_rows]
    yv, mean, var = ref.batch_norm_train(xv, (0, 1), scale, bias, EPS)
    dxv, ds, db = ref.batch_norm_train_grads(xv, dyv, (0, 1), scale, EPS)
    y[valid_rows], dx[valid_rows] = yv, dxv
    dscale.append(ds.ravel()), dbias.append(db.ravel()), stats.append((mean.ravel(), var.ravel()))
  return y, dx, sum(dscale), sum(dbias), stats


@pytest.mark.parametrize("mapping", ["shard_map", "pmap"])
@pytest.mark.parametrize("case", ["global", "unequal_masks", "groups_4_4"])
def test_synchronized_batch_norm_equals_global_batch_norm(mapping, case):
  x, dy = _data((32, 3, 4), mean=2.0, std=3.0), _data((32, 3, 4), seed=1)
  mask = np.ones((32, 1, 1), bool)
  if case == "unequal_masks":  # device d keeps d % 4 + 1 of its 4 examples
    for d in range(8):
      mask[4 * d + d % 4 + 1 : 4 * d + 4] = False
  dy = dy * mask
  groups = [list(range(8))] if case != "groups_4_4" else [[0, 1, 2, 3], [4, 5, 6, 7]]
  bn = normjax.batch_norm(
    axis_name="batch", momentum=0.5, axis_index_groups=groups if case == "groups_4_4" else None
  )
  params = _params(4)
  _, state = bn.init(x)
  y, new_state, dparams, dx = jax.jit(_sharded_step(bn, mapping))(
    params, state, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(dy)
  )
  want_y, want_dx, want_dscale, want_dbias, stats = _global_reference(x, dy, mask, params, groups)
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y)[valid], want_y[valid], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx)[valid], want_dx[valid], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dparams["scale"], want_dscale, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["bias"], want_dbias, rtol=1e-5, atol=1e-4)
  if case != "groups_4_4":  # with groups each group's devices hold their group's statistics
    mean, var = stats[0]
    np.testing.assert_allclose(new_state.mean, 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, 0.5 + 0.5 * var, rtol=1e-5)


def test_groups_give_each_group_its_own_running_statistics():
  x = _data((16, 3), mean=1.0)
  x[8:] += 10.0  # the second group of devices sees a different distribution
  bn = normjax.batch_norm(
    axis_name="batch", momentum=0.0, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
  )
  params, state = bn.init(x)
  per_device_state = jax.shard_map(
    lambda x: jax.tree_util.tree_map(
      lambda v: v[None], bn.apply(params, state, x, training=True)[1]
    ),
    mesh=_mesh(),
    in_specs=P("batch"),
    out_specs=P("batch"),
  )(jnp.asarray(x))
  np.testing.assert_allclose(per_device_state.mean[0], x[:8].astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(per_device_state.mean[7], x[8:].astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(per_device_state.var[5], x[8:].astype(np.float64).var(0), rtol=1e-5)


def test_moments_with_unequal_counts_are_not_a_mean_of_means():
  x = _data((16, 2), mean=5.0)
  mask = np.zeros((16, 1), bool)
  mask[0:2] = True  # device 0: both examples valid
  mask[2:3] = True  # device 1: one valid
  mask[4:6] = True  # device 2: two valid; other devices: none
  fn = jax.shard_map(
    lambda x, m: normjax.moments(x, 0, mask=m, axis_name="batch"),
    mesh=_mesh(),
    in_specs=(P("batch"), P("batch")),
    out_specs=P(),
  )
  mean, var = fn(jnp.asarray(x), jnp.asarray(mask))
  valid = x[mask[:, 0]].astype(np.float64)
  np.testing.assert_allclose(mean, valid.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, valid.var(0), rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"ghost_batch_size": 4}, {"renorm": True}])
def test_jit_with_named_sharding_equals_unsharded(options):
  x = _data((32, 5, 4), mean=3.0, std=2.0)
  bn = normjax.batch_norm(**options)
  params, state = bn.init(x)
  step = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=True))
  sharded_x = jax.device_put(x, NamedSharding(_mesh(), P("batch")))
  y_sharded, s_sharded = step(params, state, sharded_x)
  y, s = step(params, state, jnp.asarray(x))
  assert y_sharded.sharding.spec == P("batch") or len(y_sharded.sharding.device_set) == 8
  np.testing.assert_allclose(y_sharded, y, rtol=1e-5, atol=1e-5)
  for a, b in zip(s_sharded, s):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
