"""The streaming Pallas kernels (`normjax/_src/pallas_streaming.py`) in interpret mode, against float64
references of Ioffe & Szegedy (2015), Algorithm 1 and §3; their plans and their traffic from the block
specs. `tests/test_tpu_compile.py` compiles them for TPUs."""

from unittest import mock

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax._src import pallas_batch_norm
from normjax._src import pallas_plan
from normjax._src import pallas_streaming
from tests import helpers

EPS = 1e-5
V5E_BUDGET = 96 * 2**20
CASES = [  # (shape, budget): views of both layouts, one and two feature blocks
  ((16, 3, 5, 16), 400_000),  # W = 5: the (3, 5, 16, 16) view, chunks of H
  ((8, 5, 16, 8), 400_000),  # row-major, chunks of the batch
  ((4, 2, 8, 256), 300_000),  # two feature blocks of 128
  (
    (128, 3, 4, 16),
    600_000,
  ),  # the batch on the lanes: the (3, 4, 16, 128) view, features on sublanes
]


def _plan_with(cached):
  """`plan`, with `cached` chunks kept (None: the plan's own; -1: all of them)."""
  original = pallas_plan.plan

  def patched(*args, **kwargs):
    p = original(*args, **kwargs)
    if cached is None or p is None:
      return p
    return p._replace(cached=p.chunks if cached == -1 else min(cached, p.chunks))

  return mock.patch.object(pallas_plan, "plan", patched)


def _data(shape, dtype, mean=3.0):
  x = jnp.asarray(helpers.normal_data(shape, mean=mean, std=2.0, seed=0), dtype)
  g = jnp.asarray(helpers.normal_data(shape, seed=1), dtype)
  scale = jnp.asarray(np.random.default_rng(2).uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(np.random.default_rng(3).normal(size=shape[-1]), jnp.float32)
  return x, g, scale, bias


def _reference(x, g, scale, bias):
  """float64 y, mean, var (biased), dx, Σg, Σg·x̂."""
  axes = tuple(range(x.ndim - 1))
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  gs = np.asarray(g.astype(jnp.float32), np.float64)
  mean, var = xs.mean(axes), xs.var(axes)
  rstd = 1 / np.sqrt(var + EPS)
  xhat = (xs - mean) * rstd
  n = xs.size // xs.shape[-1]
  sum_g, sum_gx = gs.sum(axes), (gs * xhat).sum(axes)
  dx = np.asarray(scale) * rstd * (gs - sum_g / n - xhat * sum_gx / n)
  return xhat * np.asarray(scale) + np.asarray(bias), mean, var, dx, sum_g, sum_gx


@pytest.mark.parametrize("cached", [0, 1, None, -1], ids=["none", "one", "plan", "all"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape, budget", CASES, ids=str)
def test_sweeps_match_float64_reference(shape, budget, dtype, cached):
  """Forward and backward, whatever the number of chunks kept in VMEM."""
  x, g, scale, bias = _data(shape, dtype)
  y_ref, mean_ref, var_ref, dx_ref, sum_g_ref, sum_gx_ref = _reference(x, g, scale, bias)
  with _plan_with(cached):
    p = pallas_plan.plan(shape, [x.dtype], [x.dtype], budget)
    assert p is not None and p.chunks >= 2
    y, mean, var = pallas_streaming.statistics_and_normalize(
      x, scale, bias, epsilon=EPS, dtype=x.dtype, interpret=True, budget=budget
    )
    rstd = jnp.asarray(1 / np.sqrt(var_ref + EPS), jnp.float32)
    dx, sum_g, sum_gx = pallas_streaming.backward(
      x, g, jnp.asarray(mean_ref, jnp.float32), rstd, scale, interpret=True, budget=budget
    )
  rounding = 1e-5 if dtype == "float32" else 1e-2  # y and dx are rounded to x's dtype once
  np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(var, var_ref, rtol=1e-5)
  np.testing.assert_allclose(y.astype(jnp.float32), y_ref, atol=rounding * np.abs(y_ref).max())
  np.testing.assert_allclose(dx.astype(jnp.float32), dx_ref, atol=rounding * np.abs(dx_ref).max())
  np.testing.assert_allclose(sum_g, sum_g_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(sum_gx, sum_gx_ref, rtol=1e-5, atol=1e-4)


def test_merged_chunk_variance_is_accurate_at_a_large_mean():
  """Chan's merge of exact per-chunk moments: relative variance error ≤ 1e-4 at mean 1e4, std 1."""
  shape, budget = (16, 3, 5, 16), 400_000
  x = jnp.asarray(helpers.normal_data(shape, mean=1e4, std=1.0, seed=4), jnp.float32)
  _, _, var = pallas_streaming.statistics_and_normalize(
    x, jnp.ones(16), jnp.zeros(16), epsilon=0.0, dtype=jnp.float32, interpret=True, budget=budget
  )
  reference = np.asarray(x, np.float64).var((0, 1, 2))
  assert np.max(np.abs(np.asarray(var) / reference - 1)) <= 1e-4


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(chunks=st.integers(2, 40), data=st.data())
def test_traffic_walks_the_index_maps(chunks, data):
  """Inputs once plus the chunks that are neither cached nor the last one; outputs once."""
  cached = data.draw(st.integers(0, chunks))
  p = pallas_plan.Plan(rows=1, chunks=chunks, cached=cached)
  again = chunks - max(cached, 1)
  assert pallas_plan.traffic(p, [chunks * 10, chunks * 3], [chunks * 7]) == (
    (chunks + again) * 13 + chunks * 7
  )
  name = f"{pallas_plan.NAME}_bwd_c{chunks}_k{cached}.7"
  assert pallas_plan.reread(name) == pytest.approx(again / chunks)
  assert pallas_plan.reread("fusion.7") == 0.0


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(
  outer=st.sampled_from([8, 16, 32, 64, 256]),
  inner=st.sampled_from([(3, 3), (7, 7), (14, 14), (16, 16), (28, 28), (56, 56)]),
  features=st.sampled_from([64, 128, 256]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  budget=st.sampled_from([2**20, 12 * 2**20, V5E_BUDGET]),
)
def test_plan_stays_within_the_budget(outer, inner, features, dtype, budget):
  """Double-buffered chunks, temporaries and cache, in VMEM's padded tiles, fit the budget."""
  shape = (outer, *inner, features)
  for inputs in ([dtype], [dtype, dtype]):
    p = pallas_plan.plan(shape, inputs, [dtype], budget)
    if p is None:
      continue
    geo = pallas_plan.geometry(shape)
    tiles = pallas_batch_norm.tiled_bytes(geo.chunk(p.rows), dtype)
    assert geo.view[0] == p.rows * p.chunks and p.chunks >= 2 and 0 <= p.cached <= p.chunks
    assert (2 * (len(inputs) + 1) + p.cached * len(inputs)) * tiles <= budget


@pytest.mark.parametrize(
  "shape, dtype, kernel",
  [
    ((256, 28, 28, 128), "bfloat16", "streaming"),  # 51.4 MB blocks: the resident kernel's 205 MB
    ((256, 14, 14, 256), "bfloat16", "resident"),
    ((256, 56, 56, 256), "bfloat16", None),  # little cache: 7.2 N, more than XLA's 7 N
    ((256, 56, 56, 64), "bfloat16", "streaming"),  # the batch on the lanes: features on sublanes
    ((256, 56, 56, 64), "float32", None),  # 205 MB: too little of it cached to pay
    ((4096, 1024), "float32", "resident"),
    ((65536, 1024), "float32", None),  # 2-D: no chunks of whole sublane tiles
  ],
)
def test_kernel_choice_on_v5e(shape, dtype, kernel):
  assert pallas_plan.forward_kernel(shape, dtype, dtype, V5E_BUDGET) == kernel
  assert pallas_plan.backward_kernel(shape, dtype, dtype, V5E_BUDGET) == kernel


def test_unsupported_input_names_its_shape_and_budget():
  x = jnp.ones((16, 3, 5, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"shape \(16, 3, 5, 16\).*within 1000 bytes"):
    pallas_streaming.statistics_and_normalize(
      x, jnp.ones(16), jnp.zeros(16), epsilon=EPS, dtype=x.dtype, interpret=True, budget=1000
    )
  with pytest.raises(ValueError, match=r"shape \(64, 16\).*at least 3-D"):
    pallas_streaming.backward(
      jnp.ones((64, 16)),
      jnp.ones((64, 16)),
      jnp.zeros(16),
      jnp.ones(16),
      jnp.ones(16),
      interpret=True,
      budget=2**20,
    )


def test_jit_equals_eager_and_the_gradient_is_autodiffs():
  """Through `fused_batch_norm` (both kernels streaming at this budget) under `jit`."""
  from normjax._src import fused_batch_norm  # pylint: disable=g-import-not-at-top

  shape, budget = (16, 3, 5, 16), 400_000
  x, g, scale, bias = _data(shape, "float32")

  def loss(x, scale, bias):
    y, _, _ = fused_batch_norm.statistics_and_normalize(
      x, scale, bias, epsilon=EPS, interpret=True, budget=budget
    )
    return jnp.sum(jnp.sin(y) * g)

  def reference(x, scale, bias):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return jnp.sum(jnp.sin((x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias) * g)

  assert "normjax_bn_stream_bwd" in str(jax.make_jaxpr(jax.grad(loss))(x, scale, bias))
  np.testing.assert_allclose(jax.jit(loss)(x, scale, bias), loss(x, scale, bias), rtol=1e-5)
  for ours, theirs in zip(
    jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias),
    jax.grad(reference, (0, 1, 2))(x, scale, bias),
  ):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
