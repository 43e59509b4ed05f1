"""A Pallas TPU kernel for BatchNorm's training backward: `dx`, `Σ g` and `Σ g·x̂` in one read of `x` and `g`.

XLA runs the closed-form backward (`fused_batch_norm`) in two passes over HBM: one reduction reads `x`
and the cotangent `g` for `Σ g` and `Σ g·(x − μ)`, one elementwise pass reads them again and writes
`dx` (5 N bytes, N = the bytes of `x`, when `g` has `x`'s dtype). This kernel reads each block of
features of `x` and `g` once into VMEM, keeps them there while it forms both sums and `dx`, and
writes `dx`: 3 N, the floor of a backward. With the forward kernel (`pallas_batch_norm`, 2 N) a
training step's normalization moves 5 N, the floor of a program that writes `y` and `dx`.

For y = (x − μ)·rstd·scale + bias and x̂ = (x − μ)·rstd over the n values of each feature:

    dx = scale·rstd·(g − Σ g / n − x̂·Σ(g·x̂) / n),   dscale = Σ g·x̂,   dbias = Σ g

(Ioffe & Szegedy 2015, §3). The blocks and chunks are the forward kernel's (`pallas_batch_norm`); it
runs where `fits` holds (three arrays in VMEM instead of two); otherwise the caller takes the same
backward in two sweeps over chunks (`pallas_streaming`) where those pay, or XLA's. On a CPU the same
kernel runs in Pallas' interpret mode (the tests compare it with float64 references).

What it moves, from its block specs: each grid step copies one `x` block, one `g` block and three
per-feature vectors in, and one `dx` block and two per-feature vectors out: `N_x + N_g + N_dx + 5·C·4`
bytes over the grid.

Reference:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167 (§3).
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from normjax._src import compat
from normjax._src import pallas_batch_norm as forward

_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def vmem_bytes(shape, dtype, g_dtype) -> int:
  """VMEM one grid step needs: double-buffered `x`, `g` and `dx` blocks, chunk temporaries and the
  per-feature vectors."""
  shape = forward.view(shape)[0]
  block = shape[:-1] + (forward.feature_block(shape[-1]),)
  blocks = 2 * forward.tiled_bytes(block, dtype) + forward.tiled_bytes(block, g_dtype)
  return 2 * blocks + 4 * forward._CHUNK_ELEMENTS * 4 + 2 * 5 * forward.LANES * 4  # pylint: disable=protected-access


def fits(shape, dtype, g_dtype, budget: Optional[int] = None) -> bool:
  """Whether the kernel handles `x` of `shape` and `dtype` with a cotangent of `g_dtype`: the forward
  kernel's conditions (`pallas_batch_norm.fits`) and `vmem_bytes` within `budget` (default
  `pallas_batch_norm.vmem_budget()`)."""
  if jnp.dtype(dtype) not in _SUPPORTED or jnp.dtype(g_dtype) not in _SUPPORTED:
    return False
  if not forward.fits(shape, dtype, g_dtype, budget=math.inf):  # dtype, rank, layout, chunking
    return False
  if _chunking(shape, dtype, g_dtype) is None:
    return False
  budget = forward.vmem_budget() if budget is None else budget
  return vmem_bytes(shape, dtype, g_dtype) <= budget


def _chunking(shape, dtype, g_dtype):
  """The forward kernel's chunks for the narrower of the two dtypes (its sublane tile is the larger)."""
  narrow = min((jnp.dtype(dtype), jnp.dtype(g_dtype)), key=lambda d: d.itemsize)
  return forward._chunking(forward.view(shape)[0], narrow)  # pylint: disable=protected-access


def backward(
  x, g, mean, rstd, scale, *, interpret: bool = False, budget=None
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`(dx, Σ g, Σ g·x̂)` of a BatchNorm training step over every axis of `x` but the last, in one kernel.

  Args:
    x: float32 or bfloat16, features last, with `fits(x.shape, x.dtype, g.dtype, budget)`.
    g: the cotangent of `y`, `x`'s shape, float32 or bfloat16.
    mean, rstd, scale: float32, `C` values each (any shape): the batch mean, `1/sqrt(var + ε)` and
      the scale (ones for none).
    interpret: run in Pallas' interpret mode (any platform; for tests on a CPU).
    budget: VMEM bytes a block may take (default `pallas_batch_norm.vmem_budget()`).

  Returns:
    `dx` in `x`'s dtype (rounded once from float32), and the float32 `(C,)` sums `Σ g` (the bias
    gradient) and `Σ g·x̂` (the scale gradient).

  Raises:
    ValueError: the input is not handled (see `fits`), naming its shape and dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import pallas_backward
    >>> x = jnp.arange(32.0).reshape(16, 2)
    >>> mean, rstd = x.mean(0), 1 / x.std(0)
    >>> dx, sum_g, sum_gx = pallas_backward.backward(x, x, mean, rstd, jnp.ones(2), interpret=True)
    >>> sum_g.tolist(), round(float(sum_gx[0]), 3), round(float(jnp.abs(dx).max()), 6)
    ([240.0, 256.0], 147.513, 0.0)
  """
  budget = forward.vmem_budget() if budget is None else budget
  if g.shape != x.shape or not fits(x.shape, x.dtype, g.dtype, budget):
    raise ValueError(
      f"x of shape {x.shape} and dtype {x.dtype} with g of shape {g.shape} and dtype {g.dtype} is "
      "not handled by the Pallas BatchNorm backward kernel: expected g of x's shape, float32 or "
      "bfloat16, at least 2-D, in a layout it reads in place (see pallas_batch_norm.LAYOUT), "
      f"needing at most {budget} bytes of VMEM "
      f"(it needs {vmem_bytes(x.shape, x.dtype, g.dtype)})"
    )
  vectors = [compat.vary_like(x, v.astype(jnp.float32).reshape(1, -1)) for v in (mean, rstd, scale)]
  dx, sum_g, sum_gx = _call(
    forward.to_view(x), forward.to_view(g), *vectors, bool(interpret), int(budget)
  )
  return forward.from_view(dx, x.shape), sum_g[0], sum_gx[0]


def _call(x, g, mean, rstd, scale, interpret, budget):
  grid = forward.grid(x, budget)
  vectors = [grid.vector_spec] * 3
  return pl.pallas_call(
    _kernel(x.shape, _chunking(x.shape, x.dtype, g.dtype)),
    out_shape=(compat.shape_like(x, x.shape, x.dtype), grid.vector, grid.vector),
    grid=(grid.size,),
    in_specs=[grid.x_spec, grid.x_spec, *vectors],
    out_specs=(grid.x_spec, grid.vector_spec, grid.vector_spec),
    compiler_params=grid.params,
    interpret=interpret,
  )(x, compat.vary_like(x, g), mean, rstd, scale)


def coefficients(scale, rstd, sum_g, sum_gc, count):
  """`(a, a·Σg/n, a·rstd²·Σ(g·(x − μ))/n)`, a = scale·rstd, per feature: `dx = a·g − b − c·(x − μ)`
  (the closed form above, with Σ(g·x̂) = rstd·Σ(g·(x − μ))); shared with `pallas_streaming`."""
  factor = scale * rstd
  return factor, factor * sum_g / count, factor * rstd * rstd * sum_gc / count


def _kernel(shape, chunking):
  """The kernel body for one feature block: `Σ g` and `Σ g·(x − μ)`, then `dx`."""
  steps, index, per_feature = forward.walk(shape, chunking)  # the forward kernel's chunks
  count = float(math.prod(shape[:-1]))

  def kernel(x_ref, g_ref, mean_ref, rstd_ref, scale_ref, dx_ref, sum_g_ref, sum_gx_ref):
    width = x_ref.shape[-1]
    bshape = (1,) * (len(shape) - 1) + (width,)
    centre = mean_ref[...].reshape(bshape)

    def sums(i, carry):
      g = g_ref[index(i)].astype(jnp.float32)
      centered = x_ref[index(i)].astype(jnp.float32) - centre
      return carry[0] + per_feature(g), carry[1] + per_feature(g * centered)

    zeros = jnp.zeros((1, width), jnp.float32)
    sum_g, sum_gc = jax.lax.fori_loop(0, steps, sums, (zeros, zeros))
    rstd = rstd_ref[...]
    factor, offset, slope = (
      v.reshape(bshape) for v in coefficients(scale_ref[...], rstd, sum_g, sum_gc, count)
    )

    def dx(i, carry):
      g = g_ref[index(i)].astype(jnp.float32)
      centered = x_ref[index(i)].astype(jnp.float32) - centre
      dx_ref[index(i)] = (factor * g - offset - slope * centered).astype(dx_ref.dtype)
      return carry

    jax.lax.fori_loop(0, steps, dx, 0)
    sum_g_ref[...] = sum_g
    sum_gx_ref[...] = sum_gc * rstd

  return kernel
