"""Which Pallas kernel takes a BatchNorm training step on a TPU, and how the two sweeps walk it.

`forward_kernel` / `backward_kernel` choose, for `x`'s shape and dtypes and a VMEM budget: the
resident kernels (`pallas_batch_norm`, `pallas_backward`) where a block of features fits; the
two-sweep kernels (`pallas_streaming`) where it does not and their fwd+bwd moves less than XLA's
program (`pays`); else None, the XLA program. For the sweeps, `geometry` is the view of `x` they
read (the TPU compiler's own layout, `pallas_batch_norm.LAYOUT`), `plan` the chunks and how many of
them stay in VMEM, and `traffic` the HBM bytes that follow from the grid's index maps
(`index_maps`), as the TPU pipeline copies blocks: what the kernels move, from their block specs.

Reference:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167.
"""

import functools
import math
import re
from typing import NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp

from normjax._src import pallas_backward
from normjax._src import pallas_batch_norm as resident

NAME = "normjax_bn_stream"  # the sweeps' names in the HLO: f"{NAME}_{fwd|bwd}_c{chunks}_k{cached}"
_CHUNK_BYTES = 4 * 2**20  # at most this many bytes per input chunk (of one feature block)
_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Plan(NamedTuple):
  """How a kernel sweeps the block: `chunks` chunks of `rows` slices of the view's axis 0, the last
  `cached` of them kept in VMEM."""

  rows: int
  chunks: int
  cached: int


class Geometry(NamedTuple):
  """How the kernels see `x` (`geometry`): the view they read and where its features are."""

  view: Tuple[int, ...]  # `x` without leading size-1 axes, transposed by `perm`
  perm: Tuple[int, ...]
  lanes: bool  # features on the view's last axis; else on its second-minor one, the batch on lanes
  width: int  # features per grid step

  @property
  def features(self) -> int:
    return self.view[-1] if self.lanes else self.view[-2]

  def chunk(self, rows: int) -> Tuple[int, ...]:
    """The block of `rows` slices of the view's axis 0 and one step's features."""
    if self.lanes:
      return (rows,) + self.view[1:-1] + (self.width,)
    return (rows,) + self.view[1:]

  def vector(self, width: int) -> Tuple[int, int]:
    """The shape of `width` per-feature values, laid along the features' axis."""
    return (1, width) if self.lanes else (width, 1)

  def broadcast(self, rank: int) -> Tuple[int, ...]:
    """The shape per-feature values broadcast from, against a chunk of `rank` axes."""
    return (1,) * (rank - 1) + (self.width,) if self.lanes else (1,) * (rank - 2) + (self.width, 1)


def geometry(shape) -> Optional[Geometry]:
  """The view of `x` of `shape` in the TPU compiler's layout (`pallas_batch_norm.LAYOUT`): features
  on lanes for "rows" and "batch rows" (`pallas_batch_norm.view`, 128 features per step), and for
  "batch lanes" (NHWC with the batch minor) the view `(H, W, C, N)`, all features in one step on the
  sublanes; None for the other layouts or fewer than 3 axes."""
  layout = resident.compiler_layout(shape)
  core = resident._without_leading_ones(shape)  # pylint: disable=protected-access
  if len(core) < 3 or layout not in ("rows", "batch rows", "batch lanes"):
    return None
  if layout == "batch lanes":
    perm = tuple(range(1, len(core) - 1)) + (len(core) - 1, 0)
    view = tuple(core[a] for a in perm)
    return Geometry(view, perm, False, view[-2])
  view, perm = resident.view(shape)
  return Geometry(view, perm, True, resident.feature_block(view[-1]))


def plan(shape, in_dtypes: Sequence, out_dtypes: Sequence, budget: int) -> Optional[Plan]:
  """The plan for `x` of `shape` read as `in_dtypes` arrays and written as `out_dtypes` ones within
  `budget` bytes of VMEM, or None (not float32/bfloat16, no `geometry`, fewer than two chunks, or
  not even the double-buffered chunks fit)."""
  dtypes = [jnp.dtype(d) for d in (*in_dtypes, *out_dtypes)]
  geo = geometry(shape)
  if geo is None or any(d not in _SUPPORTED for d in dtypes):
    return None
  one = geo.chunk(1)  # one slice of axis 0, in VMEM's tiles
  per_row = math.prod(one)
  in_row = sum(resident.tiled_bytes(one, d) for d in in_dtypes)
  out_row = sum(resident.tiled_bytes(one, d) for d in out_dtypes)
  narrow = min(dtypes, key=lambda d: d.itemsize)
  sizes = [
    r
    for r in range(1, geo.view[0] // 2 + 1)
    if geo.view[0] % r == 0
    and r * in_row <= _CHUNK_BYTES * len(in_dtypes)
    and chunking(geo, geo.chunk(r), narrow) is not None
  ]

  def fixed(rows):  # double-buffered chunks, the walk's float32 temporaries, per-feature vectors
    temporaries = 4 * min(resident._CHUNK_ELEMENTS, rows * per_row) * 4  # pylint: disable=protected-access
    vectors = 16 * resident.tiled_bytes(geo.vector(geo.width), jnp.float32)
    return 2 * rows * (in_row + out_row) + temporaries + vectors

  # the largest chunks that leave 3/4 of the budget to the cache, else the smallest that fit
  roomy = [r for r in sizes if fixed(r) <= budget // 4]
  fitting = [r for r in sizes if fixed(r) <= budget]
  if not fitting:
    return None
  rows = max(roomy) if roomy else min(fitting)
  chunks = geo.view[0] // rows
  return Plan(rows, chunks, min(chunks, (budget - fixed(rows)) // (rows * in_row)))


def chunking(geo: Geometry, block, narrow):
  """How a body walks a chunk `block` (`pallas_batch_norm._chunking` where the features are on the
  lanes; with features on sublanes, slices of a leading axis of at most `_CHUNK_ELEMENTS`)."""
  if geo.lanes:
    return resident._chunking(block, narrow)  # pylint: disable=protected-access
  for axis in range(len(block) - 2):
    inner = math.prod(block[axis + 1 :])
    sizes = [
      r
      for r in range(1, block[axis] + 1)
      if block[axis] % r == 0 and r * inner <= resident._CHUNK_ELEMENTS  # pylint: disable=protected-access
    ]
    if sizes:
      return axis, max(sizes)
  return None


def plan_or_raise(shape, in_dtypes, out_dtypes, budget) -> Plan:
  p = plan(shape, in_dtypes, out_dtypes, budget)
  if p is None:
    names = [jnp.dtype(d).name for d in (*in_dtypes, *out_dtypes)]
    raise ValueError(
      f"x of shape {tuple(shape)} (arrays {names}) is not handled by the streaming BatchNorm "
      f"kernels within {budget} bytes of VMEM: expected float32 or bfloat16, at least 3-D, in a "
      "layout the kernels read in place (pallas_batch_norm.LAYOUT), at least two chunks along the "
      "leading axis of its view, and double-buffered chunks within the budget"
    )
  return p


def traffic(plan_: Plan, input_bytes: Sequence[int], output_bytes: Sequence[int]) -> int:
  """HBM bytes the kernel moves for whole arrays of these sizes, from its block specs: the grid's
  index maps walked as the TPU pipeline walks them (a block is copied in when its index changes,
  out when the output's index changes and at the end), for one feature block (the others repeat it).

  Example:
    >>> from normjax._src import pallas_plan
    >>> plan = pallas_plan.Plan(rows=1, chunks=4, cached=1)  # 3 of 4 chunks read again
    >>> pallas_plan.traffic(plan, [400], [400])
    1100
  """
  in_map, out_map = index_maps(plan_)
  steps = [(p, i) for p in (0, 1) for i in range(plan_.chunks)]
  fetched = 1 + sum(in_map(*a) != in_map(*b) for a, b in zip(steps, steps[1:]))
  written = 1 + sum(out_map(*a) != out_map(*b) for a, b in zip(steps, steps[1:]))
  per_chunk = [b // plan_.chunks for b in input_bytes], [b // plan_.chunks for b in output_bytes]
  return fetched * sum(per_chunk[0]) + written * sum(per_chunk[1])


def chunk_index(plan_: Plan, p, i):
  """The chunk grid step (sweep p, step i) works on: sweep 0 forwards, sweep 1 backwards."""
  return i + p * (plan_.chunks - 1 - 2 * i)


def index_maps(plan_: Plan):
  """(input chunk, output chunk) of grid step (sweep p, step i), as Python ints or traced ints."""
  last, first_cached = plan_.chunks - 1, plan_.chunks - plan_.cached
  chunk = functools.partial(chunk_index, plan_)

  def in_map(p, i):  # in sweep 1 a cached chunk keeps the last index: nothing is fetched
    c = chunk(p, i)
    kept = (p == 1) & (c >= first_cached)
    return (last if kept else c) if isinstance(kept, bool) else jnp.where(kept, last, c)

  def out_map(p, i):  # sweep 0 points at the first block sweep 1 writes: nothing is written back
    return chunk(p, i) * p + last * (1 - p)

  return in_map, out_map


XLA_FWD_BWD = (
  7.0  # N: fusion and kernel bytes of XLA's fwd+bwd at every op row (v5e; BENCHMARKS.md)
)


def forward_kernel(shape, dtype, out_dtype, budget: Optional[int] = None) -> Optional[str]:
  """Which forward kernel takes `x` of `shape`: "resident" (`pallas_batch_norm`), "streaming"
  (`pallas_streaming`, where the sweeps `pay`), or None (the XLA program), within `budget` (default
  the chip's VMEM budget).

  Example (v5e's budget, bfloat16 at ResNet-50's batch-256 shapes):
    >>> import jax.numpy as jnp
    >>> from normjax._src import pallas_plan
    >>> [pallas_plan.forward_kernel((256, s, s, c), jnp.bfloat16, jnp.bfloat16, 96 * 2**20)
    ...  for s, c in [(14, 256), (28, 128), (56, 256)]]
    ['resident', 'streaming', None]
  """
  budget = resident.vmem_budget() if budget is None else budget
  if resident.fits(shape, dtype, out_dtype, budget):
    return "resident"
  return "streaming" if pays(shape, dtype, out_dtype, budget) else None


def backward_kernel(shape, dtype, g_dtype, budget: Optional[int] = None) -> Optional[str]:
  """`forward_kernel` for the backward (`pallas_backward`, or `pallas_streaming`) with cotangent
  `g_dtype`."""
  budget = resident.vmem_budget() if budget is None else budget
  if pallas_backward.fits(shape, dtype, g_dtype, budget):
    return "resident"
  return "streaming" if pays(shape, dtype, g_dtype, budget) else None


def pays(shape, dtype, out_dtype, budget: int) -> bool:
  """Whether the kernels' fwd+bwd (cotangent in `out_dtype`; each resident where it fits, else two
  sweeps) moves less than XLA's `XLA_FWD_BWD`: with little cache the sweeps read too much again
  (256×56×56×256 bfloat16 on v5e: 7.2 N)."""
  n = jnp.dtype(dtype).itemsize
  out = jnp.dtype(out_dtype).itemsize / n  # y's and g's bytes, in N
  if resident.fits(shape, dtype, out_dtype, budget):
    forward = 1 + out
  else:
    p = plan(shape, [dtype], [out_dtype], budget)
    forward = math.inf if p is None else traffic(p, [n * p.chunks], [0]) / (n * p.chunks) + out
  if pallas_backward.fits(shape, dtype, out_dtype, budget):
    backward = 2 + out
  else:
    p = plan(shape, [dtype, out_dtype], [dtype], budget)
    again = math.inf if p is None else traffic(p, [p.chunks], [0]) / p.chunks
    backward = again * (1 + out) + 1
  return forward + backward < XLA_FWD_BWD


def reread(name: str) -> float:
  """The fraction of its inputs that a kernel named `name` in an HLO text reads a second time
  (`traffic`; its plan is in its name), or 0 for any other instruction.

  Example:
    >>> from normjax._src import pallas_plan
    >>> round(pallas_plan.reread("normjax_bn_stream_bwd_c28_k20.3"), 4)  # 8 of 28 chunks
    0.2857
  """
  match = re.search(rf"{NAME}_(?:fwd|bwd)_c(\d+)_k(\d+)", name)
  if not match:
    return 0.0
  p = Plan(1, int(match.group(1)), int(match.group(2)))
  return traffic(p, [p.chunks], []) / p.chunks - 1
