"""`normjax.batch_norm` and its variants against float64 references written from the papers."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from tests import helpers
from tests import references as ref

EPS = 1e-5


_data = helpers.normal_data


def _params(channels, seed=3):
  rng = np.random.default_rng(seed)
  return {
    "scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=channels), jnp.float32),
  }


def _vjp(bn, params, state, x, dy, **kw):
  """y, new_state and the gradients of <y, dy> w.r.t. x and params."""

  def f(p, x):
    return bn.apply(p, state, x, training=True, **kw)

  (y, new_state), pullback = jax.vjp(f, params, x)
  dparams, dx = pullback((dy, jax.tree_util.tree_map(jnp.zeros_like, new_state)))
  return y, new_state, dx, dparams


@pytest.mark.parametrize(
  "shape, axis", [((16, 5), -1), ((6, 4, 4, 3), -1), ((6, 3, 4, 4), 1), ((4, 3, 5, 2), (1, 3))]
)
def test_training_matches_reference_outputs_and_grads(shape, axis):
  x, dy = _data(shape, mean=4.0, std=2.0), _data(shape, seed=1)
  bn = normjax.batch_norm(axis=axis, epsilon=EPS)
  _, state = bn.init(x)
  feature_axes = (axis,) if isinstance(axis, int) else axis
  feature_axes = tuple(a % len(shape) for a in feature_axes)
  feature_shape = tuple(shape[a] for a in feature_axes)
  params = jax.tree_util.tree_map(
    lambda v: v.reshape(feature_shape), _params(int(np.prod(feature_shape)))
  )
  y, _, dx, dparams = _vjp(bn, params, state, x, dy)
  bshape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
  scale = np.asarray(params["scale"], np.float64).reshape(bshape)
  bias = np.asarray(params["bias"], np.float64).reshape(bshape)
  axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
  want_y, _, _ = ref.batch_norm_train(x, axes, scale, bias, EPS)
  want_dx, want_dscale, want_dbias = ref.batch_norm_train_grads(x, dy, axes, scale, EPS)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    dparams["scale"], want_dscale.reshape(feature_shape), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    dparams["bias"], want_dbias.reshape(feature_shape), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "options",
  [{}, {"ghost_batch_size": 4}, {"renorm": True}, {"use_scale": False, "use_bias": False}],
)
def test_check_grads_float64(options):
  with jax.enable_x64(True):
    x = jnp.asarray(_data((8, 3), mean=1.0, std=2.0), jnp.float64)
    bn = normjax.batch_norm(param_dtype=jnp.float64, **options)
    params, state = bn.init(x)
    state = state._replace(mean=state.mean + 0.3)  # renorm's r, d away from their clip limits
    f = lambda p, x: bn.apply(p, state, x, training=True)[0]
    if options.get(
      "renorm"
    ):  # r and d are stop_gradient'ed: finite differences in x would see them
      check_grads(lambda p: f(p, x), (params,), order=1, modes=["rev"])
    else:
      check_grads(f, (params, x), order=1, modes=["rev"])
    check_grads(lambda x: bn.apply(params, state, x, training=False)[0], (x,), order=2)


@pytest.mark.parametrize("momentum, debias", [(0.9, False), (0.5, True), (None, False)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_running_statistics_after_several_steps(momentum, debias, unbiased):
  bn = normjax.batch_norm(momentum=momentum, debias=debias, unbiased_running_var=unbiased)
  batches = [
    _data((6, 2, 3), mean=m, std=s, seed=i)
    for i, (m, s) in enumerate([(1.0, 1.0), (3.0, 2.0), (-2.0, 0.5), (0.5, 3.0)])
  ]
  params, state = bn.init(batches[0])
  step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
  for x in batches:
    state = step(state, x)
  n = 12
  batch_means = [b.astype(np.float64).mean((0, 1)) for b in batches]
  batch_vars = [
    b.astype(np.float64).var((0, 1)) * (n / (n - 1) if unbiased else 1) for b in batches
  ]
  want_mean = ref.running_statistics(batch_means, np.zeros(3), momentum, debias)[-1]
  want_var = ref.running_statistics(batch_vars, np.ones(3), momentum, debias)[-1]
  np.testing.assert_allclose(state.mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, want_var, rtol=1e-5)
  assert int(state.count) == 4


def test_eval_uses_running_statistics_and_keeps_state():
  x = _data((10, 3), mean=2.0)
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  state = normjax.BatchNormState(
    jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 0.25, 1.0]), jnp.array(7, jnp.int32)
  )
  y, new_state = bn.apply(params, state, x, training=False)
  np.testing.assert_allclose(
    y, (x - np.array([1.0, 2.0, 3.0])) / np.sqrt([4.0 + EPS, 0.25 + EPS, 1 + EPS]), rtol=1e-5
  )
  assert new_state is state


@pytest.mark.parametrize("with_mask", [False, True])
def test_ghost_batch_norm_equals_per_group_batch_norm(with_mask):
  x, dy = _data((12, 3, 2), mean=3.0, std=2.0), _data((12, 3, 2), seed=5)
  bn = normjax.ghost_batch_norm(4, momentum=0.8)
  params = _params(2)
  _, state = bn.init(x)
  mask = None
  if with_mask:
    mask = np.ones((12, 1, 1), bool)
    mask[[1, 5, 6]] = False
    dy = dy * mask  # a loss ignores padded examples (their outputs are still normalized)
  y, new_state, dx, _ = _vjp(
    bn, params, state, x, dy, mask=None if mask is None else jnp.asarray(mask)
  )
  scale, bias = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
  means, variances, counts = [], [], []
  for g in range(3):
    sl = slice(4 * g, 4 * g + 4)
    xg, dyg = x[sl], dy[sl]
    if mask is not None:
      valid = mask[sl, 0, 0]
      xg_valid, dyg = xg[valid], dyg[valid]
    else:
      valid, xg_valid = np.ones(4, bool), xg
    want_y, m, v = ref.batch_norm_train(xg_valid, (0, 1), scale, bias, EPS)
    want_dx, _, _ = ref.batch_norm_train_grads(xg_valid, dyg, (0, 1), scale, EPS)
    np.testing.assert_allclose(np.asarray(y)[sl][valid], want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx)[sl][valid], want_dx, rtol=1e-4, atol=1e-5)
    means.append(m.ravel()), variances.append(v.ravel()), counts.append(valid.sum() * 3)
  w = np.array(counts, np.float64)[:, None] / sum(counts)
  np.testing.assert_allclose(
    new_state.mean, 0.2 * (w * np.array(means)).sum(0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(new_state.var, 0.8 + 0.2 * (w * np.array(variances)).sum(0), rtol=1e-5)


def _renorm_reference(x, dy, params, state, r_max, d_max):
  axes = (0,)
  x64 = x.astype(np.float64)
  mean, var = x64.mean(0), x64.var(0)
  sigma_b = np.sqrt(var + EPS)
  sigma = np.sqrt(np.asarray(state.var, np.float64) + EPS)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - np.asarray(state.mean, np.float64)) / sigma, -d_max, d_max)
  gamma, beta = np.asarray(params["scale"], np.float64), np.asarray(params["bias"], np.float64)
  xhat = (x64 - mean) / sigma_b
  y = gamma * (xhat * r + d) + beta
  dx, _, dbias = ref.batch_norm_train_grads(x, dy, axes, gamma, EPS, r=r)
  dscale = (dy * (xhat * r + d)).sum(0)
  return y, dx, dscale, dbias.ravel(), mean, var


@pytest.mark.parametrize("r_max, d_max", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)])
def test_batch_renorm_matches_paper_equations_over_steps(r_max, d_max):
  bn = normjax.batch_renorm(r_max=r_max, d_max=d_max, momentum=0.7)
  params = _params(4)
  _, state = bn.init(_data((16, 4)))
  for step in range(3):
    x, dy = (
      _data((16, 4), mean=1.0 + step, std=0.5 + step, seed=step),
      _data((16, 4), seed=9 + step),
    )
    y, new_state, dx, dparams = _vjp(bn, params, state, x, dy)
    want_y, want_dx, want_dscale, want_dbias, mean, var = _renorm_reference(
      x, dy, params, state, r_max, d_max
    )
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], want_dscale, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], want_dbias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.mean, 0.7 * np.asarray(state.mean) + 0.3 * mean, rtol=1e-5)
    # Ioffe 2017, Alg. 1: the moving average is of σ = sqrt(σ² + ε); the state keeps σ² − ε
    sigma = 0.7 * np.sqrt(np.asarray(state.var, np.float64) + EPS) + 0.3 * np.sqrt(var + EPS)
    np.testing.assert_allclose(new_state.var, sigma**2 - EPS, rtol=1e-5)
    state = new_state


def test_renorm_with_unit_clipping_equals_batch_norm():
  x, dy = _data((16, 2, 3), mean=2.0, std=3.0), _data((16, 2, 3), seed=2)
  params = _params(3)
  plain, renorm = normjax.batch_norm(), normjax.batch_renorm(r_max=1.0, d_max=0.0)
  _, state = plain.init(x)
  state = state._replace(mean=state.mean + 5.0, var=state.var * 9.0)
  y1, s1, dx1, dp1 = _vjp(plain, params, state, x, dy)
  y2, s2, dx2, dp2 = _vjp(renorm, params, state, x, dy)
  np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx1, dx2, rtol=1e-6, atol=1e-6)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(dp1[k], dp2[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s1.mean, s2.mean, rtol=1e-7)
  batch_var = x.astype(np.float64).var((0, 1))  # renorm averages σ, plain BN σ²: the states differ
  sigma = 0.99 * np.sqrt(9.0 + EPS) + 0.01 * np.sqrt(batch_var + EPS)
  np.testing.assert_allclose(s2.var, sigma**2 - EPS, rtol=1e-6)
  np.testing.assert_allclose(s1.var, 0.99 * 9.0 + 0.01 * batch_var, rtol=1e-6)


def test_renorm_paper_schedule():
  clip = normjax.batch_renorm_paper_schedule()
  np.testing.assert_allclose(
    [clip.r_max(s) for s in (0, 5000, 22500, 40000, 90000)], [1.0, 1.0, 2.0, 3.0, 3.0], rtol=1e-6
  )
  np.testing.assert_allclose(
    [clip.d_max(s) for s in (0, 5000, 15000, 25000, 90000)], [0.0, 0.0, 2.5, 5.0, 5.0], rtol=1e-6
  )
  bn = normjax.batch_renorm(**clip._asdict())
  x = _data((8, 2), mean=3.0)
  params, state = bn.init(x)
  y, _ = jax.jit(lambda s, x: bn.apply(params, s, x, training=True))(state, x)
  # at step 0, r_max = 1 and d_max = 0: plain BatchNorm
  np.testing.assert_allclose(
    y, ref.batch_norm_train(x, (0,), 1.0, 0.0, EPS)[0], rtol=1e-5, atol=1e-5
  )
  late = state._replace(count=jnp.array(40000, jnp.int32))
  y_late, _ = bn.apply(params, late, x, training=True)
  assert not np.allclose(y_late, y, atol=1e-2)  # now d ≠ 0 moves the output


def test_half_precision_input_keeps_float32_state():
  x = jnp.asarray(_data((32, 4, 4, 8), mean=100.0, std=3.0), jnp.bfloat16)
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  y, new_state = bn.apply(params, state, x, training=True)
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in (new_state.mean, new_state.var))
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(new_state.mean, 0.01 * x64.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(new_state.var, 0.99 + 0.01 * x64.var((0, 1, 2)), rtol=1e-5)
  want = ref.batch_norm_train(x64, (0, 1, 2), 1.0, 0.0, EPS)[0]
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.04)
  y32, _ = normjax.batch_norm(dtype=jnp.float32).apply(params, state, x, training=True)
  assert y32.dtype == jnp.float32


VARIANTS = {
  "plain": dict(),
  "fast": dict(stats_method="fast"),
  "two_pass": dict(stats_method="two_pass"),
  "ghost": dict(ghost_batch_size=4),
  "renorm": dict(renorm=True),
  "renorm_schedule": dict(renorm=True, **normjax.batch_renorm_paper_schedule()._asdict()),
  "cumulative_unbiased": dict(momentum=None, unbiased_running_var=True),
  "debias": dict(debias=True),
  "axes_1_3": dict(axis=(1, 3)),
  "no_affine": dict(use_scale=False, use_bias=False),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registry_jit_eager_retrace_and_state_structure(name):
  bn = normjax.batch_norm(**VARIANTS[name])
  x = jnp.asarray(_data((8, 3, 2, 4), mean=1.0))
  params, state = bn.init(x)
  traces = []

  def step(params, state, x):
    traces.append(1)
    return bn.apply(params, state, x, training=True)

  jitted = jax.jit(step)
  y_jit, s_jit = jitted(params, state, x)
  y_eager, s_eager = bn.apply(params, state, x, training=True)
  np.testing.assert_allclose(y_jit, y_eager, rtol=1e-5, atol=1e-5)
  for a, b in zip(s_jit, s_eager):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  y2, s2 = jitted(params, s_jit, x + 1.0)
  assert len(traces) == 1, "a second call with the same shapes retraced"
  same = lambda a, b: (
    jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    and all(
      (u.shape, u.dtype) == (v.shape, v.dtype)
      for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )
  )
  assert same(state, s2) and type(s2) is normjax.BatchNormState
  assert np.isfinite(np.asarray(y2)).all()
  grads = jax.grad(lambda p, x: jnp.sum(bn.apply(p, state, x, training=True)[0] ** 3), (0, 1))(
    params, x
  )
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


@hypothesis.settings(max_examples=12)
@hypothesis.given(
  batch_groups=st.integers(1, 3),
  group=st.integers(2, 5),
  spatial=st.integers(1, 3),
  channels=st.integers(1, 4),
  ghost=st.booleans(),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  offset=st.sampled_from([0.0, 50.0]),
)
def test_property_each_group_has_mean_beta_and_std_gamma(
  batch_groups, group, spatial, channels, ghost, dtype, offset
):
  n = batch_groups * group
  x = jnp.asarray(_data((n, spatial, channels), mean=offset, std=2.0, seed=n), dtype)
  bn = normjax.batch_norm(
    ghost_batch_size=group if ghost else None, epsilon=1e-8, dtype=jnp.float32
  )
  params = _params(channels)
  _, state = bn.init(x)
  y, _ = bn.apply(params, state, x, training=True)
  y = np.asarray(y, np.float64).reshape((batch_groups if ghost else 1, -1, channels))
  x_groups = np.asarray(x.astype(jnp.float32), np.float64).reshape(y.shape)
  beta, gamma = np.asarray(params["bias"]), np.asarray(params["scale"])
  tol = 1e-4 if dtype == jnp.float32 else 1e-2
  for yg, xg in zip(y, x_groups):
    np.testing.assert_allclose(yg.mean(0), beta, atol=tol * 10)
    nonconstant = xg.std(0) > 1e-3
    np.testing.assert_allclose(yg.std(0)[nonconstant], gamma[nonconstant], rtol=tol * 10)
