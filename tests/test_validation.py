"""normjax._src.validation: the argument checks every transform shares; each error names the argument,
the value received and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src import validation


@pytest.mark.parametrize(
  "axes, ndim, want",
  [
    (-1, 4, (3,)),
    (0, 1, (0,)),
    ((3, 1), 4, (1, 3)),
    ([-1, -3], 4, (1, 3)),
    (np.int64(2), 3, (2,)),
    ((np.int32(0), -2), 3, (0, 1)),
    ((), 2, ()),
  ],
)
def test_normalize_axes_returns_sorted_non_negative_ints(axes, ndim, want):
  got = validation.normalize_axes(axes, ndim, "axis")
  assert got == want and all(type(a) is int for a in got)


@pytest.mark.parametrize(
  "axes, ndim, error, match",
  [
    (
      4,
      4,
      ValueError,
      r"axis=4 is out of range for an input of rank 4: each axis must lie in \[-4, 3\]",
    ),
    (
      -3,
      2,
      ValueError,
      r"axis=-3 is out of range for an input of rank 2: each axis must lie in \[-2, 1\]",
    ),
    ((1, -2), 3, ValueError, r"axis=\(1, -2\) repeats an axis"),
    ((0, 0), 2, ValueError, r"axis=\(0, 0\) repeats an axis"),
    (1.0, 2, TypeError, r"axis=1.0 must be an int or a sequence of ints"),
    ((0, True), 2, TypeError, r"axis=\(0, True\) must be an int or a sequence of ints"),
    (("a",), 2, TypeError, r"axis=\('a',\) must be an int"),
  ],
)
def test_normalize_axes_errors_name_the_argument_and_value(axes, ndim, error, match):
  with pytest.raises(error, match=match):
    validation.normalize_axes(axes, ndim, "axis")


def test_normalize_axes_uses_the_given_name():
  with pytest.raises(ValueError, match=r"^feature_axes=5 is out of range"):
    validation.normalize_axes(5, 2, "feature_axes")


@pytest.mark.parametrize(
  "x",
  [
    np.ones(3, np.float32),
    jnp.ones(3, jnp.bfloat16),
    jnp.ones(3, jnp.float16),
    np.ones(2, np.float64),
    jax.ShapeDtypeStruct((2, 3), jnp.float32),
    1.0,
  ],
)
def test_check_float_input_accepts_floats(x):
  assert validation.check_float_input(x) is None


@pytest.mark.parametrize(
  "x, dtype",
  [
    (np.ones(3, np.int32), "int32"),
    (jnp.ones(3, bool), "bool"),
    (np.ones(3, np.uint8), "uint8"),
    (jax.ShapeDtypeStruct((2,), jnp.int8), "int8"),
    (np.ones(3, np.complex64), "complex64"),
  ],
)
def test_check_float_input_refuses_other_dtypes(x, dtype):
  with pytest.raises(
    TypeError, match=rf"^reference has dtype {dtype}; normalization needs a floating-point"
  ):
    validation.check_float_input(x, "reference")


def test_prepare_mask_none_and_full_rank_pass_through():
  assert validation.prepare_mask(None, (4, 3)) is None
  mask = np.array([[True], [False], [True], [True]])
  got = validation.prepare_mask(mask, (4, 3))
  assert got.dtype == jnp.bool_ and got.shape == (4, 1)
  np.testing.assert_array_equal(got, mask)
  full = np.random.default_rng(0).random((2, 3, 3, 1)) < 0.5
  np.testing.assert_array_equal(validation.prepare_mask(full, (2, 3, 3, 5)), full)


def test_prepare_mask_reads_a_1d_mask_as_one_flag_per_example():
  got = validation.prepare_mask(jnp.array([True, False]), (2, 3, 4))
  assert got.shape == (2, 1, 1)
  np.testing.assert_array_equal(got[:, 0, 0], [True, False])
  assert validation.prepare_mask(np.array([True, False, True]), (3,)).shape == (3,)


@pytest.mark.parametrize(
  "mask, shape, error, match",
  [
    (
      np.ones((4, 3), np.float32),
      (4, 3),
      TypeError,
      r"mask has dtype float32; expected a boolean array \(True = valid\)",
    ),
    (
      np.ones(3, bool),
      (4, 3),
      ValueError,
      r"mask of shape \(3,\) does not broadcast to x of shape \(4, 3\): a 1-D mask is one flag per "
      r"example along axis 0 and needs shape \(4,\)",
    ),
    (
      np.ones((4, 3), bool),
      (4, 2, 3),
      ValueError,
      r"mask of shape \(4, 3\) does not broadcast to x of shape \(4, 2, 3\): a mask needs x's rank 3 .* "
      "masks are not right-aligned",
    ),
    (
      np.ones((4, 2), bool),
      (4, 3),
      ValueError,
      r"mask of shape \(4, 2\) does not broadcast to x of shape \(4, 3\): each dimension must be 1 or x's",
    ),
  ],
)
def test_prepare_mask_errors(mask, shape, error, match):
  with pytest.raises(error, match=match):
    validation.prepare_mask(mask, shape)


def test_prepare_mask_uses_the_given_name():
  with pytest.raises(TypeError, match=r"^reference_mask has dtype int32"):
    validation.prepare_mask(np.ones(2, np.int32), (2, 3), "reference_mask")


@pytest.mark.parametrize(
  "value",
  [
    0,
    3,
    0.5,
    -2.5,
    np.float32(0.9),
    np.float64(0.1),
    np.int64(2),
    np.array(0.9),
    jnp.float32(0.9),
    jnp.array(0.99),
    jnp.array(3, jnp.int32),
  ],
  ids=repr,
)
def test_is_real_scalar_accepts_concrete_real_numbers(value):
  assert validation.is_real_scalar(value)


@pytest.mark.parametrize(
  "value",
  [
    True,
    np.bool_(False),
    jnp.array(True),
    "0.9",
    None,
    [0.9],
    np.array([0.9]),
    jnp.ones((1,)),
    1 + 2j,
    np.complex64(1),
    jnp.array(1 + 1j),
  ],
  ids=repr,
)
def test_is_real_scalar_refuses_everything_else(value):
  assert not validation.is_real_scalar(value)


def test_is_real_scalar_refuses_a_tracer():
  seen = []
  jax.jit(lambda m: seen.append(validation.is_real_scalar(m)) or m)(0.9)
  assert seen == [False]


@pytest.mark.parametrize(
  "momentum",
  [None, 0.0, 0.9, 0.999, np.float32(0.9), np.float64(0.99), jnp.float32(0.9), jnp.array(0.5), 0],
  ids=repr,
)
def test_check_momentum_accepts_numbers_in_0_1(momentum):
  assert validation.check_momentum(momentum) is None


@pytest.mark.parametrize(
  "momentum, shown",
  [
    (1.0, "1.0"),
    (-0.1, "-0.1"),
    (np.float32(1.5), "1.5"),
    (jnp.array(1.0), "Array"),
    (True, "True"),
    ("0.9", "'0.9'"),
    (np.array([0.9]), "array"),
  ],
  ids=repr,
)
def test_check_momentum_refuses_the_rest(momentum, shown):
  with pytest.raises(
    ValueError,
    match=rf"momentum=.*{shown}.* must be a number in \[0, 1\) \(the weight "
    "of the old running value\\), or None for a cumulative average",
  ):
    validation.check_momentum(momentum)


@pytest.mark.parametrize("value", [1e-5, 1, np.float32(0.5), jnp.array(2.0)], ids=repr)
def test_check_positive_accepts_positive_numbers(value):
  assert validation.check_positive(value, "epsilon") is None


@pytest.mark.parametrize("value", [0.0, -1e-5, None, "1e-5", True], ids=repr)
def test_check_positive_refuses_the_rest(value):
  with pytest.raises(ValueError, match=r"^epsilon=.* must be a positive number"):
    validation.check_positive(value, "epsilon")


def test_check_array():
  validation.check_array(jnp.ones(3), (3,), jnp.float32, "state.mean")
  with pytest.raises(
    ValueError,
    match=r"state.mean has shape \(4,\) and dtype float32; expected shape "
    r"\(3,\) and dtype float32 to match x",
  ):
    validation.check_array(jnp.ones(4), (3,), jnp.float32, "state.mean")
  with pytest.raises(
    ValueError, match=r"has shape \(3,\) and dtype bfloat16; expected .* dtype float32"
  ):
    validation.check_array(jnp.ones(3, jnp.bfloat16), (3,), jnp.float32, "state.mean")
