"""The CPU lowering and the portable (GPU/TPU) program of the statistics and of training BatchNorm.

Both lowerings are checked against the same float64 references. The portable program is forced on
this CPU by replacing `lowering.cpu_or_portable` (what a GPU or TPU compiles); the CPU program's
structure is asserted on the optimized HLO (which full-size arrays each kernel reads and writes), a
check of speed that needs no timing.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax._src import lowering
from normjax._src import stats
from tests import helpers

AXES = (0, 1, 2)


@pytest.fixture
def portable(monkeypatch):
  """Every `cpu_or_portable` choice takes the portable (GPU / TPU) program."""
  monkeypatch.setattr(lowering, "cpu_or_portable", lambda *args, cpu, portable: portable(*args))


def _var_err(var, x):
  want = np.asarray(x, np.float64).var(axis=AXES)
  return float(np.max(np.abs(np.asarray(var, np.float64) - want) / want))


def _two_steps(x):
  """Batch variances of the first and the second training step of a fresh layer on `x`."""
  bn = normjax.batch_norm(momentum=0.0)
  params, state = bn.init(x)
  step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
  first = step(state, x)
  return first.var, step(first, x).var


@pytest.mark.parametrize("mean", [0.0, 2.0, 1e2, 1e4])
def test_cpu_statistics_are_accurate_from_the_first_step(mean):
  x = jnp.asarray(helpers.normal_data((64, 8, 8, 16), mean=mean))
  first, second = _two_steps(x)
  assert _var_err(first, x) <= 3e-6  # plain sums while |mean| <= 3 std, a second pass beyond
  assert _var_err(second, x) <= 3e-6


def test_portable_running_shift_first_step_has_fast_precision_then_is_accurate(portable):
  """The documented trade-off: shift = running mean (0 on a fresh layer)."""
  x = jnp.asarray(helpers.normal_data((64, 8, 8, 16), mean=1e4))
  first, second = _two_steps(x)
  assert _var_err(first, x) > 1e-2  # E[x²] − E[x]² at mean 1e4, std 1
  assert _var_err(second, x) <= 1e-5


def test_portable_batch_shift_is_accurate_from_the_first_step(portable):
  x = jnp.asarray(helpers.normal_data((64, 8, 8, 16), mean=1e4))
  bn = normjax.batch_norm(momentum=0.0, stats_shift="batch")
  params, state = bn.init(x)
  state = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])(state, x)
  assert _var_err(state.var, x) <= 1e-5


@pytest.mark.parametrize("offset", [0.0, 3.5, 1e4])
def test_the_cpu_second_pass_runs_exactly_beyond_three_std(offset):
  x = helpers.normal_data((32, 4, 4, 8), mean=0.0)
  x[..., 0] += offset  # one feature far from zero is enough to take the second pass for all
  x = jnp.asarray(x)
  _, var = stats.moments(x, AXES)
  assert _var_err(var, x) <= 3e-6
  mean, plain_var = stats.moments(x, AXES, method="fast")
  plain = bool(np.all(np.square(mean) <= stats.CPU_PLAIN_SUMS_LIMIT * plain_var))
  assert plain == (offset < 3.0)


def test_a_nan_under_the_mask_does_not_reach_the_cpu_statistics():
  x = helpers.normal_data((16, 4, 4, 8), mean=5.0)
  mask = np.random.default_rng(1).random((16, 4, 4, 1)) < 0.7
  mean, var = stats.moments(jnp.asarray(np.where(mask, x, np.nan)), AXES, mask=jnp.asarray(mask))
  valid = np.where(mask, x, np.nan).astype(np.float64)
  np.testing.assert_allclose(mean, np.nanmean(valid, AXES), rtol=1e-6)
  np.testing.assert_allclose(var, np.nanvar(valid, AXES), rtol=1e-5)


@pytest.mark.parametrize("use_portable", [False, True])
def test_explicit_shift_and_its_shape_check(use_portable, monkeypatch):
  if use_portable:
    monkeypatch.setattr(lowering, "cpu_or_portable", lambda *a, cpu, portable: portable(*a))
  x = jnp.asarray(helpers.normal_data((64, 4, 4, 8), mean=1e4))
  _, var = normjax.moments(x, AXES, shift=jnp.full((8,), 1e4))
  assert _var_err(var, x) <= 1e-5
  with pytest.raises(ValueError, match=r"shift has shape \(3,\); expected \(8,\)"):
    normjax.moments(x, AXES, shift=jnp.zeros(3))


def _full_size_kernels(hlo: str, shape):
  """[(op, full-size operands read, full-size results written)] of the ENTRY computation's kernels."""
  full = re.compile(r"(?:f32|bf16)\[(?:1,)?" + ",".join(map(str, shape)) + r"\]")
  entry = hlo[hlo.index("\nENTRY") :]
  shapes, out = {}, []
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*?)\)(, |$)", line)
    if not m:
      continue
    name, result, op, operands = m.groups()[:4]
    shapes[name] = result
    if op in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
      continue
    reads = sum(
      bool(full.search(shapes.get(o.strip().lstrip("%"), ""))) for o in operands.split(",")
    )
    writes = len(full.findall(result))
    if reads or writes:
      out.append((op, reads, writes))
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_training_step_reads_and_writes_the_minimum(dtype):
  """fwd+bwd on XLA:CPU: Σx, Σx², y, Σg, Σg·x̂, dx and nothing else touches a full-size array.

  Reads: x, x, x (y), g, x and g (Σg·x̂), x and g (dx) = 8; writes: y, dx = 2. Before the CPU
  lowering XLA wrote x − K (and for bfloat16 float32 copies) to memory and read them back.
  """
  shape = (16, 8, 8, 32)
  x = jnp.ones(shape, dtype)
  bn = normjax.batch_norm(momentum=0.9)
  params, state = bn.init(x)

  def step(params, x, dy):
    y, pullback = jax.vjp(lambda p, x: bn.apply(p, state, x, training=True)[0], params, x)
    return y, pullback(dy)

  hlo = jax.jit(step).lower(params, x, x).compile().as_text()
  kernels = _full_size_kernels(hlo, shape)
  reads, writes = sum(k[1] for k in kernels), sum(k[2] for k in kernels)
  assert writes == 2, kernels
  assert reads <= 8 + 1, kernels  # + the second pass's conditional, which reads x only when taken
