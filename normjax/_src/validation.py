"""Argument checks shared by every transform: they raise at trace time with messages that name the
argument, the value received and what was expected."""

from typing import Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

Axes = Union[int, Sequence[int]]


def normalize_axes(axes: Axes, ndim: int, name: str) -> Tuple[int, ...]:
  """Returns `axes` as a sorted tuple of non-negative ints, or raises ValueError."""
  axes_tuple = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  out = []
  for a in axes_tuple:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise TypeError(f"{name}={axes!r} must be an int or a sequence of ints")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axes!r} is out of range for an input of rank {ndim}: "
          f"each axis must lie in [{-ndim}, {ndim - 1}]")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axes!r} repeats an axis")
  return tuple(sorted(out))


def check_float_input(x, name: str = "x") -> None:
  """Raises TypeError unless `x` has a floating-point dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} has dtype {dtype}; normalization needs a floating-point input "
        f"(float32, bfloat16, float16 or float64). Cast it first, e.g. x.astype(jnp.float32)")


def prepare_mask(mask, shape: Tuple[int, ...], name: str = "mask"):
  """Returns `mask` as a boolean array of rank len(shape) that broadcasts to `shape`."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} has dtype {mask.dtype}; expected a boolean array (True = valid)")
  if mask.ndim > len(shape):
    raise ValueError(f"{name} of shape {mask.shape} has more dimensions than x of shape {shape}")
  padded = (1,) * (len(shape) - mask.ndim) + tuple(mask.shape)
  for m, s in zip(padded, shape):
    if m not in (1, s):
      raise ValueError(f"{name} of shape {mask.shape} does not broadcast to x of shape {shape}")
  return mask.reshape(padded)


def check_momentum(momentum: Optional[float]) -> None:
  if momentum is None:
    return
  if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
    raise ValueError(
        f"momentum={momentum!r} must be a number in [0, 1) (the weight of the old running value), "
        "or None for a cumulative average")


def check_positive(value, name: str) -> None:
  if not (isinstance(value, (int, float)) and value > 0):
    raise ValueError(f"{name}={value!r} must be a positive number")


def check_array(value, expected_shape, expected_dtype, name: str) -> None:
  """Raises ValueError if `value` does not have `expected_shape` and `expected_dtype`."""
  shape, dtype = tuple(jnp.shape(value)), jnp.result_type(value)
  if shape != tuple(expected_shape) or dtype != jnp.dtype(expected_dtype):
    raise ValueError(
        f"{name} has shape {shape} and dtype {dtype}; expected shape {tuple(expected_shape)} "
        f"and dtype {jnp.dtype(expected_dtype)} to match x")
