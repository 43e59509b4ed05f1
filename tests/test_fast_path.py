"""The fused training path of BatchNorm (closed-form backward, `_src/fused_batch_norm.py`).

Checked against (a) float64 NumPy references written from Ioffe & Szegedy 2015 §3 and Ioffe 2017, and
(b) JAX autodiff of the unfused formula (`fused_batch_norm.disabled()`), for outputs, dx, dscale and
dbias: plain, masked, ghost, renorm, both, several layouts, and synchronized over 8 CPU devices.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from normjax._src import fused_batch_norm
from tests import references as ref

EPS = 1e-5
CASES = {
    "plain": ({}, False),
    "masked": ({}, True),
    "ghost": ({"ghost_batch_size": 4}, False),
    "ghost_masked": ({"ghost_batch_size": 4}, True),
    "renorm": ({"renorm": True}, False),
    "renorm_masked_no_scale": ({"renorm": True, "use_scale": False}, True),
    "no_affine": ({"use_scale": False, "use_bias": False}, False),
    "two_pass": ({"stats_method": "two_pass"}, True),
    "fast_stats": ({"stats_method": "fast"}, False),
}


def _data(shape, mean=0.0, std=1.0, seed=0):
  return mean + std * np.random.default_rng(seed).standard_normal(shape)


def _mask(shape, seed=5):
  mask = np.random.default_rng(seed).random(shape[:-1] + (1,)) < 0.7
  mask.reshape(-1)[:2] = True  # at least two valid elements per group
  mask[4:6] = True
  return mask


def _setup(options, shape, dtype, seed=0):
  bn = normjax.batch_norm(epsilon=EPS, **options)
  x = jnp.asarray(_data(shape, mean=3.0, std=2.0, seed=seed), dtype)
  params, state = bn.init(x)
  rng = np.random.default_rng(seed + 1)
  params = {k: jnp.asarray(v + rng.uniform(0.1, 0.5, v.shape), v.dtype) for k, v in params.items()}
  state = state._replace(mean=state.mean + 2.5, var=state.var * 3.0, count=jnp.asarray(10, jnp.int32))
  return bn, params, state, x


def _vjp_fn(bn, state, mask):
  def run(params, x, dy):
    f = lambda p, x: bn.apply(p, state, x, training=True, mask=mask)[0]
    y, pullback = jax.vjp(f, params, x)
    dparams, dx = pullback(dy)
    return y, dx, dparams
  return jax.jit(run)


def _numpy_reference(options, params, state, x, dy, mask):
  """y, dx, dscale, dbias in float64 for a channels-last input, with mask / ghost groups / renorm."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  channels = x.shape[-1]
  scale = np.asarray(params.get("scale", np.ones(channels)), np.float64)
  bias = np.asarray(params.get("bias", np.zeros(channels)), np.float64)
  g = options.get("ghost_batch_size", x.shape[0])
  valid = np.ones(x.shape[:-1] + (1,), bool) if mask is None else np.broadcast_to(mask, x.shape[:-1] + (1,))
  y, dx = np.empty_like(x), np.empty_like(x)
  dscale, dbias = np.zeros(channels), np.zeros(channels)
  for start in range(0, x.shape[0], g):
    xs, dys, vs = x[start:start + g], dy[start:start + g], valid[start:start + g]
    axes = tuple(range(xs.ndim - 1))
    n = vs.sum(axis=axes, keepdims=True)
    mean = (xs * vs).sum(axis=axes, keepdims=True) / n
    var = (((xs - mean) ** 2) * vs).sum(axis=axes, keepdims=True) / n
    sigma = np.sqrt(var + EPS)
    xhat = (xs - mean) / sigma
    r, d = 1.0, 0.0
    if options.get("renorm"):
      running_sigma = np.sqrt(np.asarray(state.var, np.float64) + EPS)
      r = np.clip(sigma / running_sigma, 1 / 3.0, 3.0)
      d = np.clip((mean - np.asarray(state.mean, np.float64)) / running_sigma, -5.0, 5.0)
    y[start:start + g] = scale * (xhat * r + d) + bias
    # Every output depends on the statistics; only valid inputs move them (Ioffe & Szegedy 2015 §3).
    sum_dy = dys.sum(axis=axes, keepdims=True)
    sum_dy_xhat = (dys * xhat).sum(axis=axes, keepdims=True)
    dx[start:start + g] = scale * r / sigma * (dys - vs * (sum_dy + xhat * sum_dy_xhat) / n)
    dscale += (r * sum_dy_xhat + d * sum_dy).reshape(-1)
    dbias += sum_dy.reshape(-1)
  return y, dx, dscale, dbias


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_float64_reference_and_autodiff(name):
  options, masked = CASES[name]
  shape = (8, 3, 2, 5)
  with jax.enable_x64(True):
    bn, params, state, x = _setup({**options, "param_dtype": jnp.float64}, shape, jnp.float64)
    dy = jnp.asarray(_data(shape, seed=7), jnp.float64)
    mask = jnp.asarray(_mask(shape)) if masked else None
    y, dx, dparams = _vjp_fn(bn, state, mask)(params, x, dy)
    with fused_batch_norm.disabled():
      want = _vjp_fn(bn, state, mask)(params, x, dy)
    for got, expected in zip(jax.tree_util.tree_leaves((y, dx, dparams)), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-11)
    ry, rdx, rdscale, rdbias = _numpy_reference(options, params, state, x, dy, mask)
    # renorm reads the float32 running statistics (r, d carry float32 rounding, ~1e-7 relative).
    tol = 1e-6 if options.get("renorm") else 1e-9
    np.testing.assert_allclose(y, ry, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol)
    if "scale" in dparams:
      np.testing.assert_allclose(dparams["scale"], rdscale, rtol=tol, atol=tol)
    if "bias" in dparams:
      np.testing.assert_allclose(dparams["bias"], rdbias, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", ["plain", "masked", "ghost", "renorm"])
def test_low_precision_inputs_against_float64(name, dtype, tol):
  options, masked = CASES[name]
  shape = (8, 4, 4, 6)
  bn, params, state, x = _setup(options, shape, dtype, seed=2)
  dy = jnp.asarray(_data(shape, seed=8), dtype)
  mask = jnp.asarray(_mask(shape)) if masked else None
  y, dx, dparams = _vjp_fn(bn, state, mask)(params, x, dy)
  assert y.dtype == dtype and dx.dtype == dtype and dparams["scale"].dtype == jnp.float32
  ry, rdx, rdscale, rdbias = _numpy_reference(options, params, state, np.asarray(x, np.float64),
                                              np.asarray(dy, np.float64), mask)
  scale = lambda a: np.max(np.abs(a))
  for got, want in ((y, ry), (dx, rdx), (dparams["scale"], rdscale), (dparams["bias"], rdbias)):
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / scale(want)
    assert err < tol, (name, err)


def test_channels_first_and_multi_axis_layouts():
  with jax.enable_x64(True):
    for axis, shape in ((1, (6, 3, 4, 4)), ((1, 3), (4, 3, 5, 2))):
      bn = normjax.batch_norm(axis=axis, param_dtype=jnp.float64)
      x = jnp.asarray(_data(shape, mean=-4.0, std=3.0), jnp.float64)
      dy = jnp.asarray(_data(shape, seed=3), jnp.float64)
      params, state = bn.init(x)
      got = _vjp_fn(bn, state, None)(params, x, dy)
      with fused_batch_norm.disabled():
        want = _vjp_fn(bn, state, None)(params, x, dy)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("options, masked, order", [({}, False, 2), ({}, True, 1),
                                                    ({"ghost_batch_size": 2}, False, 1)])
def test_check_grads(options, masked, order):
  shape = (4, 2, 2)
  with jax.enable_x64(True):
    bn, params, state, x = _setup({**options, "param_dtype": jnp.float64}, shape, jnp.float64)
    mask = jnp.asarray(_mask(shape)) if masked else None
    w = jnp.asarray(_data(shape, seed=9), jnp.float64)
    f = jax.jit(lambda p, x: jnp.sum(jnp.sin(bn.apply(p, state, x, training=True, mask=mask)[0]) * w))
    # order 2 (reverse-over-reverse) is exact: the backward is plain JAX code of x and of the
    # statistics, which the custom_vjp's forward computes from x.
    check_grads(f, (params, x), order=order, modes=["rev"])


def test_renorm_check_grads_in_params():
  with jax.enable_x64(True):
    bn, params, state, x = _setup({"renorm": True, "param_dtype": jnp.float64}, (8, 3), jnp.float64)
    check_grads(jax.jit(lambda p: bn.apply(p, state, x, training=True)[0]), (params,), order=1,
                modes=["rev"])


def test_hessian_matches_autodiff_and_forward_mode_needs_disabled():
  with jax.enable_x64(True):
    bn, params, state, x = _setup({"param_dtype": jnp.float64}, (6, 2), jnp.float64)
    loss = lambda x: jnp.sum(jnp.tanh(bn.apply(params, state, x, training=True)[0]) ** 2)
    got = jax.jit(jax.hessian(loss))(x)  # forward-over-reverse works through a custom_vjp
    with fused_batch_norm.disabled():
      want = jax.jit(jax.hessian(lambda x: loss(x) + 0.0))(x)
      jax.jit(lambda x: jax.jvp(loss, (x,), (jnp.ones_like(x),)))(x)  # pure forward mode: unfused path
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    with pytest.raises(TypeError, match="forward-mode"):  # the documented custom_vjp limitation
      jax.jvp(loss, (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize("options, check_vma", [
    ({}, True), ({}, False), ({"ghost_batch_size": 2}, True), ({"renorm": True}, False),
    ({"axis_index_groups": ((0, 1, 2, 3), (4, 5, 6, 7))}, True)])
def test_synchronized_over_8_devices_matches_autodiff(options, check_vma):
  mesh = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8], axis_types=(jax.sharding.AxisType.Auto,))
  with jax.enable_x64(True):
    bn, params, state, x = _setup({**options, "axis_name": "d", "param_dtype": jnp.float64},
                                  (32, 3, 4), jnp.float64)
    dy = jnp.asarray(_data(x.shape, seed=4), jnp.float64)
    mask = jnp.asarray(_mask(x.shape))

    def make():
      def inner(p, x, dy, m):
        y, pullback = jax.vjp(lambda p, x: bn.apply(p, state, x, training=True, mask=m)[0], p, x)
        dparams, dx = pullback(dy)
        if not check_vma:  # per-device gradients of replicated parameters, summed as a trainer would
          dparams = jax.lax.psum(dparams, "d")
        return y, dx, dparams
      return jax.jit(jax.shard_map(inner, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")),
                                   out_specs=(P("d"), P("d"), P()), check_vma=check_vma))

    got = make()(params, x, dy, mask)
    with fused_batch_norm.disabled():
      want = make()(params, x, dy, mask)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)
    if not options:  # one global batch: the single-device BatchNorm of the whole batch
      single = normjax.batch_norm(epsilon=EPS, param_dtype=jnp.float64)
      want_global = _vjp_fn(single, state, mask)(params, x, dy)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want_global)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


def test_vmap_axis_name_matches_autodiff():
  with jax.enable_x64(True):
    bn, params, state, x = _setup({"axis_name": "v", "param_dtype": jnp.float64}, (4, 6, 3), jnp.float64)
    dy = jnp.asarray(_data(x.shape, seed=6), jnp.float64)

    def make():
      def per_member(x, dy):
        y, pullback = jax.vjp(lambda p, x: bn.apply(p, state, x, training=True)[0], params, x)
        return (y,) + pullback(dy)
      return jax.jit(jax.vmap(per_member, axis_name="v"))

    got = make()(x, dy)
    with fused_batch_norm.disabled():
      want = make()(x, dy)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


def test_forward_is_bitwise_unchanged():
  x = jnp.asarray(_data((16, 8, 8, 32), mean=5.0), jnp.bfloat16)
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  f = lambda p, x: bn.apply(p, state, x, training=True)[0]
  y = jax.jit(f)(params, x)
  with fused_batch_norm.disabled():
    want = jax.jit(lambda p, x: f(p, x) + 0)(params, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
