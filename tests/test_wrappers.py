"""Flax wrappers: linen parity with flax.linen.BatchNorm, init semantics, NNX, variants."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

import normjax
import normjax.linen as njl
import normjax.nnx as njn


def _data(shape, mean=0.0, std=1.0, seed=0):
  return (mean + std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("options", [
    dict(momentum=0.9, axis=-1), dict(momentum=0.5, axis=1, epsilon=1e-3),
    dict(momentum=0.99, use_scale=False), dict(momentum=0.8, axis=(1, 3))])
def test_linen_matches_flax_linen_with_fast_statistics(options):
  flax_options = dict(options)
  ours = njl.BatchNorm(stats_method="fast", **options)
  theirs = nn.BatchNorm(**flax_options)
  x0 = _data((8, 3, 4, 5))
  v_ours = ours.init(jax.random.key(0), x0, training=True)
  v_theirs = theirs.init(jax.random.key(0), x0, use_running_average=False)
  np.testing.assert_allclose(v_ours["params"]["bias"], v_theirs["params"]["bias"])
  for step in range(3):
    x = _data((8, 3, 4, 5), mean=step, std=1 + step, seed=step)
    y1, u1 = ours.apply(v_ours, x, training=True, mutable=["batch_stats"])
    y2, u2 = theirs.apply(v_theirs, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
      np.testing.assert_allclose(u1["batch_stats"][k], u2["batch_stats"][k], rtol=1e-6, atol=1e-7)
    v_ours = {**v_ours, **u1}
    v_theirs = {**v_theirs, **u2}
  assert int(v_ours["batch_stats"]["count"]) == 3
  y1 = ours.apply(v_ours, x0, training=False)
  y2 = theirs.apply(v_theirs, x0, use_running_average=True)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)


def test_init_neither_updates_statistics_nor_needs_a_bound_axis_name():
  layer = njl.BatchNorm(axis_name="batch")
  x = _data((1, 3), mean=7.0)  # one example: training statistics would be undefined
  variables = layer.init(jax.random.key(0), x, training=True)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
  assert int(variables["batch_stats"]["count"]) == 0
  assert jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), variables["batch_stats"]) == {
      "count": ((), jnp.int32), "mean": ((3,), jnp.float32), "var": ((3,), jnp.float32)}


def test_linen_synchronized_under_shard_map_equals_global():
  x = _data((32, 4), mean=3.0, std=2.0)
  layer = njl.BatchNorm(axis_name="batch", momentum=0.5)
  variables = layer.init(jax.random.key(0), x, training=True)
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))

  def local(variables, x):
    y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  y, stats = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("batch")),
                                   out_specs=(P("batch"), P())))(variables, jnp.asarray(x))
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(y, (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["mean"], 0.5 * x64.mean(0), rtol=1e-5)


def test_linen_variants_match_the_functional_transforms():
  x = _data((16, 3), mean=1.0, std=2.0)
  cases = [(njl.GhostBatchNorm(ghost_batch_size=4), normjax.ghost_batch_norm(4)),
           (njl.BatchRenorm(r_max=2.0, d_max=1.0), normjax.batch_renorm(r_max=2.0, d_max=1.0))]
  for module, transform in cases:
    variables = module.init(jax.random.key(0), x, training=True)
    params, state = transform.init(x)
    state = state._replace(mean=state.mean + 1.5)
    variables = {"params": variables["params"], "batch_stats": state._asdict()}
    y1, u1 = module.apply(variables, x, training=True, mutable=["batch_stats"])
    y2, s2 = transform.apply(params, state, x, training=True)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u1["batch_stats"]["var"], s2.var, rtol=1e-5, atol=1e-6)


def test_linen_renorm_with_a_schedule_initializes_and_trains_under_jit():
  """Schedules are checked at step 0 when the config is built, also when that happens inside jit."""
  clip = normjax.batch_renorm_paper_schedule(warmup_steps=2, r_max_steps=4, d_max_steps=3)
  module = njl.BatchRenorm(r_max=clip.r_max, d_max=clip.d_max, ghost_batch_size=4)
  x = _data((16, 3), mean=1.0, std=2.0)
  variables = jax.jit(lambda k: module.init(k, x, training=False))(jax.random.key(0))
  y, updates = jax.jit(lambda v: module.apply(v, x, training=True, mutable=["batch_stats"]))(variables)
  # Step 0 of the schedule: r_max = 1, d_max = 0, i.e. plain ghost BatchNorm.
  y_ghost, _ = normjax.ghost_batch_norm(4).apply(*normjax.ghost_batch_norm(4).init(x), x, training=True)
  np.testing.assert_allclose(y, y_ghost, rtol=1e-5, atol=1e-5)
  assert int(updates["batch_stats"]["count"]) == 1
  with pytest.raises(ValueError, match="r_max"):
    jax.jit(lambda k: njl.BatchRenorm(r_max=lambda step: 0.5 + 0 * step).init(k, x, training=False))(
        jax.random.key(0))


def test_linen_virtual_batch_norm_uses_the_init_batch_as_reference():
  reference, x = _data((64, 3), mean=2.0), _data((4, 3), seed=3)
  module = njl.VirtualBatchNorm()
  variables = module.init(jax.random.key(0), reference, training=False)
  vbn = normjax.virtual_batch_norm()
  params, state = vbn.init(reference)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], state.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(module.apply(variables, x, training=True),
                             vbn.apply(params, state, x, training=True)[0], rtol=1e-5, atol=1e-6)


def test_nnx_batch_norm_matches_the_functional_transform_under_nnx_jit():
  layer = njn.BatchNorm(4, momentum=0.8, debias=True)
  bn = normjax.batch_norm(momentum=0.8, debias=True)
  x = _data((10, 4), mean=3.0)
  params, state = bn.init(x)

  @nnx.jit
  def step(layer, x):
    return layer(x, training=True)

  for i in range(3):
    xi = x + i
    y = step(layer, xi)
    y_ref, state = bn.apply(params, state, xi, training=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.mean[...], state.mean, rtol=1e-5, atol=1e-6)
  assert int(layer.count[...]) == 3
  y_eval = layer(x, training=False)
  np.testing.assert_allclose(y_eval, bn.apply(params, state, x, training=False)[0], rtol=1e-5, atol=1e-6)
  assert int(layer.count[...]) == 3
  ghost = njn.GhostBatchNorm(4, ghost_batch_size=5)
  renorm = njn.BatchRenorm(4, r_max=1.0, d_max=0.0)
  np.testing.assert_allclose(renorm(x, training=True),
                             normjax.batch_norm().apply(params, bn.init(x)[1], x, training=True)[0],
                             rtol=1e-5, atol=1e-6)
  assert ghost(x, training=True).shape == x.shape
