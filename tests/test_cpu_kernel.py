"""BatchNorm's CPU kernel (`normjax/_src/cpu_kernel.py`, `cpu_batch_norm.cc`): float64 references, the
in-kernel second pass, rounding, the fallback without a compiler, and the training step that uses it."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from benchmarks import hlo_stats
import normjax
from normjax._src import cpu_kernel
from normjax._src import fused_batch_norm
from tests import helpers
from tests import test_renorm

pytestmark = helpers.needs_cpu_kernel()


EPS = 1e-5


def _reference(x, scale, bias, epsilon=EPS):
  """float64 mean, biased variance and y of x (features last)."""
  xd = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, x.shape[-1])
  mean, var = xd.mean(axis=0), xd.var(axis=0)
  y = (xd - mean) / np.sqrt(var + epsilon) * np.asarray(scale, np.float64) + np.asarray(bias)
  return y.reshape(x.shape), mean, var


def _inputs(shape, dtype, mean=0.5, std=2.0, seed=0):
  x = jnp.asarray(helpers.normal_data(shape, mean=mean, std=std, seed=seed)).astype(dtype)
  scale = jnp.asarray(helpers.normal_data(shape[-1:], mean=1.0, std=0.3, seed=seed + 1))
  bias = jnp.asarray(helpers.normal_data(shape[-1:], std=0.5, seed=seed + 2))
  return x, scale, bias


@pytest.mark.parametrize(
  "shape", [(2, 1), (16, 3), (6, 7, 33), (4, 5, 7, 64), (700, 100), (64, 28, 28, 8)], ids=str
)
@pytest.mark.parametrize(
  "dtype, out_dtype",
  [
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("bfloat16", "float32"),
    ("float32", "bfloat16"),
  ],
)
def test_matches_float64_reference(shape, dtype, out_dtype):
  """(64, 28, 28, 8) has 401,408 elements and (700, 100) 70,000: their rows are split over two
  threads. The kernel sums 32 features at a time: 33 and 100 leave a partial tile."""
  x, scale, bias = _inputs(shape, dtype)
  y, mean, var = jax.jit(
    functools.partial(cpu_kernel.statistics_and_normalize, epsilon=EPS, dtype=out_dtype)
  )(x, scale, bias)
  want_y, want_mean, want_var = _reference(x, scale, bias)
  assert y.dtype == jnp.dtype(out_dtype) and y.shape == x.shape
  assert mean.dtype == var.dtype == jnp.float32 and mean.shape == var.shape == shape[-1:]
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)  # float32 block sums: a few eps·√rows
  tolerance = 2e-5 if out_dtype == "float32" else 1e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tolerance, atol=tolerance)


_FRESH_PAGES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from benchmarks import _common
from normjax._src import cpu_kernel
_common.pin_allocator("fault")  # every output block mapped afresh: its first page is not resident
x = jnp.asarray(np.load(sys.argv[1])).astype(sys.argv[4])  # bfloat16 values, exact in float32
y, _, _ = jax.jit(lambda x, s, b: cpu_kernel.statistics_and_normalize(x, s, b, epsilon=float(sys.argv[3])))(
    x, jnp.asarray(np.load(sys.argv[1].replace("x.npy", "scale.npy"))),
    jnp.asarray(np.load(sys.argv[1].replace("x.npy", "bias.npy"))))
np.save(sys.argv[2], np.asarray(y, np.float32))
"""


@helpers.needs_glibc
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_in_freshly_mapped_pages(dtype, tmp_path):
  """The kernel maps a fresh output's pages in one call (`Populate`, MADV_POPULATE_WRITE) before
  writing y: y is still every element right, on two threads, with the benchmarks' `fault` allocator
  (every block of 128 KiB or more mapped afresh), in a subprocess."""
  x, scale, bias = _inputs((8, 56, 56, 64), dtype, mean=3.0)
  for name, value in (("x", x), ("scale", scale), ("bias", bias)):
    np.save(tmp_path / f"{name}.npy", np.asarray(value, np.float32))
  helpers.run_python(
    "-c",
    _FRESH_PAGES,
    str(tmp_path / "x.npy"),
    str(tmp_path / "y.npy"),
    str(EPS),
    dtype,
    env={"NORMJAX_CPU_KERNEL": "always"},
    check=True,
  )
  want_y = _reference(x, scale, bias)[0]
  tolerance = 2e-5 if dtype == "float32" else 1e-2
  y = np.load(tmp_path / "y.npy").astype(np.float64)
  np.testing.assert_allclose(y, want_y, rtol=tolerance, atol=tolerance)


def test_groups_have_their_own_statistics():
  """`grouped=True` (BatchNorm's consecutive ghost batches): axis 0 indexes groups."""
  x, scale, bias = _inputs((3, 5, 4, 6), "float32")
  x = x * jnp.array([1.0, 3.0, 0.5]).reshape(3, 1, 1, 1) + jnp.array([0.0, 7.0, -2.0]).reshape(
    3, 1, 1, 1
  )
  y, mean, var = cpu_kernel.statistics_and_normalize(x, scale, bias, epsilon=EPS, grouped=True)
  assert mean.shape == var.shape == (3, 6)
  for g in range(3):
    want_y, want_mean, want_var = _reference(x[g], scale, bias)
    np.testing.assert_allclose(mean[g], want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var[g], want_var, rtol=1e-5)
    np.testing.assert_allclose(y[g], want_y, rtol=2e-5, atol=2e-5)


def test_variance_accurate_far_from_zero():
  """The issue's bound (relative variance error ≤ 1e-4 at mean 1e4, std 1, float32), with room."""
  x, scale, bias = _inputs((256, 6, 6, 16), "float32", mean=1e4, std=1.0)
  _, _, var = cpu_kernel.statistics_and_normalize(x, scale, bias, epsilon=EPS)
  _, _, want = _reference(x, scale, bias)
  assert np.max(np.abs(np.asarray(var, np.float64) / want - 1.0)) < 1e-6


def test_second_pass_when_the_shift_is_far_from_the_mean():
  """The shift is the mean of the first 16 rows. With those at 1e6 and the other 2^20 rows near 0,
  one shifted pass would lose ~4e-3 of the variance (float32 eps × (mean − K)² / var ≈ 6e4); the kernel
  sees (mean − K)² > 9 var and sums the squared deviations from the mean in a second pass."""
  x = np.asarray(helpers.normal_data((2**20, 1), seed=3), np.float32)
  x[:16] += 1e6
  _, mean, var = cpu_kernel.statistics_and_normalize(
    jnp.asarray(x), jnp.ones(1), jnp.zeros(1), epsilon=EPS
  )
  _, want_mean, want_var = _reference(x, np.ones(1), np.zeros(1))
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)


def test_bfloat16_output_rounds_like_xla():
  """y in bfloat16 is the float32 y rounded to nearest even (NaN and ±inf kept), as `astype`."""
  x, scale, bias = _inputs((64, 33), "float32", std=50.0)
  x = x.at[0, 0].set(jnp.inf).at[1, 1].set(jnp.nan)  # those features' statistics are not finite
  y32, _, _ = cpu_kernel.statistics_and_normalize(x, scale, bias, epsilon=EPS)
  y16, _, _ = cpu_kernel.statistics_and_normalize(x, scale, bias, epsilon=EPS, dtype=jnp.bfloat16)
  want = np.asarray(y32.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(y16.astype(jnp.float32)), want)


def test_non_finite_feature_stays_in_its_feature():
  x, scale, bias = _inputs((32, 4), "float32")
  x = x.at[3, 2].set(jnp.nan)
  y, mean, var = cpu_kernel.statistics_and_normalize(x, scale, bias, epsilon=EPS)
  assert np.isnan(mean[2]) and np.isnan(var[2]) and np.all(np.isnan(y[:, 2]))
  keep = np.array([0, 1, 3])
  want_y, _, want_var = _reference(x[:, keep], scale[keep], bias[keep])
  np.testing.assert_allclose(var[keep], want_var, rtol=1e-5)
  np.testing.assert_allclose(y[:, keep], want_y, rtol=2e-5, atol=2e-5)


def test_unhandled_input_names_shape_and_dtype():
  with pytest.raises(ValueError, match=r"shape \(4, 2\) and dtype float16"):
    cpu_kernel.statistics_and_normalize(
      jnp.ones((4, 2), jnp.float16), jnp.ones(2), jnp.zeros(2), epsilon=EPS
    )
  with pytest.raises(ValueError, match="grouped=True needs kernel='cpu'"):
    fused_batch_norm.statistics_and_normalize(
      jnp.ones((1, 4, 2)), None, None, epsilon=EPS, grouped=True
    )
  with pytest.raises(ValueError, match="renorm needs kernel='cpu', not 'pallas'"):
    fused_batch_norm.statistics_and_normalize(
      jnp.ones((4, 2)), None, None, epsilon=EPS, renorm=(jnp.zeros(2), jnp.ones(2), 3.0, 5.0)
    )
  with pytest.raises(ValueError, match="kernel='gpu'"):
    fused_batch_norm.statistics_and_normalize(
      jnp.ones((4, 2)), None, None, epsilon=EPS, kernel="gpu"
    )


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")
  assert not cpu_kernel.available() and not cpu_kernel.handles((8, 2), jnp.float32, jnp.float32)


def test_build_failure_is_an_os_error(monkeypatch, tmp_path):
  """A failing compiler raises OSError from `_build` (which `available()` turns into a warning and
  the XLA program); the message carries the compiler's command line."""
  monkeypatch.setenv("NORMJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setattr(cpu_kernel, "_SOURCE", str(tmp_path / "changed.cc"))
  (tmp_path / "changed.cc").write_text("// a source not yet in the cache\n")
  with pytest.raises(OSError, match="false"):
    cpu_kernel._build()  # pylint: disable=protected-access
  assert not list(tmp_path.glob("*.so"))


def _step(bn, params, state, x, dy):
  def loss(p, x):
    y, new_state = bn.apply(p, state, x, training=True)
    return jnp.sum(y.astype(jnp.float32) * dy), (y, new_state)

  return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
  "options",
  [
    {},
    {"use_scale": False},
    {"debias": True, "momentum": 0.9},
    {"ghost_batch_size": 4},
    {"renorm": True},
    {"renorm": True, "ghost_batch_size": 4, "r_max": 1.2, "d_max": 0.3},
    {
      "renorm": True,
      "use_scale": False,
      "r_max": normjax.batch_renorm_paper_schedule(0, 1.5, 5).r_max,
    },
  ],
  ids=lambda o: (
    ",".join(f"{k}={v if not callable(v) else 'schedule'}" for k, v in o.items()) or "{}"
  ),
)
def test_training_step_equals_the_xla_program(dtype, options, monkeypatch):
  """The kernel's y, running statistics and gradients against the XLA program's; renorm's state
  (running mean 2 above the data's, variance 3×) clips r or d."""
  bn = normjax.batch_norm(epsilon=EPS, **options)
  x, _, _ = _inputs((16, 5, 5, 24), dtype, mean=3.0)
  dy = jnp.asarray(helpers.normal_data(x.shape, seed=5)).astype(dtype)
  params, state = bn.init(x)
  state = state._replace(
    mean=state.mean + 2.0, var=state.var * 3.0, count=jnp.asarray(3, jnp.int32)
  )
  program = jax.jit(functools.partial(_step, bn)).lower(params, state, x, dy).as_text()
  assert cpu_kernel.TARGET in program
  got = jax.jit(functools.partial(_step, bn))(params, state, x, dy)
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")
  xla_step = lambda *a: _step(bn, *a)  # noqa: E731  # a new function: traced again
  assert cpu_kernel.TARGET not in jax.jit(xla_step).lower(params, state, x, dy).as_text()
  want = jax.jit(xla_step)(params, state, x, dy)
  tolerance = 1e-4 if dtype == "float32" else 2e-2
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance
    ),
    got,
    want,
  )


@pytest.mark.parametrize(
  "options, masked, moments",
  [
    ({"ghost_batch_size": 4, "ghost_grouping": "strided"}, False, False),
    ({"stats_method": "fast"}, False, False),
    ({"axis": 1}, False, False),
    ({"renorm": True}, True, True),
    ({}, True, True),
  ],
  ids=str,
)
def test_other_variants_do_not_run_the_fused_kernel(options, masked, moments):
  """Strided ghost batches, "fast" statistics and features not last keep the XLA program; masked
  steps take their statistics from `cpu_kernel.moments` (tests/test_cpu_moments.py)."""
  bn = normjax.batch_norm(**options)
  x = jnp.ones((8, 4, 4, 16))
  mask = jnp.ones((8,), bool) if masked else None
  params, state = bn.init(x)
  apply = lambda p, s, x: bn.apply(p, s, x, training=True, mask=mask)  # noqa: E731
  program = jax.jit(apply).lower(params, state, x).as_text()
  assert cpu_kernel.TARGET not in program
  assert (cpu_kernel.MOMENTS_TARGET in program) == moments


@pytest.mark.parametrize(
  "options", [{}, {"renorm": True, "r_max": 1.1, "d_max": 0.2, "ghost_batch_size": 3}], ids=str
)
def test_derivatives_forward_and_reverse(options):
  bn = normjax.batch_norm(epsilon=EPS, **options)
  x, _, _ = _inputs((6, 3, 4), "float32", mean=2.0)
  params, state = bn.init(x)
  params = {"scale": params["scale"] * 1.5, "bias": params["bias"] + 0.25}
  f = lambda p, x: bn.apply(p, state, x, training=True)[0]  # noqa: E731
  check_grads(f, (params, x), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2)


def test_statistics_tangents_per_group():
  """Forward mode through the kernel's statistics (ghost groups): the tangents of each group's mean
  and variance equal those of jnp.mean / jnp.var."""
  x, scale, bias = _inputs((3, 4, 5, 6), "float32", mean=2.0)
  dx = jnp.asarray(helpers.normal_data(x.shape, seed=4))
  kernel = functools.partial(
    fused_batch_norm.statistics_and_normalize, epsilon=EPS, kernel="cpu", grouped=True
  )
  _, (_, dmean, dvar) = jax.jvp(lambda x: kernel(x, scale, bias), (x,), (dx,))
  _, (want_dmean, want_dvar) = jax.jvp(lambda x: (x.mean((1, 2)), x.var((1, 2))), (x,), (dx,))
  np.testing.assert_allclose(dmean, want_dmean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dvar, want_dvar, rtol=1e-4, atol=1e-5)


def test_renorm_references_hold_with_the_kernel():
  """Batch Renormalization through the kernel (r and d folded into its affine): test_renorm's
  float64 references (Ioffe's Algorithm 1 as Keras implements it, with and without clipping; ghost
  groups, each with its own corrections), and Keras' own layer step by step, values and gradients."""
  bn = normjax.batch_renorm(r_max=1.5, d_max=0.5, ghost_batch_size=4)
  x = jnp.ones((12, 3))
  params, state = bn.init(x)
  apply = lambda x: bn.apply(params, state, x, training=True)  # noqa: E731
  assert cpu_kernel.TARGET in jax.jit(apply).lower(x).as_text()
  test_renorm.test_matches_keras_algorithm_float64_reference(0.9, 1.5, 0.5)
  test_renorm.test_matches_keras_algorithm_float64_reference(0.7, 3.0, 5.0)
  test_renorm.test_ghost_batches_renormalize_per_group_and_average_sigma_of_mean_variance()
  test_renorm.test_matches_keras_renorm_layer_step_by_step()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_renorm_step_stays_within_eight_kernels(dtype):
  """renorm's corrections are computed inside the kernel: its forward (with the paper's schedule of
  r_max and d_max) is the kernel and the per-feature running update, within XLA:CPU's 8 kernels."""
  schedule = normjax.batch_renorm_paper_schedule()
  bn = normjax.batch_norm(renorm=True, r_max=schedule.r_max, d_max=schedule.d_max)
  x = jnp.ones((16, 8, 8, 32), dtype)
  params, state = bn.init(x)
  fwd = lambda p, s, x: bn.apply(p, s, x, training=True)  # noqa: E731
  text = jax.jit(fwd).lower(params, state, x).compile().as_text()
  assert cpu_kernel.TARGET in text and cpu_kernel.MOMENTS_TARGET not in text
  programs = hlo_stats.sequences(text)
  assert list(programs) == ["ENTRY"] and programs["ENTRY"] <= 8, programs


def test_vmap_runs_the_kernel_per_example():
  bn = normjax.batch_norm(epsilon=EPS)
  xs, _, _ = _inputs((3, 8, 4, 5), "float32", mean=1.0)
  params, state = bn.init(xs[0])
  apply = lambda x: bn.apply(params, state, x, training=True)[0]  # noqa: E731
  batched = jax.jit(jax.vmap(apply))(xs)
  for i in range(xs.shape[0]):
    np.testing.assert_allclose(batched[i], jax.jit(apply)(xs[i]), rtol=1e-6, atol=1e-6)


@hypothesis.given(
  leading=st.lists(st.integers(1, 6), min_size=0, max_size=3),
  features=st.integers(1, 70),
  dtype=st.sampled_from(["float32", "bfloat16"]),
  mean=st.sampled_from([0.0, -30.0, 1e3]),
  seed=st.integers(0, 2**16),
)
@hypothesis.settings(max_examples=25, deadline=None)
def test_each_feature_has_mean_bias_and_std_scale(leading, features, dtype, mean, seed):
  shape = tuple(leading) + (4, features)
  x, scale, bias = _inputs(shape, dtype, mean=mean, std=3.0, seed=seed)
  y, _, var = jax.jit(functools.partial(cpu_kernel.statistics_and_normalize, epsilon=EPS))(
    x, scale, bias
  )
  y = np.asarray(y.astype(jnp.float32), np.float64).reshape(-1, features)
  _, _, want_var = _reference(x, scale, bias)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)
  tolerance = 1e-4 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(y.mean(axis=0), bias, atol=tolerance * 10)
  expected_std = np.asarray(scale) * np.sqrt(want_var / (want_var + EPS))
  np.testing.assert_allclose(y.std(axis=0), expected_std, rtol=tolerance * 10, atol=tolerance)


def test_automatic_sharding_keeps_the_xla_program(monkeypatch):
  """By default the kernel runs only where the program runs whole on each device: XLA's SPMD
  partitioner would gather x for a custom call. `jit` of a batch-sharded x on 8 devices keeps the
  XLA program (partial sums and an all-reduce); `shard_map` over every device runs the kernel."""
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "1")
  assert not cpu_kernel.runs_whole_on_each_device()  # 8 CPU devices in the tests
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  bn = normjax.batch_norm()
  x = jnp.asarray(helpers.normal_data((16, 4, 4, 8), mean=1.0))
  params, state = bn.init(x)
  apply = lambda x: bn.apply(params, state, x, training=True)[0]  # noqa: E731
  sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  program = jax.jit(apply).lower(sharded).compile().as_text()
  assert cpu_kernel.TARGET not in program and "all-reduce" in program
  per_device = jax.shard_map(apply, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
  assert cpu_kernel.TARGET in jax.jit(per_device).lower(x).as_text()
