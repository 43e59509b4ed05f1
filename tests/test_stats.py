"""Tests of `normjax.moments`, the one statistics kernel, against float64 NumPy."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from normjax._src import compat
from tests import helpers

METHODS = ("shifted", "two_pass", "fast")


_data = helpers.normal_data


def _rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want)))


@pytest.mark.parametrize("mean", [0.0, 1e2, 1e3, 1e4])
def test_shifted_variance_is_accurate_for_large_means(mean):
  x = _data((256, 8, 8, 16), mean=mean)
  want = x.astype(np.float64).var(axis=(0, 1, 2))
  _, var = normjax.moments(jnp.asarray(x), (0, 1, 2))
  assert _rel_err(var, want) <= 1e-4


def test_fast_variance_loses_precision_where_shifted_does_not():
  x = _data((256, 8, 8, 16), mean=1e4)
  want = x.astype(np.float64).var(axis=(0, 1, 2))
  _, fast = normjax.moments(jnp.asarray(x), (0, 1, 2), method="fast")
  _, two_pass = normjax.moments(jnp.asarray(x), (0, 1, 2), method="two_pass")
  assert _rel_err(fast, want) > 1e-2
  # two_pass's error is the float32 rounding of XLA's CPU sums of 16,384 terms, so it depends on jaxlib:
  # measured 1.05e-6 with jaxlib 0.10.2, 1.34e-5 with 0.7.0 and 0.8.1 (compat.OLD_CPU_REDUCTIONS)
  assert _rel_err(two_pass, want) <= (3e-5 if compat.OLD_CPU_REDUCTIONS else 1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("axes", [0, (0, 1), (1, 2), (0, 2)])
def test_matches_numpy(method, axes):
  x = _data((6, 5, 4), mean=3.0, std=2.0)
  mean, var = normjax.moments(jnp.asarray(x), axes, method=method)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_keepdims_and_float32_output_for_half_input(method):
  x = jnp.asarray(_data((8, 3, 4)), jnp.bfloat16)
  mean, var = normjax.moments(x, (0, 1), method=method, keepdims=True)
  assert mean.shape == var.shape == (1, 1, 4)
  assert mean.dtype == var.dtype == jnp.float32
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(var[0, 0], x64.var(axis=(0, 1)), rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask_shape", [(10, 1, 1), (10, 6, 1), (10, 6, 3)])
def test_masked_elements_do_not_count(method, mask_shape):
  x = _data((10, 6, 3), mean=50.0, std=3.0)
  mask = np.random.default_rng(1).random(mask_shape) < 0.6
  mask[0] = True  # at least one valid element per feature
  mean, var = normjax.moments(jnp.asarray(x), (0, 1), mask=jnp.asarray(mask), method=method)
  full = np.broadcast_to(mask, x.shape)
  for c in range(3):
    valid = x[..., c][full[..., c]].astype(np.float64)
    np.testing.assert_allclose(mean[c], valid.mean(), rtol=1e-6)
    np.testing.assert_allclose(var[c], valid.var(), rtol=1e-3 if method == "fast" else 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_feature_with_no_valid_element_gets_zeros_not_nan(method):
  x = jnp.asarray(_data((4, 2)))
  mask = jnp.array([[True, False]] * 4)
  mean, var = normjax.moments(x, 0, mask=mask, method=method)
  assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(var)).all()
  assert float(mean[1]) == 0.0 and float(var[1]) == 0.0
  grad = jax.grad(lambda x: normjax.moments(x, 0, mask=mask, method=method)[1].sum())(x)
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("method", ["shifted", "two_pass"])
def test_gradients(method):
  x = jnp.asarray(_data((5, 3), mean=2.0))
  fn = lambda x: normjax.moments(x, 0, method=method)
  check_grads(fn, (x,), order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)
  # exact: d var / dx_i = 2 (x_i - mean) / n and d mean / dx_i = 1 / n
  dvar = jax.grad(lambda x: fn(x)[1].sum())(x)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(dvar, 2 * (x64 - x64.mean(0)) / 5, rtol=1e-5, atol=1e-6)
  dmean = jax.grad(lambda x: fn(x)[0].sum())(x)
  np.testing.assert_allclose(dmean, np.full((5, 3), 0.2), rtol=1e-6)


def test_float64_input_accumulates_in_float64():
  with jax.enable_x64(True):
    x = jnp.asarray(_data((7, 3), mean=1.0, dtype=np.float64))
    mean, var = normjax.moments(x, 0)
    assert var.dtype == jnp.float64
    np.testing.assert_allclose(var, np.asarray(x).var(0), rtol=1e-12)
    check_grads(lambda x: normjax.moments(x, 0), (x,), order=2, modes=["fwd", "rev"])


def test_merge_moments_equals_statistics_of_the_union():
  a, b = _data((7, 3), mean=5.0, seed=1), _data((11, 3), mean=-2.0, seed=2)
  ma, va = normjax.moments(jnp.asarray(a), 0)
  mb, vb = normjax.moments(jnp.asarray(b), 0)
  n, mean, var = normjax.merge_moments(7.0, ma, va, 11.0, mb, vb)
  both = np.concatenate([a, b]).astype(np.float64)
  assert float(n) == 18.0
  np.testing.assert_allclose(mean, both.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, both.var(0), rtol=1e-5)


@hypothesis.settings(max_examples=15)
@hypothesis.given(
  data=st.data(),
  shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
  method=st.sampled_from(METHODS),
  offset=st.sampled_from([0.0, 10.0, -300.0]),
)
def test_property_matches_float64_reference(data, shape, method, offset):
  ndim = len(shape)
  axes = data.draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
  dtype = data.draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
  x = jnp.asarray(_data(shape, mean=offset, seed=len(axes)), dtype)
  mean, var = normjax.moments(x, tuple(axes), method=method)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  want_var = x64.var(axis=tuple(axes))
  assert mean.dtype == jnp.float32
  np.testing.assert_allclose(mean, x64.mean(axis=tuple(axes)), rtol=1e-5, atol=1e-5)
  # "fast" cancels catastrophically: its error grows like float32 eps * mean^2, the others' do not.
  atol = 1e-6 * (offset**2 + 1.0) if method == "fast" else 1e-6
  np.testing.assert_allclose(var, want_var, rtol=1e-4, atol=atol)
  jitted = jax.jit(lambda x: normjax.moments(x, tuple(axes), method=method))(x)
  np.testing.assert_allclose(jitted[1], var, rtol=1e-4, atol=atol)


@pytest.mark.parametrize(
  "bad, error, match",
  [
    (dict(x=jnp.arange(6).reshape(2, 3)), TypeError, "floating-point"),
    (dict(x=jnp.ones((2, 3), bool)), TypeError, "floating-point"),
    (dict(axes=3), ValueError, r"axes=3 is out of range .* rank 2"),
    (dict(axes=(0, -2)), ValueError, "repeats"),
    (dict(method="welford"), ValueError, "method='welford'"),
    (dict(mask=jnp.ones((3, 3), bool)), ValueError, r"mask of shape \(3, 3\) does not broadcast"),
    (dict(mask=jnp.ones((2, 3))), TypeError, "mask has dtype float32"),
    (dict(axis_index_groups=[[0], [1]]), ValueError, "needs axis_name"),
  ],
)
def test_bad_input_raises(bad, error, match):
  kwargs = dict(x=jnp.ones((2, 3)), axes=0)
  kwargs.update(bad)
  x, axes = kwargs.pop("x"), kwargs.pop("axes")
  with pytest.raises(error, match=match):
    normjax.moments(x, axes, **kwargs)
