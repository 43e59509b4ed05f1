"""Argument checks shared by every transform: they raise at trace time with messages that name the
argument, the value received and what was expected."""

from typing import Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np

Axes = Union[int, Sequence[int]]


def normalize_axes(axes: Axes, ndim: int, name: str) -> Tuple[int, ...]:
  """Returns `axes` as a sorted tuple of non-negative ints, or raises ValueError."""
  if isinstance(axes, (int, np.integer)):
    axes_tuple = (axes,)
  else:
    try:
      axes_tuple = tuple(axes)
    except TypeError:
      raise TypeError(f"{name}={axes!r} must be an int or a sequence of ints") from None
  out = []
  for a in axes_tuple:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise TypeError(f"{name}={axes!r} must be an int or a sequence of ints")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{name}={axes!r} is out of range for an input of rank {ndim}: "
        f"each axis must lie in [{-ndim}, {ndim - 1}]"
      )
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
      f"(float32, bfloat16, float16 or float64). Cast it first, e.g. x.astype(jnp.float32)"
    )


def prepare_mask(mask, shape: Tuple[int, ...], name: str = "mask"):
  """Returns `mask` as a boolean array of rank len(shape) that broadcasts to `shape`.

  Two forms are accepted, and nothing is right-aligned silently:
    * x's rank, each dimension 1 or x's (e.g. `(B, 1, 1, 1)` or `(B, H, W, 1)` for `(B, H, W, C)`);
    * 1-D of shape `(x.shape[0],)`: one flag per example along axis 0, read as `(B, 1, ..., 1)`.

  Raises:
    TypeError: `mask` is not boolean.
    ValueError: any other shape, naming both shapes.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} has dtype {mask.dtype}; expected a boolean array (True = valid)")
  shape = tuple(shape)
  if mask.ndim == 1 and len(shape) > 1:
    if mask.shape[0] != shape[0]:
      raise ValueError(
        f"{name} of shape {mask.shape} does not broadcast to x of shape {shape}: a 1-D mask is one "
        f"flag per example along axis 0 and needs shape ({shape[0]},); otherwise give the mask x's "
        f"rank {len(shape)}"
      )
    return mask.reshape(shape[:1] + (1,) * (len(shape) - 1))
  if mask.ndim != len(shape):
    raise ValueError(
      f"{name} of shape {mask.shape} does not broadcast to x of shape {shape}: a mask needs x's "
      f"rank {len(shape)} (each dimension 1 or x's), or is 1-D of shape {shape[:1]} (one flag per "
      "example along axis 0); masks are not right-aligned"
    )
  for m, s in zip(mask.shape, shape):
    if m not in (1, s):
      raise ValueError(
        f"{name} of shape {mask.shape} does not broadcast to x of shape {shape}: each "
        "dimension must be 1 or x's"
      )
  return mask


def is_real_scalar(value) -> bool:
  """True for a concrete real number: a Python int/float, or a NumPy or JAX scalar (0-d, not bool)."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (int, float, np.integer, np.floating)):
    return True
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if (
    shape != ()
    or dtype is None
    or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))
  ):
    return False
  try:
    float(value)  # a tracer cannot be checked at construction time
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def check_momentum(momentum: Optional[float]) -> None:
  if momentum is None:
    return
  if not (is_real_scalar(momentum) and 0.0 <= float(momentum) < 1.0):
    raise ValueError(
      f"momentum={momentum!r} must be a number in [0, 1) (the weight of the old running value), "
      "or None for a cumulative average"
    )


def check_positive(value, name: str) -> None:
  if not (is_real_scalar(value) and float(value) > 0):
    raise ValueError(f"{name}={value!r} must be a positive number")


def check_array(value, expected_shape, expected_dtype, name: str) -> None:
  """Raises ValueError if `value` does not have `expected_shape` and `expected_dtype`."""
  shape, dtype = tuple(jnp.shape(value)), jnp.result_type(value)
  if shape != tuple(expected_shape) or dtype != jnp.dtype(expected_dtype):
    raise ValueError(
      f"{name} has shape {shape} and dtype {dtype}; expected shape {tuple(expected_shape)} "
      f"and dtype {jnp.dtype(expected_dtype)} to match x"
    )
