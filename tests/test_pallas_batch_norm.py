"""The Pallas TPU kernel for BatchNorm's training statistics and normalization (`_src/pallas_batch_norm`).

Run here in Pallas' interpret mode on the CPU: the kernel's values against float64 NumPy references
from Ioffe & Szegedy 2015 (Alg. 1 and §3), its derivatives (the closed-form rule of
`fused_batch_norm`) against the same references and finite differences, and BatchNorm's TPU branch
(`batch_norm._kernel_training`) against its portable XLA branch. The CPU program must not change: the
kernel is staged only for TPUs (`tests/test_tpu_compile.py` compiles it with the TPU compiler).
"""

import functools
import math
import re
from unittest import mock

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
from normjax._src import batch_norm as bn_lib
from normjax._src import fused_batch_norm
from normjax._src import pallas_batch_norm
from tests import helpers
from tests import references

EPS = 1e-5
SHAPES = [  # in a layout the kernels read (`pallas_batch_norm.LAYOUT`)
  (16, 2),  # 2-D: chunks of whole sublane tiles
  (8, 7, 16, 256),  # two feature blocks of 128
  (4, 5, 16, 64),  # fewer than 128 features: one block
  (32, 200),  # not a multiple of 128: one block
  (64, 4, 16, 128),  # several slices of axis 0 per chunk
  (3, 2, 400, 128),  # chunks along axis 1
  (16, 3, 5, 16),  # W = 5: read as its (H, W, N, C) view, the TPU's layout
]
KERNEL = functools.partial(fused_batch_norm.statistics_and_normalize, epsilon=EPS, interpret=True)


def _inputs(shape, dtype, mean=3.0, std=2.0, seed=0):
  x = jnp.asarray(helpers.normal_data(shape, mean=mean, std=std, seed=seed), dtype)
  rng = np.random.default_rng(seed + 1)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  return x, scale, bias


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_float64_reference(shape, dtype):
  x, scale, bias = _inputs(shape, dtype)
  y, mean, var = KERNEL(x, scale, bias)
  axes = tuple(range(len(shape) - 1))
  ref_y, ref_mean, ref_var = references.batch_norm_train(
    np.asarray(x.astype(jnp.float32)), axes, np.asarray(scale), np.asarray(bias), EPS
  )
  assert y.shape == shape and y.dtype == jnp.dtype(dtype)
  assert mean.shape == var.shape == (shape[-1],) and mean.dtype == var.dtype == jnp.float32
  np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(var, ref_var.ravel(), rtol=1e-5)
  tolerance = 1e-5 if dtype == "float32" else 2e-2  # bfloat16: one rounding of |y| < 8
  np.testing.assert_allclose(
    np.asarray(y.astype(jnp.float32)), ref_y, atol=tolerance, rtol=tolerance
  )


def test_variance_stays_accurate_at_a_large_mean():
  x = jnp.asarray(helpers.normal_data((32, 8, 16, 128), mean=1e4, std=1.0))
  _, _, var = KERNEL(x, None, None)
  reference = np.asarray(x, np.float64).reshape(-1, 128).var(axis=0)
  assert np.max(np.abs(np.asarray(var) - reference) / reference) <= 1e-4


def test_reverse_mode_matches_the_papers_backward():
  x, scale, bias = _inputs((8, 7, 16, 256), "float32")
  dy = jnp.asarray(helpers.normal_data(x.shape, seed=7))
  (y, _, _), pullback = jax.vjp(KERNEL, x, scale, bias)
  dx, dscale, dbias = pullback((dy, jnp.zeros(256), jnp.zeros(256)))
  axes = (0, 1, 2)
  ref_dx, sum_dy_xhat, sum_dy = references.batch_norm_train_grads(
    np.asarray(x), np.asarray(dy), axes, np.asarray(scale), EPS
  )
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dscale, sum_dy_xhat.ravel(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dbias, sum_dy.ravel(), rtol=1e-5, atol=1e-4)


def test_statistics_tangents_are_those_of_the_mean_and_variance():
  x, scale, bias = _inputs((16, 4), "float32")
  dx = jnp.asarray(helpers.normal_data(x.shape, seed=3))
  _, (_, dmean, dvar) = jax.jvp(KERNEL, (x, scale, bias), (dx, jnp.zeros(4), jnp.zeros(4)))
  xs, us = np.asarray(x, np.float64), np.asarray(dx, np.float64)
  np.testing.assert_allclose(dmean, us.mean(axis=0), rtol=1e-5, atol=1e-6)
  expected = 2 * ((xs - xs.mean(axis=0)) * us).mean(axis=0)
  np.testing.assert_allclose(dvar, expected, rtol=1e-4, atol=1e-5)


def test_gradients_check_against_finite_differences():
  x, scale, bias = _inputs((2, 16, 3), "float32", std=1.0)
  weights = jnp.asarray(helpers.normal_data(x.shape, seed=9))
  loss = lambda x, s, b: jnp.sum(KERNEL(x, s, b)[0] * weights)  # noqa: E731
  check_grads(loss, (x, scale, bias), order=1, modes=("fwd", "rev"), atol=5e-2, rtol=5e-2, eps=1e-2)


def test_unsupported_input_names_its_shape_dtype_and_budget():
  with pytest.raises(ValueError, match=r"shape \(16, 3\) and dtype float16"):
    pallas_batch_norm.statistics_and_normalize(
      jnp.ones((16, 3), jnp.float16), jnp.ones(3), jnp.zeros(3), epsilon=EPS, interpret=True
    )
  with pytest.raises(ValueError, match=r"in a layout it reads in place"):
    pallas_batch_norm.statistics_and_normalize(
      jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3), epsilon=EPS, interpret=True
    )
  with pytest.raises(ValueError, match=r"at most 1000 bytes of VMEM \(it needs \d+\)"):
    pallas_batch_norm.statistics_and_normalize(
      jnp.ones((16, 3)), jnp.ones(3), jnp.zeros(3), epsilon=EPS, interpret=True, budget=1000
    )


@pytest.mark.parametrize(
  "shape, layout, kernel_shape",
  [
    ((256, 28, 28, 128), "batch rows", (28, 28, 256, 128)),  # the TPU's {3,0,2,1}
    ((1, 8, 7, 7, 512), "batch rows", (7, 7, 8, 512)),  # one group of a BatchNorm step
    ((8, 49, 512), "batch rows", (49, 8, 512)),
    ((32, 1, 1, 512), "batch rows", (1, 1, 32, 512)),
    ((32, 56, 56, 64), "rows", (32, 56, 56, 64)),
    ((4096, 1024), "rows", (4096, 1024)),
    ((256, 56, 56, 64), "batch lanes", None),  # the TPU's {0,3,2,1}
    ((32, 4, 4, 512), "small tiles", None),  # (4, 128) tiles
    ((6, 7, 7, 512), "padded", None),
    ((12, 64), "padded", None),
  ],
)
def test_compiler_layout_decides_the_view(shape, layout, kernel_shape):
  """The layouts libtpu gives these shapes (`pallas_batch_norm.LAYOUT`), and the view the kernels
  read; the TPU compile suite checks on v5e that the views need no copies (5 N)."""
  assert pallas_batch_norm.compiler_layout(shape) == layout
  if kernel_shape is not None:
    assert pallas_batch_norm.view(shape)[0] == kernel_shape
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
    assert jax.eval_shape(pallas_batch_norm.to_view, abstract).shape == kernel_shape
    if math.prod(shape) < 2**20:
      x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
      back = pallas_batch_norm.from_view(pallas_batch_norm.to_view(x), shape)
      np.testing.assert_array_equal(back, x)
  assert pallas_batch_norm.fits(shape, jnp.float32, jnp.float32, 2**40) == (
    kernel_shape is not None
  )


def test_budget_decides_which_shapes_fit():
  shape = (64, 14, 16, 512)  # bfloat16: double-buffered x and y blocks of 3.7 MB each
  assert pallas_batch_norm.vmem_bytes(shape, jnp.bfloat16, jnp.bfloat16) > 2 * 4 * 14336 * 128
  assert not pallas_batch_norm.fits(shape, jnp.bfloat16, jnp.bfloat16)  # the 12 MiB default
  with pallas_batch_norm.assume_vmem_budget(96 * 2**20):
    assert pallas_batch_norm.fits(shape, jnp.bfloat16, jnp.bfloat16)
    assert not pallas_batch_norm.fits((256, 32, 32, 128), jnp.bfloat16, jnp.bfloat16)  # 268 MB
    assert pallas_batch_norm.fits((8, 7, 7, 512), jnp.bfloat16, jnp.bfloat16)  # (7, 7, 8, 512)
    for layout in [(6, 7, 7, 512), (32, 4, 4, 512), (256, 56, 56, 64)]:
      assert not pallas_batch_norm.fits(layout, jnp.bfloat16, jnp.bfloat16), layout
  assert not pallas_batch_norm.fits((8,), jnp.float32, jnp.float32)


def _tpu_branch():
  """Patches BatchNorm to take its TPU branch on this CPU, the kernel in interpret mode."""
  original = jax.lax.platform_dependent

  def take_tpu(*args, **branches):  # BatchNorm's choice only; the others stay as they are
    return branches["tpu"](*args) if "tpu" in branches else original(*args, **branches)

  return mock.patch.object(jax.lax, "platform_dependent", take_tpu), mock.patch.object(
    fused_batch_norm,
    "statistics_and_normalize",
    functools.partial(fused_batch_norm.statistics_and_normalize, interpret=True),
  )


def _train_step(bn, params, state, x, dy):
  def loss(p, x):
    y, new_state = bn.apply(p, state, x, training=True)
    return jnp.sum(y.astype(jnp.float32) * dy), new_state

  (value, new_state), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return value, new_state, grads


@pytest.mark.parametrize(
  "options", [{}, {"use_scale": False}, {"debias": True, "momentum": 0.9}], ids=str
)
def test_tpu_branch_equals_the_portable_branch(options):
  bn = normjax.batch_norm(epsilon=EPS, tpu_kernel=True, **options)
  x, _, _ = _inputs((8, 5, 16, 32), "float32")
  config = bn_lib.BatchNormConfig(tpu_kernel=True)
  assert "tpu" in bn_lib._kernels(config, x, None, (3,), x.dtype)  # pylint: disable=protected-access
  params, state = bn.init(x)
  state = state._replace(mean=state.mean + 2.0, count=jnp.asarray(3, jnp.int32))
  dy = jnp.asarray(helpers.normal_data(x.shape, seed=4))
  expected = jax.jit(functools.partial(_train_step, bn))(params, state, x, dy)
  patches = _tpu_branch()
  with patches[0], patches[1]:
    got = _train_step(bn, params, state, x, dy)
    _, tangent = jax.jvp(lambda x: bn.apply(params, state, x, training=True)[0], (x,), (dy,))
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, expected
  )
  _, expected_tangent = jax.jvp(lambda x: bn.apply(params, state, x, training=True)[0], (x,), (dy,))
  np.testing.assert_allclose(tangent, expected_tangent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "options, masked, handled",
  [
    ({}, False, True),
    ({"stats_method": "two_pass"}, False, True),
    ({}, True, False),
    ({"ghost_batch_size": 4}, False, False),
    ({"renorm": True}, False, False),
    ({"stats_method": "fast"}, False, False),
    ({"axis": 1}, False, False),
    ({"axis_name": "batch"}, False, False),
    ({"axis": 2}, False, False),
    ({"tpu_kernel": False}, False, False),  # the default
  ],
  ids=str,
)
def test_which_training_steps_a_tpu_runs_as_the_kernel(options, masked, handled):
  config = bn_lib.BatchNormConfig(**{"tpu_kernel": True, **options})
  x = jnp.ones((8, 4, 16, 16))
  mask = jnp.ones((8, 4, 16, 1), bool) if masked else None
  axes = bn_lib.feature_axes(config, x.ndim)
  assert ("tpu" in bn_lib._kernels(config, x, mask, axes, x.dtype)) is handled  # pylint: disable=protected-access


def test_cpu_program_has_no_tpu_kernel(monkeypatch):
  bn = normjax.batch_norm(tpu_kernel=True)
  x = jnp.ones((8, 4, 16, 16))
  params, state = bn.init(x)
  step = lambda p, x: jax.grad(lambda p: jnp.sum(bn.apply(p, state, x, training=True)[0]))(p)  # noqa: E731
  hlo = jax.jit(step).lower(params, x).compile().as_text()
  assert "tpu_custom_call" not in hlo
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")  # without the CPU's own kernel: no custom call
  hlo = jax.jit(lambda p, x: step(p, x)).lower(params, x).compile().as_text()  # a new trace
  assert "custom-call" not in hlo


@hypothesis.given(
  leading=st.lists(st.integers(1, 4), min_size=0, max_size=2),
  rows=st.sampled_from([16, 32, 48]),
  features=st.sampled_from([1, 3, 64, 128, 130, 256]),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  seed=st.integers(0, 2**16),
)
@hypothesis.settings(max_examples=12)
def test_each_feature_has_mean_bias_and_std_scale(leading, rows, features, dtype, seed):
  shape = tuple(leading) + (rows, features)
  x, scale, bias = _inputs(shape, dtype, mean=-5.0, std=3.0, seed=seed)
  x = x.at[0].add(1.0)  # no constant feature
  y, _, _ = KERNEL(x, scale, bias)
  y = np.asarray(y.astype(jnp.float32), np.float64).reshape(-1, features)
  var = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, features).var(axis=0)
  tolerance = 1e-4 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(y.mean(axis=0), bias, atol=tolerance * 10)
  expected_std = np.asarray(scale) * np.sqrt(var / (var + EPS))  # ε shrinks a tiny variance's std
  np.testing.assert_allclose(y.std(axis=0), expected_std, rtol=tolerance * 10, atol=tolerance)


def _instructions(hlo):
  """The optimized HLO's instructions without names and metadata, sorted (the program, not its
  spelling)."""
  lines = []
  for line in hlo.splitlines():
    if " = " in line:
      line = re.sub(r"metadata=\{[^}]*\}|stack_frame_id=\d+", "", line)
      lines.append(re.sub(r"%?[\w.\-]+(\.\d+)\b|%[\w.\-]+", "N", line).strip())
  return sorted(lines)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_program_is_the_one_without_the_kernel(dtype):
  """A shape a TPU runs as the kernel compiles for the CPU to exactly the program of a budget that
  never takes it: staging the TPU branch changes nothing on other platforms."""
  bn = normjax.batch_norm(tpu_kernel=True)
  x = jnp.ones((16, 16, 16, 128), dtype)
  assert pallas_batch_norm.fits(x.shape, x.dtype, x.dtype)
  params, state = bn.init(x)

  def step(p, x):
    (y, new_state), pullback = jax.vjp(lambda p, x: bn.apply(p, state, x, training=True), p, x)
    return y, new_state, pullback((y, jax.tree_util.tree_map(jnp.zeros_like, new_state)))

  programs = []
  for budget in (None, 0):
    with pallas_batch_norm.assume_vmem_budget(budget or pallas_batch_norm.vmem_budget()):
      programs.append(_instructions(jax.jit(step).lower(params, x).compile().as_text()))
  assert programs[0] == programs[1]
