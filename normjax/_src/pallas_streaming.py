"""Pallas TPU kernels for BatchNorm blocks larger than VMEM: two sweeps over chunks, the last ones kept.

The resident kernels (`pallas_batch_norm`, `pallas_backward`) hold a whole block of 128 features of
`x` in VMEM. At 256×28×28×128 bfloat16 that block is 51.4 MB, and with `y` beside it, double-buffered,
205 MB: more than a v5e core's 128 MiB. These kernels walk the block in chunks of its leading axis
in two sweeps over a grid `(feature blocks, 2, chunks)`. They read `x` in the TPU compiler's layout
(`pallas_plan.geometry`): the resident kernels' `view` with 128 features on the lanes, or, where the
compiler puts the batch on the lanes (NHWC with 64 features at batch 256:
`pallas_batch_norm.LAYOUT`), the view `(H, W, C, N)` with every feature on the sublanes, reduced
over the lanes.

* sweep 0 reads each chunk once and accumulates the per-feature sums (the forward: Σ (x − K) and
  Σ (x − K)², shifted by K = the first chunk's mean, computed from its VMEM copy first, which is
  within ~σ/√(chunk size) of the batch mean, so the one-pass variance keeps its accuracy at any mean
  (Chan et al. 1983); the backward: Σ g and Σ g·(x − μ), μ being the batch mean already known);
* sweep 1 visits the chunks in reverse and writes the output (`y`, or `dx`).

The last `cached` chunks of sweep 0 (`pallas_plan.plan`) are copied into a VMEM cache as large as
the budget allows, and sweep 1 starts with them: their block index does not change, so the pipeline
fetches nothing for them (and the last chunk, still in its buffer, is never fetched again). What
each kernel moves, from its block specs (`pallas_plan.traffic`, which walks the grid's index maps as
the pipeline does): every input `1 + reread` times, `reread = (chunks − max(cached, 1)) / chunks`,
every output once. With the whole block cached the forward moves 2 N and the backward 3 N, as the
resident kernels do; with no cache, 3 N and 5 N (N = the bytes of `x`).

Reference:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167. Chan, Golub & LeVeque, "Algorithms for Computing the
  Sample Variance: Analysis and Recommendations", The American Statistician 37(3), 1983.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from normjax._src import compat
from normjax._src import pallas_backward
from normjax._src import pallas_batch_norm as resident
from normjax._src import pallas_plan
from normjax._src.pallas_plan import NAME, Geometry, Plan


class _Grid(NamedTuple):
  chunk_spec: object  # an input chunk of one feature block
  out_spec: object
  vector_spec: object
  vector: object
  cache: object  # a VMEM scratch of `cached` chunks (at least one)
  params: object


def _grid(x, geo: Geometry, p: Plan, budget: int, dtype) -> _Grid:
  shape = geo.chunk(p.rows)
  in_map, out_map = pallas_plan.index_maps(p)
  if geo.lanes:  # (chunk, 0, ..., 0, feature block j)
    rest = (0,) * (x.ndim - 2)
    block_index = lambda index: lambda j, s, i: (index(s, i), *rest, j)  # noqa: E731
    vector_index = lambda j, s, i: (0, j)  # noqa: E731
  else:  # all features and the whole batch in every step
    rest = (0,) * (x.ndim - 1)
    block_index = lambda index: lambda j, s, i: (index(s, i), *rest)  # noqa: E731
    vector_index = lambda j, s, i: (0, 0)  # noqa: E731
  return _Grid(
    pl.BlockSpec(shape, block_index(in_map)),
    pl.BlockSpec(shape, block_index(out_map)),
    pl.BlockSpec(geo.vector(geo.width), vector_index),
    compat.shape_like(x, geo.vector(geo.features), jnp.float32),
    pltpu.VMEM((p.cached,) + shape if p.cached else (8, resident.LANES), dtype),  # unused if 0
    pltpu.CompilerParams(
      dimension_semantics=("parallel", "arbitrary", "arbitrary"),
      vmem_limit_bytes=max(budget, 16 * 2**20),
    ),
  )


class _Sweep(NamedTuple):
  """Where a kernel body stands: sweep, step, chunk, and how to read a chunk's values."""

  sweep: object
  step: object
  chunk: object
  cached: object  # bool: this chunk is in the cache
  slot: object  # its place in the cache, if cached
  steps: int
  index: object
  per_feature: object


def _sweep(geo: Geometry, p: Plan, narrow) -> _Sweep:
  s, i = pl.program_id(1), pl.program_id(2)
  chunk = pallas_plan.chunk_index(p, s, i)
  block = geo.chunk(p.rows)
  steps, index, per_feature = resident.walk(block, pallas_plan.chunking(geo, block, narrow))
  if not geo.lanes:  # sums over every axis but the features' (second-minor) one

    def per_feature(values):
      axes = tuple(a for a in range(values.ndim) if a != values.ndim - 2)
      return jnp.sum(values, axis=axes, keepdims=True).reshape(-1, 1)

  first_cached = p.chunks - p.cached
  return _Sweep(s, i, chunk, chunk >= first_cached, chunk - first_cached, steps, index, per_feature)


def _keep(sw: _Sweep, p: Plan, pairs) -> None:
  """In sweep 0, copy this chunk of each `(input ref, cache ref)` into its cache slot if cached."""
  if p.cached == 0:
    return

  @pl.when((sw.sweep == 0) & sw.cached)
  def _():
    def copy(k, carry):
      for ref, cache in pairs:
        cache.at[sw.slot][sw.index(k)] = ref[sw.index(k)]
      return carry

    jax.lax.fori_loop(0, sw.steps, copy, 0)


def _from_cache_or_buffer(sw: _Sweep, p: Plan, pairs, emit) -> None:
  """In sweep 1, `emit(refs)` with this chunk's values: from the cache, or the pipeline's buffer."""
  if p.cached == 0:
    pl.when(sw.sweep == 1)(lambda: emit([ref for ref, _ in pairs]))
    return

  @pl.when((sw.sweep == 1) & sw.cached)
  def _():
    emit([cache.at[sw.slot] for _, cache in pairs])

  @pl.when((sw.sweep == 1) & jnp.logical_not(sw.cached))
  def _():
    emit([ref for ref, _ in pairs])


def statistics_and_normalize(
  x, scale, bias, *, epsilon: float, dtype, interpret: bool, budget: int
):
  """`pallas_batch_norm.statistics_and_normalize` in two sweeps.

  Raises:
    ValueError: `plan` finds no chunks for `x` within `budget`, naming its shape and dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import pallas_plan, pallas_streaming
    >>> x = jnp.arange(3840.0).reshape(16, 3, 5, 16)  # W = 5: its (3, 5, 16, 16) view
    >>> pallas_plan.plan(x.shape, [x.dtype], [x.dtype], 400_000)  # 3 chunks of H, all kept
    Plan(rows=1, chunks=3, cached=3)
    >>> y, mean, var = pallas_streaming.statistics_and_normalize(
    ...     x, jnp.ones(16), jnp.zeros(16), epsilon=0.0, dtype=x.dtype, interpret=True,
    ...     budget=400_000)
    >>> float(mean[0]), round(float(var[0]) / float(x.var((0, 1, 2))[0]), 6)
    (1912.0, 1.0)
  """
  p = pallas_plan.plan_or_raise(x.shape, [x.dtype], [dtype], budget)
  geo = pallas_plan.geometry(x.shape)
  core = resident.to_view(x, geo.perm)
  g = _grid(core, geo, p, budget, core.dtype)
  count = math.prod(core.shape) // geo.features
  y, mean, var = pl.pallas_call(
    _forward_kernel(geo, p, count, float(epsilon)),
    out_shape=(compat.shape_like(core, core.shape, dtype), g.vector, g.vector),
    grid=(geo.features // geo.width, 2, p.chunks),
    in_specs=[g.chunk_spec, g.vector_spec, g.vector_spec],
    out_specs=(g.out_spec, g.vector_spec, g.vector_spec),
    scratch_shapes=[g.cache] + [pltpu.VMEM(geo.vector(geo.width), jnp.float32) for _ in range(3)],
    compiler_params=g.params,
    interpret=interpret,
    name=f"{NAME}_fwd_c{p.chunks}_k{p.cached}",
  )(core, *(_vector(core, geo, v) for v in (scale, bias)))
  return resident.from_view(y, x.shape, geo.perm), mean.reshape(-1), var.reshape(-1)


def _vector(core, geo: Geometry, values):
  """Per-feature float32 `values` laid along the view's features, varying like `core`."""
  return compat.vary_like(core, values.astype(jnp.float32).reshape(geo.vector(geo.features)))


def _forward_kernel(geo: Geometry, p: Plan, count: int, epsilon: float):
  block = geo.chunk(p.rows)
  bshape = geo.broadcast(len(block))
  per_chunk = float(math.prod(block) // geo.width)

  def kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, var_ref, cache, shift, acc_1, acc_2):
    sw = _sweep(geo, p, x_ref.dtype)

    def values(ref, k):
      return ref[sw.index(k)].astype(jnp.float32)

    zeros = jnp.zeros(shift.shape, jnp.float32)

    @pl.when((sw.sweep == 0) & (sw.step == 0))
    def _():  # the shift: the first chunk's mean, within ~σ/√(chunk) of the batch mean
      total = jax.lax.fori_loop(
        0, sw.steps, lambda k, s: s + sw.per_feature(values(x_ref, k)), zeros
      )
      shift[...] = total / per_chunk
      acc_1[...] = zeros
      acc_2[...] = zeros

    @pl.when(sw.sweep == 0)
    def _():  # Σ (x − K) and Σ (x − K)² of this chunk
      centre = shift[...].reshape(bshape)

      def sums(k, carry):
        d = values(x_ref, k) - centre
        return carry[0] + sw.per_feature(d), carry[1] + sw.per_feature(d * d)

      part_1, part_2 = jax.lax.fori_loop(0, sw.steps, sums, (zeros, zeros))
      acc_1[...] += part_1
      acc_2[...] += part_2

    _keep(sw, p, [(x_ref, cache)])
    offset_mean = acc_1[...] / count  # mean − K
    mean = shift[...] + offset_mean
    var = jnp.maximum(acc_2[...] / count - offset_mean * offset_mean, 0.0)
    factor = (scale_ref[...] * jax.lax.rsqrt(var + epsilon)).reshape(bshape)
    offset = bias_ref[...].reshape(bshape)

    def emit(refs):
      def normalize(k, carry):
        y = (values(refs[0], k) - mean.reshape(bshape)) * factor + offset
        y_ref[sw.index(k)] = y.astype(y_ref.dtype)
        return carry

      jax.lax.fori_loop(0, sw.steps, normalize, 0)

    _from_cache_or_buffer(sw, p, [(x_ref, cache)], emit)
    mean_ref[...] = mean
    var_ref[...] = var

  return kernel


def backward(x, g, mean, rstd, scale, *, interpret: bool, budget: int):
  """`pallas_backward.backward` in two sweeps (raises as `statistics_and_normalize`)."""
  p = pallas_plan.plan_or_raise(x.shape, [x.dtype, g.dtype], [x.dtype], budget)
  geo = pallas_plan.geometry(x.shape)
  core, gcore = resident.to_view(x, geo.perm), resident.to_view(g, geo.perm)
  grid = _grid(core, geo, p, budget, core.dtype)
  g_cache = pltpu.VMEM(grid.cache.shape, gcore.dtype)
  vectors = [_vector(core, geo, v) for v in (mean, rstd, scale)]
  dx, sum_g, sum_gx = pl.pallas_call(
    _backward_kernel(geo, p, math.prod(core.shape) // geo.features),
    out_shape=(compat.shape_like(core, core.shape, x.dtype), grid.vector, grid.vector),
    grid=(geo.features // geo.width, 2, p.chunks),
    in_specs=[grid.chunk_spec, grid.chunk_spec] + [grid.vector_spec] * 3,
    out_specs=(grid.out_spec, grid.vector_spec, grid.vector_spec),
    scratch_shapes=[grid.cache, g_cache]
    + [pltpu.VMEM(geo.vector(geo.width), jnp.float32) for _ in range(2)],
    compiler_params=grid.params,
    interpret=interpret,
    name=f"{NAME}_bwd_c{p.chunks}_k{p.cached}",
  )(core, compat.vary_like(core, gcore), *vectors)
  return resident.from_view(dx, x.shape, geo.perm), sum_g.reshape(-1), sum_gx.reshape(-1)


def _backward_kernel(geo: Geometry, p: Plan, count: int):
  bshape = geo.broadcast(len(geo.chunk(p.rows)))

  def kernel(x_ref, g_ref, mean_ref, rstd_ref, scale_ref, dx_ref, sum_g_ref, sum_gx_ref, *scratch):
    x_cache, g_cache, acc_g, acc_gc = scratch
    sw = _sweep(geo, p, min((x_ref.dtype, g_ref.dtype), key=lambda d: jnp.dtype(d).itemsize))
    centre = mean_ref[...].reshape(bshape)

    def values(refs, k):
      g = refs[1][sw.index(k)].astype(jnp.float32)
      return g, refs[0][sw.index(k)].astype(jnp.float32) - centre

    @pl.when(sw.sweep == 0)
    def _():
      def sums(k, carry):
        g, centered = values((x_ref, g_ref), k)
        return carry[0] + sw.per_feature(g), carry[1] + sw.per_feature(g * centered)

      zeros = jnp.zeros(acc_g.shape, jnp.float32)
      part_g, part_gc = jax.lax.fori_loop(0, sw.steps, sums, (zeros, zeros))
      first = sw.step == 0
      acc_g[...] = jnp.where(first, 0.0, acc_g[...]) + part_g
      acc_gc[...] = jnp.where(first, 0.0, acc_gc[...]) + part_gc

    pairs = [(x_ref, x_cache), (g_ref, g_cache)]
    _keep(sw, p, pairs)
    rstd = rstd_ref[...]
    factor, offset, slope = (
      v.reshape(bshape)
      for v in pallas_backward.coefficients(scale_ref[...], rstd, acc_g[...], acc_gc[...], count)
    )

    def emit(refs):
      def dx(k, carry):
        g, centered = values(refs, k)
        dx_ref[sw.index(k)] = (factor * g - offset - slope * centered).astype(dx_ref.dtype)
        return carry

      jax.lax.fori_loop(0, sw.steps, dx, 0)

    _from_cache_or_buffer(sw, p, pairs, emit)
    sum_g_ref[...] = acc_g[...]
    sum_gx_ref[...] = acc_gc[...] * rstd

  return kernel
