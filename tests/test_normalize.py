"""normjax._src.normalize: `(x - mean) * scale / sqrt(var + eps) + bias` against the float64 formula
(Ioffe & Szegedy 2015, arXiv:1502.03167, Alg. 1, the normalize-scale-shift step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax._src import normalize as normalize_lib
from tests import helpers

EPS = 1e-5


def _reference(x, mean, var, scale, bias, eps):
  x, mean, var = (np.asarray(a, np.float64) for a in (x, mean, var))
  y = (x - mean) / np.sqrt(var + eps)
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def _operands(shape, feature_shape, seed=0):
  x = helpers.normal_data(shape, mean=3.0, std=2.0, seed=seed)
  mean = helpers.normal_data(feature_shape, mean=3.0, seed=seed + 1)
  var = np.abs(helpers.normal_data(feature_shape, mean=4.0, seed=seed + 2)) + 0.1
  scale = helpers.normal_data(feature_shape, mean=1.0, std=0.3, seed=seed + 3)
  bias = helpers.normal_data(feature_shape, seed=seed + 4)
  return x, mean, var, scale, bias


def test_public_name_is_the_kernel():
  assert normjax.normalize is normalize_lib.normalize


@pytest.mark.parametrize(
  "shape, feature_shape",
  [
    ((16, 5), (5,)),  # dense: per-feature vectors broadcast from the right
    ((4, 3, 3, 6), (1, 1, 1, 6)),  # conv NHWC, keepdims statistics
    ((4, 6, 3, 3), (1, 6, 1, 1)),  # conv NCHW
    ((4, 3, 5), (4, 1, 5)),  # per-example statistics (layer-norm style)
  ],
)
def test_matches_the_float64_formula(shape, feature_shape):
  x, mean, var, scale, bias = _operands(shape, feature_shape)
  y = normjax.normalize(
    jnp.asarray(x),
    jnp.asarray(mean),
    jnp.asarray(var),
    jnp.asarray(scale),
    jnp.asarray(bias),
    epsilon=EPS,
  )
  assert y.shape == shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _reference(x, mean, var, scale, bias, EPS), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("use_scale, use_bias", [(False, True), (True, False), (False, False)])
def test_scale_or_bias_none_means_one_or_zero(use_scale, use_bias):
  x, mean, var, scale, bias = _operands((8, 4), (4,))
  scale, bias = (scale if use_scale else None), (bias if use_bias else None)
  y = normjax.normalize(
    jnp.asarray(x),
    mean,
    var,
    None if scale is None else jnp.asarray(scale),
    None if bias is None else jnp.asarray(bias),
    epsilon=EPS,
  )
  want = _reference(x, mean, var, scale, bias, EPS)
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)
  if (
    not use_scale and not use_bias
  ):  # plain standardization: zero mean, unit variance when var is exact
    x64 = x.astype(np.float64)
    z = normjax.normalize(
      jnp.asarray(x),
      jnp.asarray(x64.mean(0), jnp.float32),
      jnp.asarray(x64.var(0), jnp.float32),
      None,
      None,
      epsilon=EPS,
    )
    np.testing.assert_allclose(np.asarray(z, np.float64).mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(
      np.asarray(z, np.float64).var(0), x64.var(0) / (x64.var(0) + EPS), rtol=1e-5
    )


def test_epsilon_enters_under_the_square_root():
  x = jnp.array([[2.0], [4.0]])
  mean, var = jnp.array([3.0]), jnp.array([0.0])
  for eps in (1e-5, 1e-3, 0.25):
    y = normjax.normalize(x, mean, var, None, None, epsilon=eps)
    np.testing.assert_allclose(y[:, 0], [-1 / np.sqrt(eps), 1 / np.sqrt(eps)], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_input_is_computed_in_float32(dtype):
  # mean 1000, std 1: forming x - mean in bfloat16 would lose every digit of the deviation (bfloat16
  # spacing at 1000 is 4); the kernel upcasts first and rounds only the output.
  x32 = helpers.normal_data((64, 3), mean=1000.0, std=8.0, seed=3)
  x = jnp.asarray(x32, dtype)
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var = xf.mean(0), xf.var(0)
  y = normjax.normalize(
    x, jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32), None, None, epsilon=EPS
  )
  assert y.dtype == dtype
  want = _reference(xf, mean, var, None, None, EPS)
  # only the final rounding to `dtype` remains: half a unit in the last place of |y| <= ~3
  ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  np.testing.assert_array_less(
    np.abs(np.asarray(y, np.float64) - want), 2 * ulp * (np.abs(want) + 1)
  )
  y32 = normjax.normalize(
    x,
    jnp.asarray(mean, jnp.float32),
    jnp.asarray(var, jnp.float32),
    None,
    None,
    epsilon=EPS,
    dtype=jnp.float32,
  )
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, want, rtol=1e-4, atol=1e-4)


def test_dtype_argument_sets_only_the_output_dtype():
  x, mean, var, scale, bias = _operands((8, 4), (4,))
  args = (
    jnp.asarray(x),
    jnp.asarray(mean),
    jnp.asarray(var),
    jnp.asarray(scale),
    jnp.asarray(bias),
  )
  y = normjax.normalize(*args, epsilon=EPS)
  y16 = normjax.normalize(*args, epsilon=EPS, dtype=jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y16, y.astype(jnp.bfloat16))  # one rounding of the float32 result


def test_half_precision_statistics_and_parameters_are_upcast():
  x, mean, var, scale, bias = _operands((8, 4), (4,))
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  y = normjax.normalize(jnp.asarray(x), bf(mean), bf(var), bf(scale), bf(bias), epsilon=EPS)
  assert y.dtype == jnp.float32  # x's dtype, not the statistics'
  as64 = lambda a: np.asarray(bf(a).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(
    y, _reference(x, as64(mean), as64(var), as64(scale), as64(bias), EPS), rtol=2e-6, atol=2e-6
  )


def test_float64_input_is_computed_and_returned_in_float64():
  x, mean, var, scale, bias = _operands((8, 4), (4,))
  x64 = x.astype(np.float64) + 1e-9  # a perturbation float32 cannot represent
  with jax.enable_x64(True):
    y = normjax.normalize(
      jnp.asarray(x64),
      jnp.asarray(mean, jnp.float64),
      jnp.asarray(var, jnp.float64),
      jnp.asarray(scale, jnp.float64),
      jnp.asarray(bias, jnp.float64),
      epsilon=EPS,
    )
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(
      y, _reference(x64, mean, var, scale, bias, EPS), rtol=1e-13, atol=1e-13
    )


def test_jit_grad_and_vmap_agree_with_the_formula():
  x, mean, var, scale, bias = _operands((6, 3), (3,))
  f = lambda x, m, v, s, b: normjax.normalize(x, m, v, s, b, epsilon=EPS)
  args = tuple(jnp.asarray(a) for a in (x, mean, var, scale, bias))
  np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-6, atol=1e-6)
  # d/dx sum(y) = scale / sqrt(var + eps); d/dvar sum(y) = -1/2 scale sum(x - mean) (var + eps)^(-3/2)
  gx, gv = jax.grad(lambda x, v: f(x, args[1], v, args[3], args[4]).sum(), (0, 1))(args[0], args[2])
  v64, s64 = var.astype(np.float64), scale.astype(np.float64)
  np.testing.assert_allclose(gx, np.broadcast_to(s64 / np.sqrt(v64 + EPS), x.shape), rtol=1e-5)
  want_gv = -0.5 * s64 * (x.astype(np.float64) - mean).sum(0) * (v64 + EPS) ** -1.5
  np.testing.assert_allclose(gv, want_gv, rtol=1e-4, atol=1e-6)
  per_row = jax.vmap(f, in_axes=(0, None, None, None, None))(*args)
  np.testing.assert_allclose(per_row, f(*args), rtol=1e-6, atol=1e-6)
