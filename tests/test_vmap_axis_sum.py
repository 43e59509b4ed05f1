"""Synchronized statistics over a `vmap` axis inside `shard_map(check_vma=True)`, on 8 CPU devices.

jax's own `psum` over a vmap axis cannot be traced there (`normjax._src.vmap_axis_sum`), so these
programs used to compile only with `check_vma=False`. They are compared with the same layers under a
plain `vmap` (jax's `psum`, no shard_map) and with float64 references.
"""

import equinox as eqx
import jax.test_util  # noqa: F401  (check_grads)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import normjax
import normjax.equinox as nje
from normjax._src import compat, vmap_axis_sum
from tests import helpers

DEVICES, PER_DEVICE, FEATURES = 8, 4, 5
DATA, BATCH = "data", "batch"
GROUPS = ((0, 1), (2, 3))


def _mesh(devices=DEVICES):
  return Mesh(np.array(jax.devices()[:devices]), (DATA,))


def _x(seed=0, mean=3.0):  # a fresh layer shifts by 0 under vmap: keep E[x²]−E[x]² exact enough
  data = helpers.normal_data((DEVICES * PER_DEVICE, FEATURES), mean=mean, std=2.0, seed=seed)
  return jnp.asarray(data, jnp.float32)


def _reference(x, groups=None):
  """float64 BatchNorm (scale 1, bias 0) over each device's examples, or each group of them."""
  x = np.asarray(x, np.float64).reshape(DEVICES, PER_DEVICE, FEATURES)
  parts = [list(range(PER_DEVICE))] if groups is None else [list(g) for g in groups]
  y = np.empty_like(x)
  for part in parts:
    block = x[:, part]
    mean, var = block.mean(1, keepdims=True), block.var(1, keepdims=True)
    y[:, part] = (block - mean) / np.sqrt(var + 1e-5)
  return y.reshape(-1, FEATURES)


def test_sum_over_nested_vmap_axes_and_its_derivatives():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)

  def body(block):  # block: (1, 3, 4) on each of 2 devices
    inner = lambda r: vmap_axis_sum.vmap_axis_sum(r, ("a", "b")) * r  # noqa: E731
    return jax.vmap(jax.vmap(inner, axis_name="b"), axis_name="a")(block)

  f = jax.jit(jax.shard_map(body, mesh=_mesh(2), in_specs=P(DATA), out_specs=P(DATA)))
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(f(x), x64.sum(1, keepdims=True) * x64, rtol=1e-6)  # a: size 1
  jax.test_util.check_grads(f, (x / 10,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


def test_unbound_axis_name_is_a_name_error():
  def body(block):
    return jax.vmap(lambda r: normjax.moments(r[None], (0,), axis_name="nope")[0])(block)

  with pytest.raises(NameError, match="nope"):
    jax.jit(jax.shard_map(body, mesh=_mesh(2), in_specs=P(DATA), out_specs=P(DATA)))(_x()[:4])


def _core_program(bn, params, state, check_vma=True):
  """Per device: vmap over its examples with axis_name BATCH; y and each device's new state."""

  def per_device(x):
    one = lambda r: bn.apply(params, state, r[None], training=True)  # noqa: E731
    y, new_state = jax.vmap(one, axis_name=BATCH, out_axes=(0, 0))(x)
    return y[:, 0], jax.tree.map(lambda s: s[:1], new_state)

  mapped = jax.shard_map(
    per_device, mesh=_mesh(), in_specs=P(DATA), out_specs=P(DATA), check_vma=check_vma
  )
  plain = jax.vmap(per_device)  # no shard_map: jax's own psum over BATCH, device by device
  return jax.jit(mapped), jax.jit(lambda x: _flatten(plain(x.reshape(DEVICES, PER_DEVICE, -1))))


def _flatten(out):
  y, state = out
  return y.reshape(-1, FEATURES), jax.tree.map(lambda s: s.reshape((-1,) + s.shape[2:]), state)


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["whole axis", "axis_index_groups"])
def test_core_batch_norm_over_a_vmap_axis_inside_checked_shard_map(groups):
  x = _x(seed=1)
  bn = normjax.batch_norm(momentum=0.9, axis_name=BATCH, axis_index_groups=groups)
  params, state = bn.init(x[:1])
  mapped, plain = _core_program(bn, params, state)
  (y, new_state), (y_plain, state_plain) = mapped(x), plain(x)
  np.testing.assert_allclose(np.asarray(y, np.float64), _reference(x, groups), atol=2e-4)
  np.testing.assert_allclose(y, y_plain, rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(state_plain)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  ct = jnp.asarray(helpers.normal_data(x.shape, seed=2), jnp.float32)
  grad = jax.grad(lambda x: jnp.vdot(mapped(x)[0], ct))(x)
  grad_plain = jax.grad(lambda x: jnp.vdot(plain(x)[0], ct))(x)
  np.testing.assert_allclose(grad, grad_plain, rtol=1e-4, atol=1e-6)
  tangent = jax.jvp(lambda x: mapped(x)[0], (x,), (ct,))[1]
  tangent_plain = jax.jvp(lambda x: plain(x)[0], (x,), (ct,))[1]
  np.testing.assert_allclose(tangent, tangent_plain, rtol=1e-4, atol=1e-6)


def _eqx_program(layer, axis_name, vary_state):
  """Per device: the layer under vmap with axis_name BATCH; the state comes in replicated (`P()`)."""

  def per_device(x, state):
    if vary_state:  # each device keeps its own running statistics
      state = jax.tree.map(lambda v: compat.vary(v, (DATA,)), state)
    call = jax.vmap(layer, axis_name=BATCH, in_axes=(0, None), out_axes=(0, None))
    y, new_state = call(x, state)
    return y, new_state.get(layer.state_index).mean[None]

  return jax.jit(
    jax.shard_map(per_device, mesh=_mesh(), in_specs=(P(DATA), P()), out_specs=(P(DATA), P(DATA)))
  )


def test_equinox_batch_norm_per_device_and_synchronized_inside_checked_shard_map():
  x = _x(seed=3)
  layer, state = eqx.nn.make_with_state(nje.BatchNorm)(FEATURES, axis_name=BATCH, momentum=0.9)
  y, means = _eqx_program(layer, BATCH, vary_state=True)(x, state)
  np.testing.assert_allclose(np.asarray(y, np.float64), _reference(x), atol=2e-4)
  per_device = np.asarray(x, np.float64).reshape(DEVICES, PER_DEVICE, FEATURES).mean(1)
  np.testing.assert_allclose(means, 0.1 * per_device, rtol=1e-5)

  synced, state = eqx.nn.make_with_state(nje.BatchNorm)(
    FEATURES, axis_name=(DATA, BATCH), momentum=0.9
  )
  y, means = _eqx_program(synced, (DATA, BATCH), vary_state=False)(x, state)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(
    np.asarray(y, np.float64), (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5), atol=2e-4
  )
  np.testing.assert_allclose(means, np.tile(0.1 * x64.mean(0), (DEVICES, 1)), rtol=1e-5)


def test_equinox_replicated_state_with_per_device_statistics_names_the_axes():
  layer, state = eqx.nn.make_with_state(nje.BatchNorm)(FEATURES, axis_name=BATCH)
  with pytest.raises(ValueError, match=r"vary over the shard_map axes \['data'\]"):
    _eqx_program(layer, BATCH, vary_state=False)(_x(), state)


def test_reverse_mode_of_a_jitted_vmap():
  """`jax.grad(jax.jit(jax.vmap(...)))`: vmap batches the closed-form derivative after its axis left
  the trace context, where jax's psum raised "unbound axis name"; equals `jax.jit(jax.grad(...))`."""
  x = _x(seed=4)[:PER_DEVICE]
  bn = normjax.batch_norm(axis_name=BATCH)
  params, state = bn.init(x[:1])
  ct = jnp.asarray(helpers.normal_data(x.shape, seed=5), jnp.float32)

  def loss(params, x):
    one = lambda r: bn.apply(params, state, r[None], training=True)[0][0]  # noqa: E731
    return jnp.vdot(jax.vmap(one, axis_name=BATCH)(x), ct)

  outside = jax.grad(lambda p, x: jax.jit(loss)(p, x), argnums=(0, 1))(params, x)
  inside = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  for got, want in zip(jax.tree.leaves(outside), jax.tree.leaves(inside)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  jax.test_util.check_grads(
    jax.jit(loss), (params, x), order=1, modes=("rev",), atol=2e-2, rtol=2e-2
  )


def test_groups_over_two_vmap_axes_count_members_row_major():
  """Groups over `("a", "b")` (nested vmaps, 2 × 3 members) number the members as
  `jax.lax.axis_index(("a", "b"))` does: a·3 + b."""
  from normjax._src import collectives  # pylint: disable=g-import-not-at-top

  x = jnp.arange(6.0).reshape(2, 3)
  groups = ((0, 1, 2), (3, 4, 5))  # = the rows of x
  inner = lambda v: collectives.cross_device_sum(v, ("a", "b"), groups)  # noqa: E731
  got = jax.jit(jax.vmap(jax.vmap(inner, axis_name="b"), axis_name="a"))(x)
  np.testing.assert_array_equal(got, np.repeat(np.asarray(x).sum(1, keepdims=True), 3, 1))
