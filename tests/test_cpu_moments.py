"""The CPU kernel's statistics alone (`cpu_kernel.moments`): float64 references with masks and groups,
derivatives, and the BatchNorm variants whose statistics it computes on a CPU (masks, with renorm too,
`axis_name` on 8 real CPU devices) against the XLA program."""

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import pytest

from benchmarks import hlo_stats
import normjax
from normjax._src import cpu_kernel
from tests import helpers

pytestmark = helpers.needs_cpu_kernel()


def _reference(x, valid):
  """float64 mean and biased variance over the valid rows of `x` (features last); 0, 0 for none."""
  xd = np.asarray(jnp.asarray(x, jnp.float32), np.float64).reshape(-1, x.shape[-1])
  rows = xd[np.broadcast_to(np.asarray(valid), x.shape[:-1]).reshape(-1)]
  if rows.shape[0] == 0:
    return np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
  return rows.mean(axis=0), rows.var(axis=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mean", [0.5, 1e4])
def test_masked_moments_match_float64_reference(dtype, mean):
  """Masked rows hold NaN (never read); group 2 has no valid row (mean 0, variance 0)."""
  x = jnp.asarray(helpers.normal_data((3, 40, 5, 7), mean=mean, std=2.0, seed=1)).astype(dtype)
  valid = np.asarray(helpers.normal_data((3, 40, 5), seed=2)) > -0.5
  valid[2] = False
  x = jnp.where(valid[..., None], x, jnp.nan)
  got_mean, got_var = jax.jit(functools.partial(cpu_kernel.moments, groups=3))(x, valid)
  assert got_mean.shape == got_var.shape == (3, 7)
  for g in range(3):
    want_mean, want_var = _reference(x[g], valid[g])
    np.testing.assert_allclose(got_mean[g], want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_var[g], want_var, rtol=1e-5, atol=1e-6)


def test_unmasked_moments_equal_the_fused_kernels():
  x = jnp.asarray(helpers.normal_data((64, 9, 33), mean=-3.0, seed=4))
  _, want_mean, want_var = cpu_kernel.statistics_and_normalize(
    x, jnp.ones(33), jnp.zeros(33), epsilon=1e-5
  )
  got_mean, got_var = cpu_kernel.moments(x)
  np.testing.assert_array_equal(got_mean, want_mean)
  np.testing.assert_array_equal(got_var, want_var)


def test_moments_derivatives_forward_and_reverse():
  x = jnp.asarray(helpers.normal_data((2, 6, 5, 3), mean=1.5, seed=6))
  valid = np.asarray(helpers.normal_data((2, 6, 5), seed=7)) > -0.3
  f = lambda x: cpu_kernel.moments(x, valid, groups=2)  # noqa: E731
  check_grads(f, (x,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
  # the tangents are those of the float64 formulas: masked rows get no gradient
  grad_var = jax.grad(lambda x: jnp.sum(f(x)[1]))(x)
  assert np.all(np.asarray(grad_var)[~valid] == 0.0)


def _step(bn, params, state, x, dy, mask):
  def loss(p, x):
    y, new_state = bn.apply(p, state, x, training=True, mask=mask)
    return jnp.sum(y.astype(jnp.float32) * dy), (y, new_state)

  return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)


def _assert_close(got, want, tolerance):
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance, atol=tolerance
    ),
    got,
    want,
  )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
  "options, masked",
  [
    ({"renorm": True}, True),
    ({"renorm": True, "ghost_batch_size": 4}, True),
    ({}, True),
    ({"ghost_batch_size": 8}, True),
  ],
  ids=str,
)
def test_training_step_equals_the_xla_program(dtype, options, masked, monkeypatch):
  """Masked steps (with renorm too): statistics from `cpu_kernel.moments`, y and the backward from
  XLA."""
  bn = normjax.batch_norm(epsilon=1e-5, **options)
  x = jnp.asarray(helpers.normal_data((16, 5, 5, 24), mean=3.0, std=2.0)).astype(dtype)
  dy = jnp.asarray(helpers.normal_data(x.shape, seed=5)).astype(dtype)
  mask = jnp.asarray(helpers.normal_data((16, 5, 5, 1), seed=8) > -0.7) if masked else None
  params, state = bn.init(x)
  state = state._replace(mean=state.mean + 2.5, var=state.var * 3.0, count=jnp.asarray(3))
  step = lambda *a: _step(bn, *a, mask)  # noqa: E731
  program = jax.jit(step).lower(params, state, x, dy).as_text()
  assert cpu_kernel.MOMENTS_TARGET in program and cpu_kernel.TARGET not in program
  got = jax.jit(step)(params, state, x, dy)
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")
  xla_step = lambda *a: _step(bn, *a, mask)  # noqa: E731  # a new function: traced again
  assert cpu_kernel.MOMENTS_TARGET not in jax.jit(xla_step).lower(params, state, x, dy).as_text()
  _assert_close(got, jax.jit(xla_step)(params, state, x, dy), 1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize(
  "groups, data_mean",
  [(None, 1e3), (None, 1.5), ([[0, 1, 2, 3], [4, 5, 6, 7]], 1e3)],
  ids=["second-round", "one-round", "groups"],
)
def test_synchronized_statistics_on_8_devices(groups, data_mean, monkeypatch):
  """Per-device kernel moments combined over the devices: exact for unequal valid counts (device 0
  holds none), equal to the float64 statistics of each group's concatenated valid data. Data at mean
  1e3, std 2 takes the second round (Chan's combination about the global mean); at mean 1.5 the raw
  moments of one round are kept."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
  bn = normjax.batch_norm(axis_name="batch", axis_index_groups=groups, epsilon=1e-5, momentum=0.9)
  x = jnp.asarray(helpers.normal_data((32, 3, 3, 16), mean=data_mean, std=2.0, seed=9))
  mask = np.asarray(helpers.normal_data((32, 3, 3, 1), seed=10)) > -0.5
  mask[:4] = False  # device 0's whole shard
  params, state = bn.init(x)

  def per_device(x, mask):
    y, new_state = bn.apply(params, state, x, training=True, mask=mask)
    return y, new_state.mean[None], new_state.var[None]

  run = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch"))
  )
  assert cpu_kernel.MOMENTS_TARGET in run.lower(x, mask).as_text()
  y, means, _ = run(x, mask)
  members = [list(range(8))] if groups is None else groups
  for group in members:
    rows = np.concatenate([np.arange(4 * d, 4 * d + 4) for d in group])
    want_mean, want_var = _reference(x[rows], mask[rows, ..., 0])
    want_y = (np.asarray(x[rows], np.float64) - want_mean) / np.sqrt(want_var + 1e-5)
    valid = np.broadcast_to(mask[rows], want_y.shape)
    np.testing.assert_allclose(np.asarray(y[rows])[valid], want_y[valid], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(means[group[0]], 0.1 * want_mean, rtol=1e-5, atol=1e-6)
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")
  xla_run = jax.jit(
    jax.shard_map(
      lambda x, m: per_device(x, m),
      mesh=mesh,
      in_specs=(P("batch"), P("batch")),
      out_specs=P("batch"),
    )
  )
  _assert_close((y, means), xla_run(x, mask)[:2], 2e-4)


@pytest.mark.parametrize("options, masked", [({"renorm": True}, True), ({}, True)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_programs_stay_within_eight_kernels(dtype, options, masked):
  """XLA:CPU runs a program of more than 8 kernels as a slower concurrent graph (BENCHMARKS.md,
  `cpu_kernels`): the per-feature epilogue after the kernel's moments runs as a nested program
  (`lowering.nested_program`), so the entry and the branch each stay within 8."""
  x = jnp.ones((16, 8, 8, 32), dtype)
  mask = jnp.asarray(np.random.default_rng(0).random((16, 8, 8, 1)) < 0.8) if masked else None
  bn = normjax.batch_norm(momentum=0.9, **options)
  params, state = bn.init(x)
  fwd = lambda p, s, x: bn.apply(p, s, x, training=True, mask=mask)  # noqa: E731
  text = jax.jit(fwd).lower(params, state, x).compile().as_text()
  assert cpu_kernel.MOMENTS_TARGET in text
  programs = hlo_stats.sequences(text)
  assert len(programs) == 3 and max(programs.values()) <= 8, programs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_synchronized_forward_sums_both_moments_in_one_kernel(dtype):
  """Under `shard_map` over two devices, the per-device raw moments leave as one stacked (2, C) operand of one
  all-reduce (one kernel computes both), and the outer program keeps 7 kernels: the moments kernel,
  the stacking, the all-reduce, the precision check (2), the conditional and the normalize pass."""
  x = jnp.ones((16, 7, 7, 32), dtype)
  bn = normjax.batch_norm(momentum=0.9, axis_name="batch")
  params, state = bn.init(x)
  mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))  # one device would take the local kernel
  fwd = jax.shard_map(
    lambda p, s, x: bn.apply(p, s, x, training=True),
    mesh=mesh,
    in_specs=(P(), P(), P("batch")),
    out_specs=(P("batch"), P()),
  )
  text = jax.jit(fwd).lower(params, state, x).compile().as_text()
  assert cpu_kernel.MOMENTS_TARGET in text
  entry = text[text.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  reduces = [line for line in entry.splitlines() if " all-reduce(" in line]
  assert len(reduces) == 1, reduces
  assert re.search(r"= f32\[2,(1,)*32\]", reduces[0]), reduces  # both moments, each of C floats
  assert hlo_stats.sequences(text)["ENTRY"] <= 7, hlo_stats.sequences(text)


def test_groups_must_divide_the_batch():
  with pytest.raises(ValueError, match=r"groups=3 must divide axis 0 of x \(shape \(4, 2\)\)"):
    cpu_kernel.moments(jnp.ones((4, 2)), groups=3)


def test_bfloat16_input_is_not_copied_for_the_kernel():
  """XLA:CPU lowers a bfloat16 reshape as a copy; the kernel gets x in the shape it was grouped from,
  so a masked ghost-batch step's program touches x only in the kernel and the normalize pass."""
  x = jnp.ones((8, 7, 7, 64), jnp.bfloat16)
  mask = jnp.arange(8) < 6
  bn = normjax.batch_norm(ghost_batch_size=4)
  params, state = bn.init(x)
  apply = lambda x: bn.apply(params, state, x, training=True, mask=mask)[0]  # noqa: E731
  text = jax.jit(apply).lower(x).compile().as_text()
  entry = text[text.index("\nENTRY") :]
  users = [line for line in entry.splitlines() if "%x" in line.split("=", 1)[-1]]
  assert len(users) == 2, users  # the kernel reads the parameter itself, not a copy
  assert any(cpu_kernel.MOMENTS_TARGET in line for line in users), users
