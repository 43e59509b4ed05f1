"""A Pallas TPU kernel for BatchNorm's training statistics and normalization in one read of `x`.

XLA reads `x` from HBM once for the statistics and again to normalize it (3 N bytes for the forward,
N = the bytes of `x`; flax.linen's E[x²]−E[x]² the same). This kernel reads each block of features
once into VMEM and keeps it there while it computes the exact two-pass statistics (the mean, then the
mean squared deviation, each over the VMEM copy) and writes `y`: 2 N, the floor of a forward. It runs
only when a block fits the VMEM budget (`fits`); everywhere else, and on every other platform,
BatchNorm takes the portable XLA program (`batch_norm.py` chooses with `jax.lax.platform_dependent`).

Layout: `x` has the features on its last axis and is read in blocks `x[..., j·b:(j+1)·b]` of every
other axis (`b` = 128 lanes, or all features when there are at most 128 or they are not a multiple of
128), one grid step per block. Where the TPU compiler keeps an activation with its batch axis next to
the features (NHWC at 7×7, 14×14 or 28×28: layout {3,0,2,1}), the kernels read that `view`, so no
copy is made (`LAYOUT`); the kernel walks a block in chunks of its leading axis, so its
float32 temporaries stay a few hundred KiB whatever the block. On a CPU the same kernel runs in Pallas'
interpret mode (the tests compare it with float64 references).

What it moves, from its block specs: each grid step copies one `x` block and the three per-feature
parameter vectors in and one `y` block and two per-feature vectors out; over the grid that is
`N + N_y + 5·C·4` bytes (`N_y` the bytes of `y`).

Reference:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167 (Algorithm 1).
"""

import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from normjax._src import compat

LANES = 128
DEFAULT_VMEM_BUDGET = 12 * 2**20  # bytes: within the smallest TPU VMEM (v4: 16 MiB per core)
_CHUNK_ELEMENTS = 1 << 16  # a chunk's float32 temporaries: 256 KiB each
_SUBLANES = {4: 8, 2: 16}  # rows per (8, 128) tile by itemsize: float32, bfloat16


_LAYOUT_ROWS = 8
LAYOUT = """The kernel needs `x` in row-major order, tiled (8, 128) on its last two axes. The TPU compiler
lays an activation out otherwise when that would pad a tile, and then copies `x` and `y` around the
kernel (at 256×7×7×512 bfloat16 such a fwd+bwd moved 45 N of HLO operand and result bytes against
the XLA path's 26 N on v5e). `compiler_layout` encodes the layouts libtpu 0.0.42.1 gives an argument
`x` of shape `(N, ..., W, C)` (probed on v5e, float32 and bfloat16, N from 6 to 256):

* `"rows"`: `W` a multiple of 8: row-major, the kernel's own layout.
* `"batch rows"`: `W` not a multiple of 8 (nor 2 or 4) and `N` a multiple of 8: the batch axis is
  the second-minor one (layout {3,0,2,1} for NHWC: `(H, W, N, C)` in row-major order). The kernels
  read that view, `x.transpose(1, ..., 0, -1)` (`view`), which XLA makes a bitcast: the statistics
  do not depend on the order of the reduced axes.
* `"batch lanes"`: `C` not a multiple of 128 (the lanes) and `N` a multiple of 128: the batch axis
  is the minor one (layout {0,3,2,1}: features on sublanes, batch on lanes).
* `"small tiles"`: `W` 2 or 4: row-major with (W, 128) tiles.
* `"padded"`: otherwise (`W` and `N` not multiples of 8).

The resident kernels keep features on lanes in (8, 128) tiles, so they handle only the first two;
the streaming kernels (`pallas_streaming`) also read "batch lanes" as its `(H, W, C, N)` view with
the features on sublanes. The others keep the XLA path. A wrong guess costs copies, never
correctness."""


def compiler_layout(shape) -> str:
  """How the TPU compiler lays out an activation of `shape` (`LAYOUT`): "rows", "batch rows",
  "batch lanes", "small tiles" or "padded"."""
  core = _without_leading_ones(shape)
  if len(core) < 3:
    return "rows" if core[0] % _LAYOUT_ROWS == 0 else "padded"
  batch, rows, features = core[0], core[-2], core[-1]
  if features % LANES != 0 and batch % LANES == 0:
    return "batch lanes"
  if rows % _LAYOUT_ROWS == 0:
    return "rows"
  if rows in (2, 4):
    return "small tiles"
  return "batch rows" if batch % _LAYOUT_ROWS == 0 else "padded"


def view(shape) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """`(kernel shape, permutation)`: the array the kernels read is `x` without leading size-1 axes,
  transposed by `permutation`: the batch axis moved next to the features where the TPU compiler lays
  `x` out that way (`compiler_layout` "batch rows"), else unchanged.

  Example:
    >>> from normjax._src import pallas_batch_norm
    >>> pallas_batch_norm.view((256, 14, 14, 256))  # the compiler's (H, W, N, C) order
    ((14, 14, 256, 256), (1, 2, 0, 3))
    >>> pallas_batch_norm.view((1, 32, 16, 16, 128))
    ((32, 16, 16, 128), (0, 1, 2, 3))
  """
  core = _without_leading_ones(shape)
  rank = len(core)
  perm = tuple(range(rank))
  if compiler_layout(core) == "batch rows":
    perm = tuple(range(1, rank - 1)) + (0, rank - 1)
  return tuple(core[p] for p in perm), perm


def feature_block(features: int) -> int:
  """Features per grid step: 128 lanes, or all of them (at most 128, or not a multiple of 128)."""
  return LANES if features > LANES and features % LANES == 0 else features


def tiled_bytes(block, dtype) -> int:
  """The VMEM a block of this shape takes: its last two axes padded to whole (8, 128) tiles of 32-bit
  words (16 rows of bfloat16), e.g. 64 features take 128 lanes."""
  rows = _SUBLANES[jnp.dtype(dtype).itemsize]
  *outer, second, minor = (1,) + tuple(block) if len(block) < 2 else tuple(block)
  padded = -(-second // rows) * rows * -(-minor // LANES) * LANES
  return math.prod(outer) * padded * jnp.dtype(dtype).itemsize


def vmem_bytes(shape, dtype, out_dtype) -> int:
  """VMEM one grid step needs: double-buffered `x` and `y` blocks (`tiled_bytes`) and the
  per-feature vectors."""
  shape = view(shape)[0]
  block = shape[:-1] + (feature_block(shape[-1]),)
  blocks = tiled_bytes(block, dtype) + tiled_bytes(block, out_dtype)
  return 2 * blocks + 3 * _CHUNK_ELEMENTS * 4 + 2 * 5 * LANES * 4


_ASSUMED_BUDGET = []  # set only inside `assume_vmem_budget`


@contextlib.contextmanager
def assume_vmem_budget(budget: int):
  """Trace with `budget` bytes as the VMEM budget: for ahead-of-time compilation for a TPU chip from a
  host without it, which cannot ask the chip (e.g. 3/4 of a v5e core's 128 MiB).

  Example:
    >>> from normjax._src import pallas_batch_norm
    >>> with pallas_batch_norm.assume_vmem_budget(96 * 2**20):
    ...   pallas_batch_norm.vmem_budget()
    100663296
  """
  _ASSUMED_BUDGET.append(int(budget))
  try:
    yield
  finally:
    _ASSUMED_BUDGET.pop()


def vmem_budget() -> int:
  """The VMEM a block may take: the innermost `assume_vmem_budget`, else 3/4 of a local TPU core's,
  else `DEFAULT_VMEM_BUDGET` (no TPU attached, e.g. compiling ahead of time on a CPU host)."""
  if _ASSUMED_BUDGET:
    return _ASSUMED_BUDGET[-1]
  try:
    if jax.default_backend() == "tpu":
      return int(pltpu.get_tpu_info().vmem_capacity_bytes * 3 // 4)
  except Exception:  # pylint: disable=broad-except  # an unknown chip: the safe default
    pass
  return DEFAULT_VMEM_BUDGET


def fits(shape, dtype, out_dtype, budget: Optional[int] = None) -> bool:
  """Whether the kernel handles `x` of `shape` and `dtype` (float32 or bfloat16, at least 2-D, in a
  layout the kernel reads in place: its `view`'s second-minor axis a multiple of 8, the batch not on
  the lanes; see `LAYOUT`) with output `out_dtype` within `budget` bytes of VMEM (default
  `vmem_budget()`)."""
  supported = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  if len(shape) < 2 or jnp.dtype(dtype) not in supported or jnp.dtype(out_dtype) not in supported:
    return False
  if compiler_layout(shape) not in ("rows", "batch rows"):  # see `LAYOUT`
    return False
  shape = view(shape)[0]
  if _chunking(shape, dtype) is None:
    return False
  return vmem_bytes(shape, dtype, out_dtype) <= (vmem_budget() if budget is None else budget)


def _without_leading_ones(shape) -> Tuple[int, ...]:
  """`shape` without leading size-1 axes (BatchNorm's one-group view `(1, *shape)`), at least 2-D."""
  shape = tuple(shape)
  while len(shape) > 2 and shape[0] == 1:
    shape = shape[1:]
  return shape


def _chunking(shape, dtype) -> Optional[Tuple[int, int]]:
  """How the kernel walks a block: `(axis, rows)`, chunks of `rows` slices along `axis` (0, or 1 when
  one slice of axis 0 is too large), at most `_CHUNK_ELEMENTS` elements each (for 2-D `x` a multiple
  of the sublane tile or the whole axis); None when no divisor of the axis gives such chunks."""
  for axis in (0, 1) if len(shape) >= 3 else (0,):
    inner = math.prod(shape[axis + 1 : -1]) * feature_block(shape[-1])
    tile = _SUBLANES[jnp.dtype(dtype).itemsize] if len(shape) == 2 else 1
    sizes = [
      rows
      for rows in range(1, shape[axis] + 1)
      if shape[axis] % rows == 0
      and rows * inner <= _CHUNK_ELEMENTS
      and (rows % tile == 0 or rows == shape[axis])
    ]
    if sizes:
      return axis, max(sizes)
  return None


def statistics_and_normalize(
  x, scale, bias, *, epsilon: float, dtype=None, interpret: bool = False, budget=None
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """`(y, mean, var)` of a BatchNorm training step over every axis of `x` but the last, in one kernel.

  Args:
    x: float32 or bfloat16, features last, with `fits(x.shape, x.dtype, dtype, budget)`.
    scale, bias: float32 `(C,)` vectors (use ones / zeros for none).
    epsilon: added to the variance.
    dtype: `y`'s dtype (default `x.dtype`).
    interpret: run in Pallas' interpret mode (any platform; for tests on a CPU).
    budget: VMEM bytes a block may take (default `vmem_budget()`); sets the kernel's VMEM limit.

  Returns:
    `y` of `x`'s shape in `dtype` and the float32 mean and biased variance, `(C,)` each. The
    statistics are exact two-pass ones (Chan et al. 1983) over float32 values; `y` is
    `(x − mean)·(scale·rsqrt(var + epsilon)) + bias`, rounded once.

  Raises:
    ValueError: `x` is not handled (see `fits`), naming its shape and dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import pallas_batch_norm
    >>> x = jnp.arange(32.0).reshape(16, 2)  # 16 rows: one sublane tile
    >>> y, mean, var = pallas_batch_norm.statistics_and_normalize(
    ...     x, jnp.ones(2), jnp.zeros(2), epsilon=0.0, interpret=True)
    >>> mean.tolist(), var.tolist(), round(float(y[0, 0]), 4)
    ([15.0, 16.0], [85.0, 85.0], -1.627)
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  budget = vmem_budget() if budget is None else budget
  if not fits(x.shape, x.dtype, dtype, budget):
    raise ValueError(
      f"x of shape {x.shape} and dtype {x.dtype} (output {dtype}) is not handled by the Pallas "
      f"BatchNorm kernel: expected float32 or bfloat16, at least 2-D, in a layout it reads in place "
      f"(see pallas_batch_norm.LAYOUT), "
      f"needing at most {budget} "
      f"bytes of VMEM (it needs {vmem_bytes(x.shape, x.dtype, dtype)})"
    )
  core = to_view(x)
  y, mean, var = _call(core, scale, bias, float(epsilon), dtype, bool(interpret), int(budget))
  return from_view(y, x.shape), mean, var


def to_view(x, perm=None):
  """`x` as the kernels read it: without leading size-1 axes, transposed by `perm` (default
  `view`'s)."""
  perm = view(x.shape)[1] if perm is None else perm
  return x.reshape(_without_leading_ones(x.shape)).transpose(perm)


def from_view(y, shape, perm=None):
  """The inverse of `to_view(x, perm)` for `x` of `shape`."""
  perm = view(shape)[1] if perm is None else perm
  return y.transpose(tuple(perm.index(axis) for axis in range(len(perm)))).reshape(shape)


class Grid(NamedTuple):
  """How a kernel over `x` (features last) is laid out: one grid step per feature block."""

  x_spec: object  # a block of every other axis and `feature_block` features
  vector_spec: object  # the block's per-feature (1, block) values
  vector: object  # the ShapeDtypeStruct of a (1, C) float32 output, varying like x
  size: int  # grid steps
  params: object  # TPU compiler parameters (VMEM limit from the budget)


def grid(x, budget) -> Grid:
  """The block specs, grid and compiler parameters shared by the forward and backward kernels."""
  features = x.shape[-1]
  block = feature_block(features)
  rank = x.ndim
  return Grid(
    pl.BlockSpec(x.shape[:-1] + (block,), lambda j: (0,) * (rank - 1) + (j,)),
    pl.BlockSpec((1, block), lambda j: (0, j)),
    compat.shape_like(x, (1, features), jnp.float32),  # varying like x under shard_map
    features // block,
    pltpu.CompilerParams(
      dimension_semantics=("parallel",), vmem_limit_bytes=max(budget, 16 * 2**20)
    ),
  )


class Walk(NamedTuple):
  """How a kernel walks its block in chunks (`_chunking`)."""

  steps: int  # chunks per block
  index: object  # i -> the i-th chunk's index into the block
  per_feature: object  # a chunk's values -> their (1, block) sums over every axis but the last


def walk(shape, chunking) -> Walk:
  """The chunk loop of a block of `shape` (the block's own shape) for `chunking = (axis, rows)`."""
  axis, rows = chunking
  per_slice = shape[axis] // rows  # chunks per slice of the axes before `axis`
  reduced = tuple(range(len(shape) - 1))

  def index(i):
    if axis == 0:
      return (pl.ds(i * rows, rows),)
    outer, inner = jax.lax.div(i, per_slice), jax.lax.rem(i, per_slice)  # i ≥ 0: no sign fix-up
    return (pl.ds(outer, 1), pl.ds(inner * rows, rows))

  def per_feature(values):
    return jnp.sum(values, axis=reduced, keepdims=True).reshape(1, -1)

  return Walk(math.prod(shape[:axis]) * per_slice, index, per_feature)


def _call(x, scale, bias, epsilon, dtype, interpret, budget):
  g = grid(x, budget)
  y, mean, var = pl.pallas_call(
    _kernel(x.shape, _chunking(x.shape, x.dtype), epsilon),
    out_shape=(compat.shape_like(x, x.shape, dtype), g.vector, g.vector),
    grid=(g.size,),
    in_specs=[g.x_spec, g.vector_spec, g.vector_spec],
    out_specs=(g.x_spec, g.vector_spec, g.vector_spec),
    compiler_params=g.params,
    interpret=interpret,
  )(x, *(compat.vary_like(x, v.astype(jnp.float32).reshape(1, -1)) for v in (scale, bias)))
  return y, mean[0], var[0]


def _kernel(shape, chunking, epsilon):
  """The kernel body for one feature block: sum, sum of squared deviations, normalize."""
  steps, index, per_feature = walk(shape, chunking)
  count = float(math.prod(shape[:-1]))

  def chunk(ref, i):
    return ref[index(i)].astype(jnp.float32)

  def kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, var_ref):
    width = x_ref.shape[-1]
    zeros = jnp.zeros((1, width), jnp.float32)
    total = jax.lax.fori_loop(0, steps, lambda i, s: s + per_feature(chunk(x_ref, i)), zeros)
    mean = total / count
    bshape = (1,) * (len(shape) - 1) + (width,)
    centre = mean.reshape(bshape)

    def squares(i, s):
      deviation = chunk(x_ref, i) - centre
      return s + per_feature(deviation * deviation)

    var = jax.lax.fori_loop(0, steps, squares, zeros) / count
    factor = (scale_ref[...] * jax.lax.rsqrt(var + epsilon)).reshape(bshape)
    offset = bias_ref[...].reshape(bshape)

    def normalize(i, carry):
      y = (chunk(x_ref, i) - centre) * factor + offset
      y_ref[index(i)] = y.astype(y_ref.dtype)
      return carry

    jax.lax.fori_loop(0, steps, normalize, 0)
    mean_ref[...] = mean
    var_ref[...] = var

  return kernel
