"""The closed-form derivative of training BatchNorm (`_src/fused_batch_norm.py`, a `jax.custom_jvp`).

Checked against (a) float64 NumPy references written from Ioffe & Szegedy 2015 §3 and Ioffe 2017, with
float64 central finite differences of the forward formula for jvp / jacfwd / hessian, and (b) JAX
autodiff through the statistics (`normalize_training(..., closed_form=False)`), for outputs, dx, dscale
and dbias: plain, masked, ghost, renorm, both, several layouts, synchronized over 8 CPU devices. Reverse
mode must keep `x` as its only full-size residual.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from normjax._src import batch_norm as bn_lib
from normjax._src import fused_batch_norm
from tests import helpers

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
  return helpers.normal_data(shape, mean=mean, std=std, seed=seed, dtype=np.float64)  # float64 here


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
  state = state._replace(
    mean=state.mean + 2.5, var=state.var * 3.0, count=jnp.asarray(10, jnp.int32)
  )
  return bn, params, state, x


def _autodiff_apply(options, params, state, x, mask):
  """The same training output, differentiated by plain autodiff through `moments`."""
  config = bn_lib.BatchNormConfig(epsilon=EPS, **options)
  return bn_lib.apply_with_batch_moments(
    config, params, state, x, training=True, mask=mask, closed_form=False
  )[0]


def _vjp_fn(apply):
  def run(params, x, dy):
    y, pullback = jax.vjp(apply, params, x)
    dparams, dx = pullback(dy)
    return y, dx, dparams

  return jax.jit(run)


def _closed(bn, state, mask):
  return lambda p, x: bn.apply(p, state, x, training=True, mask=mask)[0]


def _autodiff(options, state, mask):
  return lambda p, x: _autodiff_apply(options, p, state, x, mask)


def _numpy_forward(options, params, state, x, mask, fixed=None):
  """y in float64 for a channels-last input (Ioffe & Szegedy 2015 Alg. 1, Ioffe 2017 for renorm), with
  the per-group statistics; renorm's r, d are taken from `fixed` when given (stop-gradient constants)."""
  x = np.asarray(x, np.float64)
  channels = x.shape[-1]
  scale = np.asarray(params.get("scale", np.ones(channels)), np.float64)
  bias = np.asarray(params.get("bias", np.zeros(channels)), np.float64)
  g = options.get("ghost_batch_size", x.shape[0])
  valid = (
    np.ones(x.shape[:-1] + (1,), bool)
    if mask is None
    else np.broadcast_to(mask, x.shape[:-1] + (1,))
  )
  y, groups = np.empty_like(x), []
  for k, start in enumerate(range(0, x.shape[0], g)):
    xs, vs = x[start : start + g], valid[start : start + g]
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
      if fixed is not None:
        r, d = fixed[k]
    y[start : start + g] = scale * (xhat * r + d) + bias
    groups.append((start, n, sigma, xhat, r, d))
  return y, groups


def _numpy_reference(options, params, state, x, dy, mask):
  """y, dx, dscale, dbias in float64 (Ioffe & Szegedy 2015 §3 back-propagation)."""
  y, groups = _numpy_forward(options, params, state, x, mask)
  dy = np.asarray(dy, np.float64)
  channels = y.shape[-1]
  scale = np.asarray(params.get("scale", np.ones(channels)), np.float64)
  g = options.get("ghost_batch_size", y.shape[0])
  valid = (
    np.ones(y.shape[:-1] + (1,), bool)
    if mask is None
    else np.broadcast_to(mask, y.shape[:-1] + (1,))
  )
  dx = np.empty_like(y)
  dscale, dbias = np.zeros(channels), np.zeros(channels)
  for start, n, sigma, xhat, r, d in groups:
    dys, vs = dy[start : start + g], valid[start : start + g]
    axes = tuple(range(dys.ndim - 1))
    # Every output depends on the statistics; only valid inputs move them.
    sum_dy = dys.sum(axis=axes, keepdims=True)
    sum_dy_xhat = (dys * xhat).sum(axis=axes, keepdims=True)
    dx[start : start + g] = scale * r / sigma * (dys - vs * (sum_dy + xhat * sum_dy_xhat) / n)
    dscale += (r * sum_dy_xhat + d * sum_dy).reshape(-1)
    dbias += sum_dy.reshape(-1)
  return y, dx, dscale, dbias


@pytest.fixture(params=helpers.PROGRAMS)
def program(request, monkeypatch):
  """Each test runs three times: with the CPU kernel (where it handles the step), the CPU lowering of
  the XLA program, and the portable (GPU / TPU) program forced on this CPU."""
  helpers.use_program(monkeypatch, request.param)
  return request.param


def _assert_trees_close(got, want, **tol):
  got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_matches_float64_reference_and_autodiff(name, program):
  options, masked = CASES[name]
  shape = (8, 3, 2, 5)
  with jax.enable_x64(True):
    options = {**options, "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, shape, jnp.float64)
    dy = jnp.asarray(_data(shape, seed=7), jnp.float64)
    mask = jnp.asarray(_mask(shape)) if masked else None
    y, dx, dparams = _vjp_fn(_closed(bn, state, mask))(params, x, dy)
    want = _vjp_fn(_autodiff(options, state, mask))(params, x, dy)
    _assert_trees_close((y, dx, dparams), want, rtol=1e-10, atol=1e-11)
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
def test_low_precision_inputs_against_float64(name, dtype, tol, program):
  options, masked = CASES[name]
  shape = (8, 4, 4, 6)
  bn, params, state, x = _setup(options, shape, dtype, seed=2)
  dy = jnp.asarray(_data(shape, seed=8), dtype)
  mask = jnp.asarray(_mask(shape)) if masked else None
  y, dx, dparams = _vjp_fn(_closed(bn, state, mask))(params, x, dy)
  assert y.dtype == dtype and dx.dtype == dtype and dparams["scale"].dtype == jnp.float32
  ry, rdx, rdscale, rdbias = _numpy_reference(
    options, params, state, np.asarray(x, np.float64), np.asarray(dy, np.float64), mask
  )
  # Forward mode in the same dtype, along dx = dy, against float64 central differences of the formula.
  _, tangent = jax.jvp(lambda x: _closed(bn, state, mask)(params, x), (x,), (dy,))
  assert tangent.dtype == dtype
  _, groups = _numpy_forward(options, params, state, x, mask)
  fixed = [(r, d) for _, _, _, _, r, d in groups]  # renorm's r, d are constants
  moved = lambda t: _numpy_forward(
    options, params, state, np.asarray(x, np.float64) + t * np.asarray(dy, np.float64), mask, fixed
  )[0]
  rtangent = (moved(1e-5) - moved(-1e-5)) / 2e-5
  scale = lambda a: np.max(np.abs(a))
  for got, want in (
    (y, ry),
    (dx, rdx),
    (dparams["scale"], rdscale),
    (dparams["bias"], rdbias),
    (tangent, rtangent),
  ):
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / scale(want)
    assert err < tol, (name, err)


def test_channels_first_and_multi_axis_layouts():
  with jax.enable_x64(True):
    for axis, shape in ((1, (6, 3, 4, 4)), ((1, 3), (4, 3, 5, 2))):
      options = {"axis": axis, "param_dtype": jnp.float64}
      bn = normjax.batch_norm(epsilon=EPS, **options)
      x = jnp.asarray(_data(shape, mean=-4.0, std=3.0), jnp.float64)
      dy = jnp.asarray(_data(shape, seed=3), jnp.float64)
      params, state = bn.init(x)
      got = _vjp_fn(_closed(bn, state, None))(params, x, dy)
      want = _vjp_fn(_autodiff(options, state, None))(params, x, dy)
      _assert_trees_close(got, want, rtol=1e-10, atol=1e-11)
      tangent = jax.jvp(lambda x: _closed(bn, state, None)(params, x), (x,), (dy,))[1]
      want_tangent = jax.jvp(lambda x: _autodiff(options, state, None)(params, x), (x,), (dy,))[1]
      np.testing.assert_allclose(tangent, want_tangent, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
  "options, masked, order",
  [({}, False, 2), ({}, True, 2), ({"ghost_batch_size": 2}, False, 2), ({"renorm": True}, True, 2)],
)
def test_check_grads_forward_and_reverse(options, masked, order, program):
  shape = (4, 2, 2)
  with jax.enable_x64(True):
    bn, params, state, x = _setup({**options, "param_dtype": jnp.float64}, shape, jnp.float64)
    mask = jnp.asarray(_mask(shape)) if masked else None
    w = jnp.asarray(_data(shape, seed=9), jnp.float64)
    if options.get("renorm"):  # r, d are stop-gradient: numerical differences must not move them
      f = lambda p, x: jnp.sum(jnp.sin(bn.apply(p, state, x, training=True, mask=mask)[0]) * w)
      check_grads(jax.jit(lambda p: f(p, x)), (params,), order=order, modes=["fwd", "rev"])
      return
    f = jax.jit(
      lambda p, x: jnp.sum(jnp.sin(bn.apply(p, state, x, training=True, mask=mask)[0]) * w)
    )
    # Every mode and order: forward, reverse, forward-over-forward, reverse-over-reverse.
    check_grads(f, (params, x), order=order, modes=["fwd", "rev"])


# ---------------------------------------------------------------------------------------------------
# Forward mode and the Hessian against float64 finite differences of the NumPy formula.

FD_CASES = {
  "plain": ({}, False),
  "masked": ({}, True),
  "ghost": ({"ghost_batch_size": 4}, False),
  "renorm": ({"renorm": True}, False),
  "ghost_masked_renorm": ({"ghost_batch_size": 4, "renorm": True}, True),
}
FD_SHAPE = (8, 3)


def _fd_problem(name):
  """A scalar loss L(scale, bias, x) = Σ w·sin(y) through training BatchNorm, in JAX and in NumPy over
  one flat float64 vector z = (scale, bias, x); renorm's r, d held at their values at z0."""
  options, masked = FD_CASES[name]
  options = {**options, "param_dtype": jnp.float64}
  bn, params, state, x = _setup(options, FD_SHAPE, jnp.float64, seed=3)
  mask = (
    np.array([1, 1, 0, 1, 1, 0, 1, 0], bool)[:, None] if masked else None
  )  # 2+ valid per ghost group
  w = _data(FD_SHAPE, seed=12)
  c = FD_SHAPE[-1]

  def unflatten(z):
    return {"scale": z[:c], "bias": z[c : 2 * c]}, z[2 * c :].reshape(FD_SHAPE)

  def jax_loss(z):
    p, xz = unflatten(z)
    y = bn.apply(p, state, xz, training=True, mask=None if mask is None else jnp.asarray(mask))[0]
    return jnp.sum(jnp.sin(y) * w)

  z0 = np.concatenate(
    [np.asarray(params["scale"]), np.asarray(params["bias"]), np.asarray(x).ravel()]
  )
  p0, x0 = unflatten(z0)
  _, groups = _numpy_forward(options, p0, state, x0, mask)
  fixed = [(r, d) for _, _, _, _, r, d in groups]

  def numpy_loss(z):
    p, xz = unflatten(z)
    return np.sum(np.sin(_numpy_forward(options, p, state, xz, mask, fixed)[0]) * w)

  return jax_loss, numpy_loss, z0


def _fd_gradient(f, z, h=1e-5):
  eye = np.eye(z.size)
  return np.array([(f(z + h * e) - f(z - h * e)) / (2 * h) for e in eye])


def _fd_hessian(f, z, h=2e-4):
  n, eye = z.size, np.eye(z.size)
  hess = np.empty((n, n))
  for i in range(n):
    for j in range(i, n):
      ei, ej = h * eye[i], h * eye[j]
      hess[i, j] = hess[j, i] = (
        f(z + ei + ej) - f(z + ei - ej) - f(z - ei + ej) + f(z - ei - ej)
      ) / (4 * h * h)
  return hess


@pytest.mark.parametrize("name", list(FD_CASES))
def test_jvp_and_jacfwd_against_finite_differences(name):
  with jax.enable_x64(True):
    jax_loss, numpy_loss, z0 = _fd_problem(name)
    grad_fd = _fd_gradient(numpy_loss, z0)
    v = _data(z0.shape, seed=13)
    value, directional = jax.jit(lambda z, v: jax.jvp(jax_loss, (z,), (v,)))(z0, v)
    # renorm's r, d come from the float32 running statistics: float32 rounding, ~1e-7 relative.
    tol = 1e-6 if "renorm" in name else 1e-8
    np.testing.assert_allclose(value, numpy_loss(z0), rtol=tol)
    np.testing.assert_allclose(directional, grad_fd @ v, rtol=tol, atol=tol)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(jax_loss))(z0), grad_fd, rtol=tol, atol=tol)
    np.testing.assert_allclose(jax.jit(jax.grad(jax_loss))(z0), grad_fd, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(FD_CASES))
def test_hessian_against_finite_differences(name):
  with jax.enable_x64(True):
    jax_loss, numpy_loss, z0 = _fd_problem(name)
    want = _fd_hessian(numpy_loss, z0)
    tol = 1e-5 * np.max(np.abs(want))
    np.testing.assert_allclose(jax.jit(jax.hessian(jax_loss))(z0), want, atol=tol)  # fwd-over-rev
    np.testing.assert_allclose(jax.jit(jax.jacfwd(jax.jacfwd(jax_loss)))(z0), want, atol=tol)
    np.testing.assert_allclose(jax.jit(jax.jacrev(jax.jacrev(jax_loss)))(z0), want, atol=tol)


def test_jacfwd_of_outputs_matches_jacrev_and_autodiff():
  with jax.enable_x64(True):
    options = {"ghost_batch_size": 4, "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, (8, 2, 3), jnp.float64)
    mask = jnp.asarray(_mask((8, 2, 3)))
    f = lambda x: _closed(bn, state, mask)(params, x)
    g = lambda x: _autodiff(options, state, mask)(params, x)
    jf = jax.jit(jax.jacfwd(f))(x)
    np.testing.assert_allclose(jf, jax.jit(jax.jacrev(f))(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jf, jax.jit(jax.jacfwd(g))(x), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Devices.


def _mesh():
  return jax.make_mesh(
    (8,), ("d",), devices=jax.devices()[:8], axis_types=(jax.sharding.AxisType.Auto,)
  )


@pytest.mark.parametrize(
  "options, check_vma",
  [
    ({}, True),
    ({}, False),
    ({"ghost_batch_size": 2}, True),
    ({"renorm": True}, False),
    ({"axis_index_groups": ((0, 1, 2, 3), (4, 5, 6, 7))}, True),
  ],
)
def test_synchronized_over_8_devices_matches_autodiff(options, check_vma):
  mesh = _mesh()
  with jax.enable_x64(True):
    options = {**options, "axis_name": "d", "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, (32, 3, 4), jnp.float64)
    dy = jnp.asarray(_data(x.shape, seed=4), jnp.float64)
    mask = jnp.asarray(_mask(x.shape))

    def make(closed):
      def inner(p, x, dy, m):
        apply = _closed(bn, state, m) if closed else _autodiff(options, state, m)
        y, pullback = jax.vjp(apply, p, x)
        dparams, dx = pullback(dy)
        if (
          not check_vma
        ):  # per-device gradients of replicated parameters, summed as a trainer would
          dparams = jax.lax.psum(dparams, "d")
        return y, dx, dparams

      return jax.jit(
        jax.shard_map(
          inner,
          mesh=mesh,
          in_specs=(P(), P("d"), P("d"), P("d")),
          out_specs=(P("d"), P("d"), P()),
          check_vma=check_vma,
        )
      )

    got = make(True)(params, x, dy, mask)
    _assert_trees_close(got, make(False)(params, x, dy, mask), rtol=1e-10, atol=1e-11)
    if len(options) == 2:  # one global batch: the single-device BatchNorm of the whole batch
      single = normjax.batch_norm(epsilon=EPS, param_dtype=jnp.float64)
      want_global = _vjp_fn(_closed(single, state, mask))(params, x, dy)
      _assert_trees_close(got, want_global, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
  "groups, check_vma", [(None, True), (None, False), (((0, 1, 2, 3), (4, 5, 6, 7)), True)]
)
def test_jvp_synchronized_over_8_devices_against_finite_differences(groups, check_vma):
  """jax.jvp inside shard_map with axis_name: the tangent of the global (or per-device-group) batch's
  BatchNorm, in x, scale and bias at once, against central differences of the NumPy formula."""
  mesh, shape = _mesh(), (32, 3)
  with jax.enable_x64(True):
    options = {"axis_name": "d", "axis_index_groups": groups, "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, shape, jnp.float64, seed=4)
    mask = _mask(shape, seed=6)
    w = _data(shape, seed=14)
    tangents = (
      {k: jnp.asarray(_data(v.shape, seed=15 + i)) for i, (k, v) in enumerate(params.items())},
      jnp.asarray(_data(shape, seed=17)),
    )

    def inner(p, x, m, dp, dx):
      return jax.jvp(lambda p, x: bn.apply(p, state, x, training=True, mask=m)[0], (p, x), (dp, dx))

    f = jax.jit(
      jax.shard_map(
        inner,
        mesh=mesh,
        in_specs=(P(), P("d"), P("d"), P(), P("d")),
        out_specs=(P("d"), P("d")),
        check_vma=check_vma,
      )
    )
    y, dy = f(params, x, jnp.asarray(mask), *tangents)
    # Groups of 4 devices x 4 rows are consecutive halves of the batch: ghost batches of 16 in NumPy.
    ref_options = {} if groups is None else {"ghost_batch_size": 16}
    numpy_y = lambda t: _numpy_forward(
      ref_options,
      {k: np.asarray(v) + t * np.asarray(tangents[0][k]) for k, v in params.items()},
      state,
      np.asarray(x) + t * np.asarray(tangents[1]),
      mask,
    )[0]
    h = 1e-5
    np.testing.assert_allclose(y, numpy_y(0.0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dy, (numpy_y(h) - numpy_y(-h)) / (2 * h), rtol=1e-7, atol=1e-7)
    loss_tangent = np.sum(np.cos(np.asarray(y)) * w * np.asarray(dy))
    assert abs(loss_tangent) > 1e-3  # a tangent that is not trivially zero


@pytest.mark.parametrize("check_vma", [True, False])
def test_jvp_in_parameters_only_and_in_renorm_state_under_shard_map(check_vma):
  """Tangents in the replicated parameters alone (x constant) and in the running statistics, which reach
  the output only through renorm's stop-gradient r, d (a zero tangent)."""
  mesh, shape = _mesh(), (32, 3)
  with jax.enable_x64(True):
    options = {"axis_name": "d", "renorm": True, "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, shape, jnp.float64, seed=5)
    dparams = {
      k: jnp.asarray(_data(v.shape, seed=20 + i)) for i, (k, v) in enumerate(params.items())
    }

    def inner(p, s, x, dp):
      apply = lambda p, s, x: bn.apply(p, s, x, training=True)[0]
      y, dy_params = jax.jvp(lambda p: apply(p, s, x), (p,), (dp,))
      ds = jax.tree_util.tree_map(jnp.ones_like, s._replace(count=jnp.zeros((), jnp.float32)))
      _, dy_state = jax.jvp(
        lambda m, v: apply(p, s._replace(mean=m, var=v), x), (s.mean, s.var), (ds.mean, ds.var)
      )
      return y, dy_params, dy_state

    f = jax.jit(
      jax.shard_map(
        inner,
        mesh=mesh,
        in_specs=(P(), P(), P("d"), P()),
        out_specs=(P("d"), P("d"), P("d")),
        check_vma=check_vma,
      )
    )
    y, dy_params, dy_state = f(params, state, x, dparams)
    # y = scale·(r·x̂ + d) + bias with r, d constant: the tangent is dscale·(r·x̂ + d) + dbias.
    ry, rgroups = _numpy_forward({"renorm": True}, params, state, x, None)
    _, _, _, xhat, r, d = rgroups[0]
    np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6)
    want = np.asarray(dparams["scale"]) * (r * xhat + d) + np.asarray(dparams["bias"])
    np.testing.assert_allclose(dy_params, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dy_state, np.zeros(shape))
    assert float(np.max(np.abs(want))) > 0.1


def test_jvp_under_pmap_matches_single_device():
  with jax.enable_x64(True):
    bn, params, state, x = _setup(
      {"axis_name": "p", "param_dtype": jnp.float64}, (16, 3), jnp.float64
    )
    single = normjax.batch_norm(epsilon=EPS, param_dtype=jnp.float64)
    dx = jnp.asarray(_data(x.shape, seed=18))
    f = lambda b: (
      lambda x, dx: jax.jvp(lambda x: b.apply(params, state, x, training=True)[0], (x,), (dx,))
    )
    y, dy = jax.pmap(f(bn), axis_name="p")(x.reshape(8, 2, 3), dx.reshape(8, 2, 3))
    want_y, want_dy = jax.jit(f(single))(x, dx)
    np.testing.assert_allclose(y.reshape(x.shape), want_y, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dy.reshape(x.shape), want_dy, rtol=1e-10, atol=1e-11)


def test_vmap_axis_name_matches_autodiff():
  with jax.enable_x64(True):
    options = {"axis_name": "v", "param_dtype": jnp.float64}
    bn, params, state, x = _setup(options, (4, 6, 3), jnp.float64)
    dy = jnp.asarray(_data(x.shape, seed=6), jnp.float64)

    def make(apply):
      def per_member(x, dy):
        y, pullback = jax.vjp(apply, params, x)
        _, tangent = jax.jvp(lambda x: apply(params, x), (x,), (dy,))
        return (y, tangent) + pullback(dy)

      return jax.jit(jax.vmap(per_member, axis_name="v"))

    got = make(_closed(bn, state, None))(x, dy)
    want = make(_autodiff(options, state, None))(x, dy)
    _assert_trees_close(got, want, rtol=1e-10, atol=1e-11)


# ---------------------------------------------------------------------------------------------------
# Forward values and what reverse mode keeps.


def test_forward_is_bitwise_unchanged():
  x = jnp.asarray(_data((16, 8, 8, 32), mean=5.0), jnp.bfloat16)
  bn = normjax.batch_norm(epsilon=EPS)
  params, state = bn.init(x)
  f = _closed(bn, state, None)
  y = jax.jit(f)(params, x)
  want = jax.jit(_autodiff({}, state, None))(params, x)
  y_vjp = jax.jit(lambda p, x: jax.vjp(f, p, x)[0])(params, x)  # the JVP rule's own forward
  y_jvp = jax.jit(lambda p, x: jax.jvp(f, (p, x), (p, x))[0])(params, x)
  for got in (y, y_vjp, y_jvp):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _full_size_residuals(apply, params, x):
  """The leaves of `jax.vjp`'s backward closure (its residuals) with as many elements as `x`."""
  pullback = jax.jit(lambda p, x: jax.vjp(apply, p, x)[1])(params, x)
  leaves = jax.tree_util.tree_leaves(pullback)
  return [leaf for leaf in leaves if np.size(leaf) >= x.size], leaves


@pytest.mark.parametrize("name", ["plain", "masked", "ghost_masked", "renorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reverse_mode_keeps_only_x(name, dtype):
  options, masked = CASES[name]
  shape = (8, 4, 16, 6)  # plain: a shape a TPU runs as the Pallas kernel (its residuals too)
  bn, params, state, x = _setup(options, shape, dtype)
  mask = jnp.asarray(_mask(shape)) if masked else None
  full, leaves = _full_size_residuals(_closed(bn, state, mask), params, x)
  assert len(full) == 1, [(leaf.shape, leaf.dtype) for leaf in full]
  assert full[0].dtype == dtype  # x itself, not a float32 copy or x̂
  np.testing.assert_array_equal(
    np.asarray(full[0], np.float32).reshape(shape), np.asarray(x, np.float32)
  )
  small = sum(np.size(leaf) for leaf in leaves) - x.size
  assert small <= (x.size // shape[-1] if masked else 0) + 64 * shape[-1], small  # mask + vectors
  # Plain autodiff through the statistics keeps more: the test can tell the two apart.
  autodiff_full, _ = _full_size_residuals(_autodiff(options, state, mask), params, x)
  assert len(autodiff_full) >= 2


def test_no_global_switch_left():
  for name in ("enabled", "disabled", "_ENABLED"):
    assert not hasattr(fused_batch_norm, name)
