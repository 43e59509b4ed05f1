"""Synchronized BatchNorm over one device is the local layer: an `axis_name` known at trace time to
pool a single device (an axis of size 1, or `axis_index_groups` of one device each) runs the local
training step (on a CPU, the fused kernel), on 8 real CPU devices, with values, derivatives and
`shard_map`'s varying-axis types those of synchronizing."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from normjax._src import cpu_kernel
from tests import helpers

pytestmark = helpers.needs_cpu_kernel()

AXIS = "batch"


def _data(shape, dtype=jnp.float32, seed=0, mean=1e3, std=2.0):
  return jnp.asarray(helpers.normal_data(shape, mean=mean, std=std, seed=seed)).astype(dtype)


def _sharded_step(bn, devices, check_vma=True):
  mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
  return jax.shard_map(
    lambda p, s, x: bn.apply(p, s, x, training=True),
    mesh=mesh,
    in_specs=(P(), P(), P(AXIS)),
    out_specs=(P(AXIS), P()),
    check_vma=check_vma,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("options", [{}, {"ghost_batch_size": 4}, {"renorm": True}])
def test_one_device_axis_runs_the_local_kernel_with_local_values(dtype, options):
  """`check_vma=True` with the running state replicated (`P()`): the statistics stay typed as
  synchronized ones. y and the state are bitwise the unsynchronized layer's."""
  x = _data((8, 5, 5, 16), dtype)
  local = normjax.batch_norm(momentum=0.9, **options)
  synced = normjax.batch_norm(momentum=0.9, axis_name=AXIS, **options)
  params, state = local.init(x)
  step = jax.jit(_sharded_step(synced, 1))
  text = step.lower(params, state, x).compile().as_text()
  assert cpu_kernel.TARGET in text and cpu_kernel.MOMENTS_TARGET not in text
  y, new_state = step(params, state, x)
  y_ref, state_ref = jax.jit(lambda p, s, x: local.apply(p, s, x, training=True))(params, state, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  for got, want in zip(new_state, state_ref):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_device_axis_derivatives_match_the_local_layer():
  x = _data((6, 3, 3, 4), seed=1, mean=0.5, std=1.0)  # a scale for check_grads' finite differences
  synced = normjax.batch_norm(axis_name=AXIS)
  local = normjax.batch_norm()
  params, state = local.init(x)
  dy = _data(x.shape, seed=2, mean=0.0, std=1.0)
  sharded = _sharded_step(synced, 1)

  def loss(impl, x, scale):
    p = {**params, "scale": scale}
    return jnp.sum(impl(p, state, x)[0] * dy)

  local_step = lambda p, s, x: local.apply(p, s, x, training=True)  # noqa: E731
  got = jax.grad(lambda x, s: loss(sharded, x, s), argnums=(0, 1))(x, params["scale"])
  want = jax.grad(lambda x, s: loss(local_step, x, s), argnums=(0, 1))(x, params["scale"])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  check_grads(lambda x: sharded(params, state, x)[0], (x,), order=1, modes=("fwd", "rev"))


def _with_device_axis(step_result):
  y, state = step_result
  return y, jax.tree_util.tree_map(lambda a: a[None], state)


def test_groups_of_one_device_normalize_each_shard_alone_without_collectives():
  devices = 8
  x = _data((devices * 4, 3, 3, 8), seed=3)
  groups = [[i] for i in range(devices)]
  synced = normjax.batch_norm(momentum=0.9, axis_name=AXIS, axis_index_groups=groups)
  local = normjax.batch_norm(momentum=0.9)
  params, state = local.init(x)
  mesh = Mesh(np.array(jax.devices()[:devices]), (AXIS,))
  step = jax.jit(
    jax.shard_map(
      lambda p, s, x: _with_device_axis(synced.apply(p, s, x, training=True)),
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS)),
      out_specs=(P(AXIS), P(AXIS)),  # each device keeps its own running statistics
    )
  )
  text = step.lower(params, state, x).compile().as_text()
  assert cpu_kernel.TARGET in text
  assert " all-reduce(" not in text and "collective-permute" not in text
  y, new_state = step(params, state, x)
  for i in range(devices):
    shard = x[4 * i : 4 * (i + 1)]
    y_ref, state_ref = local.apply(params, state, shard, training=True)
    np.testing.assert_allclose(y[4 * i : 4 * (i + 1)], y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state.mean[i], state_ref.mean, rtol=1e-6)


def test_two_devices_still_synchronize():
  """The shortcut is for one device only: over two, the statistics pool both shards."""
  x = _data((8, 3, 3, 8), seed=4)
  x = x.at[4:].add(5.0)  # the two shards' means differ
  synced = normjax.batch_norm(axis_name=AXIS)
  local = normjax.batch_norm()
  params, state = local.init(x)
  step = jax.jit(_sharded_step(synced, 2))
  assert cpu_kernel.MOMENTS_TARGET in step.lower(params, state, x).compile().as_text()
  y, _ = step(params, state, x)
  y_ref, _ = local.apply(params, state, x, training=True)  # the whole batch's statistics
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


def test_vmap_axis_of_one_matches_the_local_layer():
  x = _data((1, 8, 3, 3, 8), seed=5)
  synced = normjax.batch_norm(axis_name=AXIS)
  local = normjax.batch_norm()
  params, state = local.init(x[0])
  y = jax.vmap(lambda x: synced.apply(params, state, x, training=True)[0], axis_name=AXIS)(x)
  y_ref, _ = local.apply(params, state, x[0], training=True)
  np.testing.assert_allclose(y[0], y_ref, rtol=1e-6, atol=1e-6)
