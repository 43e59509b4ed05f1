"""The Pallas backward kernel (`_src/pallas_backward`) and the linear primitive whose transpose it is
(`_src/kernel_tangent`).

Run in Pallas' interpret mode on the CPU: the kernel against the float64 reference of Ioffe & Szegedy
2015 §3 (`references.batch_norm_train_grads`), the primitive's transpose against its adjoint, reverse
mode through the TPU path against plain autodiff, forward mode and higher orders (which fall back to
XLA's formula), `vmap`, `shard_map(check_vma=True)` on 8 CPU devices, and the fall-back to XLA's
backward where the kernel does not fit. The TPU compiler builds it in `tests/test_tpu_compile.py`.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from normjax._src import fused_batch_norm
from normjax._src import kernel_tangent
from normjax._src import pallas_backward
from normjax._src import pallas_plan
from tests import helpers
from tests import references

EPS = 1e-5
SHAPES = [  # in a layout the kernels read (`pallas_batch_norm.LAYOUT`)
  (16, 2),
  (8, 7, 16, 256),  # two feature blocks of 128
  (4, 5, 16, 64),
  (32, 200),
  (3, 2, 400, 128),  # chunks along axis 1
  (16, 3, 5, 16),  # W = 5: read as its (H, W, N, C) view, the TPU's layout
]


def _data(shape, dtype, seed=0):
  x = jnp.asarray(helpers.normal_data(shape, mean=3.0, std=2.0, seed=seed), dtype)
  g = jnp.asarray(helpers.normal_data(shape, seed=seed + 1), dtype)
  scale = jnp.asarray(np.random.default_rng(seed + 2).uniform(0.5, 1.5, shape[-1]), jnp.float32)
  return x, g, scale


def _statistics(x):
  axes = tuple(range(x.ndim - 1))
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var = xs.mean(axes, keepdims=True), xs.var(axes, keepdims=True)
  return jnp.asarray(mean, jnp.float32), jnp.asarray(1 / np.sqrt(var + EPS), jnp.float32)


def _loss(x, scale, bias, weights, budget=None):
  y, _, _ = fused_batch_norm.statistics_and_normalize(
    x, scale, bias, epsilon=EPS, interpret=True, budget=budget
  )
  return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)


def _reference_loss(x, scale, bias, weights):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = xf.mean(axes)
  y = (xf - mean) * jax.lax.rsqrt(jnp.mean((xf - mean) ** 2, axes) + EPS) * scale + bias
  return jnp.sum(jnp.sin(y.astype(x.dtype).astype(jnp.float32)) * weights)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_float64_reference(shape, dtype):
  x, g, scale = _data(shape, dtype)
  mean, rstd = _statistics(x)
  dx, sum_g, sum_gx = pallas_backward.backward(x, g, mean, rstd, scale, interpret=True)
  axes = tuple(range(len(shape) - 1))
  ref_dx, ref_sum_gx, ref_sum_g = references.batch_norm_train_grads(
    np.asarray(x.astype(jnp.float32)), np.asarray(g.astype(jnp.float32)), axes, scale, EPS
  )
  assert dx.shape == shape and dx.dtype == jnp.dtype(dtype)
  assert sum_g.shape == sum_gx.shape == (shape[-1],) and sum_g.dtype == jnp.float32
  tolerance = 1e-5 if dtype == "float32" else 8e-3  # bfloat16: dx rounded once (2⁻⁸ relative)
  scale_dx = np.abs(ref_dx).max()
  np.testing.assert_allclose(dx.astype(jnp.float32) / scale_dx, ref_dx / scale_dx, atol=tolerance)
  np.testing.assert_allclose(sum_g, ref_sum_g.ravel(), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(sum_gx, ref_sum_gx.ravel(), rtol=1e-5, atol=1e-3)


def test_transpose_is_the_adjoint_of_the_tangent():
  """<g, T(t, s, b)> = <T*(g), (t, s, b)>: the kernel is the transpose of XLA's tangent formula."""
  x, g, scale = _data((4, 5, 16, 64), "float32")
  mean, rstd = _statistics(x)
  keep = mean.shape
  t, s, b = jnp.asarray(helpers.normal_data(x.shape, seed=7)), jnp.ones(keep), jnp.full(keep, -2.0)
  tangent = functools.partial(
    kernel_tangent.batch_norm_tangent, x, mean, rstd, scale, interpret=True
  )
  cts = jax.linear_transpose(tangent, t, s, b)(g)
  forward = kernel_tangent.formula(x, mean, rstd, scale.reshape(keep), t, s, b)
  lhs = float(jnp.vdot(g, forward))
  rhs = sum(float(jnp.vdot(c, v)) for c, v in zip(cts, (t, s, b)))
  assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + abs(rhs))
  assert "pallas_call" in str(jax.make_jaxpr(jax.linear_transpose(tangent, t, s, b))(g))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reverse_mode_runs_both_kernels_and_matches_autodiff(dtype):
  x, _, scale = _data((8, 4, 16, 128), dtype)
  bias = jnp.linspace(-1.0, 1.0, 128)
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=5))
  grad = jax.grad(_loss, argnums=(0, 1, 2))
  assert str(jax.make_jaxpr(grad)(x, scale, bias, weights)).count("pallas_call") == 2
  got = grad(x, scale, bias, weights)
  expected = jax.grad(_reference_loss, argnums=(0, 1, 2))(x, scale, bias, weights)
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for a, b in zip(got, expected):
    a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    np.testing.assert_allclose(a / np.abs(b).max(), b / np.abs(b).max(), atol=tolerance)


def test_forward_mode_and_second_order_fall_back_to_xla():
  x, _, scale = _data((2, 1, 16, 8), "float32")
  bias = jnp.zeros(8)
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=5))
  loss = functools.partial(_loss, scale=scale, bias=bias, weights=weights)
  reference = functools.partial(_reference_loss, scale=scale, bias=bias, weights=weights)
  for transform in (
    lambda f: jax.jacfwd(jax.grad(f)),  # forward over reverse: the kernel's own JVP rule
    lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2)),  # reverse over reverse
    lambda f: jax.jacfwd(jax.jacfwd(f)),  # forward over forward: the primitive's JVP
  ):
    got, expected = transform(loss)(x), transform(reference)(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  check_grads(loss, (x,), order=1, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2, eps=1e-2)


def test_backward_that_does_not_fit_takes_xla():
  """A budget the forward kernel fits but the backward (three arrays) does not, for 2-D `x` (which
  the streaming kernels do not take): one kernel, same gradient."""
  x, _, scale = _data((512, 128), "float32")
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=5))
  budget = 2 * 2**20  # forward: 2 × (x + y) blocks (1 MiB) and temporaries; backward: 2 × 3 blocks
  assert pallas_backward.vmem_bytes(x.shape, x.dtype, x.dtype) > budget
  assert not pallas_backward.fits(x.shape, x.dtype, x.dtype, budget)
  assert pallas_plan.backward_kernel(x.shape, x.dtype, x.dtype, budget) is None
  loss = functools.partial(_loss, bias=jnp.zeros(128), weights=weights, budget=budget)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x, scale))
  assert jaxpr.count("pallas_call") == 1
  np.testing.assert_allclose(
    jax.grad(loss)(x, scale), jax.grad(_loss)(x, scale, jnp.zeros(128), weights), atol=1e-6
  )


def test_backward_that_does_not_fit_sweeps_twice():
  """Where the resident backward does not fit, 4-D `x` takes `pallas_streaming`'s two sweeps: the
  forward stays resident, the gradient is autodiff's."""
  x, _, scale = _data((8, 4, 16, 128), "float32")
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=5))
  budget = 2 * 2**20
  assert not pallas_backward.fits(x.shape, x.dtype, x.dtype, budget)
  assert pallas_plan.backward_kernel(x.shape, x.dtype, x.dtype, budget) == "streaming"
  loss = functools.partial(_loss, bias=jnp.zeros(128), weights=weights, budget=budget)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x, scale))
  assert jaxpr.count("pallas_call") == 2 and "normjax_bn_stream_bwd" in jaxpr
  np.testing.assert_allclose(
    jax.grad(loss)(x, scale), jax.grad(_loss)(x, scale, jnp.zeros(128), weights), atol=1e-6
  )


def test_vmap_of_the_gradient():
  x, _, scale = _data((3, 2, 16, 64), "float32")
  weights = jnp.asarray(helpers.normal_data(x.shape[1:], seed=5))
  grad = jax.grad(functools.partial(_loss, scale=scale, bias=jnp.zeros(64), weights=weights))
  reference = jax.grad(
    functools.partial(_reference_loss, scale=scale, bias=jnp.zeros(64), weights=weights)
  )
  np.testing.assert_allclose(jax.vmap(grad)(x), jax.vmap(reference)(x), rtol=1e-5, atol=1e-6)


def test_shard_map_per_device_gradients():
  """Per-device statistics inside `shard_map` on 8 CPU devices: with the varying-axis checks on, the
  kernels type their results like `x` (traced; JAX's Pallas interpreter itself fails those checks,
  for the forward kernel too, so the values are computed with them off; `tests/test_tpu_compile.py`
  compiles the kernels with them on), and each device's gradient is its own BatchNorm's."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("batch",))
  x, _, scale = _data((8 * 2, 16, 128), "float32")
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=5))
  loss = functools.partial(_loss, bias=jnp.zeros(128))

  def per_device(x, scale, weights):
    return jax.grad(loss)(x, scale, weights=weights)

  spec = jax.sharding.PartitionSpec("batch")
  sharded = functools.partial(
    jax.shard_map, per_device, mesh=mesh, in_specs=(spec, None, spec), out_specs=spec
  )
  jaxpr = str(jax.make_jaxpr(sharded(check_vma=True))(x, scale, weights))
  assert jaxpr.count("pallas_call") == 2
  got = jax.jit(sharded(check_vma=False))(x, scale, weights)
  grad = jax.grad(functools.partial(_reference_loss, scale=scale, bias=jnp.zeros(128)))
  expected = jnp.concatenate(
    [grad(x[2 * i : 2 * i + 2], weights=weights[2 * i : 2 * i + 2]) for i in range(8)]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_unsupported_input_names_shapes_and_dtypes():
  x = jnp.ones((16, 3))
  vectors = (jnp.zeros(3), jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match=r"g of shape \(8, 3\).*expected g of x's shape"):
    pallas_backward.backward(x, jnp.ones((8, 3)), *vectors, interpret=True)
  with pytest.raises(ValueError, match="dtype float16"):
    pallas_backward.backward(x, x.astype(jnp.float16), *vectors, interpret=True)
  with pytest.raises(ValueError, match="needing at most 1000 bytes"):
    pallas_backward.backward(x, x, *vectors, interpret=True, budget=1000)


@hypothesis.settings(deadline=None, max_examples=12, derandomize=True)
@hypothesis.given(
  rows=st.sampled_from([8, 16, 24]),
  leading=st.integers(1, 3),
  features=st.sampled_from([1, 3, 64, 130]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  seed=st.integers(0, 1000),
)
def test_dx_is_orthogonal_to_ones_and_xhat(rows, leading, features, dtype, seed):
  """Per feature, Σ dx = 0 and Σ dx·x̂ = a·Σ g·x̂·ε/(var + ε) ≈ 0: a shift or a rescaling of a
  feature's inputs does not change the normalized output."""
  x, g, scale = _data((leading, rows, features), dtype, seed=seed)
  mean, rstd = _statistics(x)
  dx, _, _ = pallas_backward.backward(x, g, mean, rstd, scale, interpret=True)
  dx = np.asarray(dx.astype(jnp.float32), np.float64)
  xhat = (np.asarray(x.astype(jnp.float32), np.float64) - np.asarray(mean)) * np.asarray(rstd)
  size = np.sqrt(np.sum(dx**2, axis=(0, 1)) * rows * leading) + 1e-12
  tolerance = 1e-5 if dtype == "float32" else 1e-2
  assert np.all(np.abs(dx.sum(axis=(0, 1))) <= tolerance * size)
  assert np.all(np.abs((dx * xhat).sum(axis=(0, 1))) <= tolerance * size)
