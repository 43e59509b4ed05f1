"""The CPU lowering and the portable (GPU/TPU) program of the statistics and of training BatchNorm.

Both lowerings are checked against the same float64 references. The portable program is forced on
this CPU by replacing `lowering.cpu_or_portable` (what a GPU or TPU compiles); the CPU program's
structure is asserted on the optimized HLO (which full-size arrays each kernel reads and writes), a
check of speed that needs no timing.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks import hlo_stats
import normjax
from normjax._src import compat
from normjax._src import stats
from tests import helpers

AXES = (0, 1, 2)
# Plain float32 sums on XLA:CPU: measured 1.5e-6 at mean 2 std with jaxlib 0.10.2 and 1.06e-5 with 0.8.1,
# whose CPU reductions round more (compat.OLD_CPU_REDUCTIONS).
PLAIN_SUMS_TOL = 3e-5 if compat.OLD_CPU_REDUCTIONS else 3e-6


@pytest.fixture
def portable(monkeypatch):
  """Every `cpu_or_portable` choice takes the portable (GPU / TPU) program (and no CPU kernel)."""
  helpers.use_program(monkeypatch, "portable")


@pytest.fixture(autouse=True)
def xla_program(monkeypatch):
  """These tests read the XLA programs' structure: BatchNorm's CPU kernel (`cpu_kernel`, tested in
  `test_cpu_kernel.py`) is off."""
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "0")


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
  # plain sums while |mean| <= 3 std, a second pass beyond
  assert _var_err(first, x) <= PLAIN_SUMS_TOL
  assert _var_err(second, x) <= PLAIN_SUMS_TOL


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
  assert _var_err(var, x) <= PLAIN_SUMS_TOL
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
    helpers.use_program(monkeypatch, "portable")
  x = jnp.asarray(helpers.normal_data((64, 4, 4, 8), mean=1e4))
  _, var = normjax.moments(x, AXES, shift=jnp.full((8,), 1e4))
  assert _var_err(var, x) <= 1e-5
  with pytest.raises(ValueError, match=r"shift has shape \(3,\); expected \(8,\)"):
    normjax.moments(x, AXES, shift=jnp.zeros(3))


def _full_size_kernels(hlo: str, size: int):
  """[(op, full-size operands read, full-size results written)] of the ENTRY computation's kernels;
  full-size: a float32 or bfloat16 array of `size` elements."""
  array = re.compile(r"(?:f32|bf16)\[([\d,]*)\]")

  def count(text):
    return sum(math.prod(int(d) for d in m.split(",") if d) == size for m in array.findall(text))

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
    reads = sum(count(shapes.get(o.strip().lstrip("%"), "")) for o in operands.split(","))
    if reads or count(result):
      out.append((op, reads, count(result)))
  return out


@pytest.mark.parametrize(
  "options, masked",
  [({}, False), ({"ghost_batch_size": 4}, False), ({"renorm": True}, False), ({}, True)],
  ids=["default", "ghost", "renorm", "masked"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_training_step_reads_and_writes_the_minimum(dtype, options, masked):
  """fwd+bwd on XLA:CPU: Σx, Σx², y, Σg, Σg·x̂, dx and nothing else touches a full-size array.

  Reads: x (Σx), x (Σx²), x (y), g (Σg), x and g (Σg·x̂), x and g (dx), and x for the second pass's
  conditional (read only when taken) = 9; writes: y, dx = 2. Before the CPU lowering XLA wrote x − K
  (and for bfloat16 float32 copies of x and g) to memory and read them back.
  """
  shape = (16, 8, 8, 32)
  x = jnp.ones(shape, dtype)
  mask = jnp.asarray(np.random.default_rng(0).random(shape[:-1] + (1,)) < 0.8) if masked else None
  bn = normjax.batch_norm(momentum=0.9, **options)
  params, state = bn.init(x)

  def step(params, x, dy):
    apply = lambda p, x: bn.apply(p, state, x, training=True, mask=mask)[0]
    y, pullback = jax.vjp(apply, params, x)
    return y, pullback(dy)

  hlo = jax.jit(step).lower(params, x, x).compile().as_text()
  kernels = _full_size_kernels(hlo, math.prod(shape))
  reads, writes = sum(k[1] for k in kernels), sum(k[2] for k in kernels)
  # bfloat16 ghost groups: jaxlib 0.10 makes the statistics read one bfloat16 copy of x in the group
  # view, which XLA:CPU reduces 3x faster than x converted and then regrouped
  # (lowering._keeps_group_view): +1 write, +1 read; jaxlib 0.8.1 (the floor) copies nothing.
  extra = 1 if ("ghost_batch_size" in options and dtype == jnp.bfloat16) else 0
  assert 2 <= writes <= 2 + extra and reads <= 9 + extra, kernels


@pytest.mark.parametrize(
  "options",
  [{}, {"ghost_batch_size": 4}, {"renorm": True}, {"debias": True}, {"axis_name": "d"}],
  ids=["default", "ghost", "renorm", "debias", "sync"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_training_forward_keeps_each_program_within_eight_kernels(dtype, options):
  """XLA:CPU runs a program of at most 8 kernels in order and a larger one as a concurrent graph,
  which costs 13-21 % of the forward here (BENCHMARKS.md, `cpu_kernels`). The training forward's
  outer program and the branch of its precision check that runs (plain sums kept) stay within 8:
  the per-feature work runs in the branches (`moments_and_count`'s epilogue). flax's forward is 6
  kernels."""
  x = jnp.ones((16, 8, 8, 32), dtype)
  bn = normjax.batch_norm(momentum=0.9, **options)
  params, state = bn.init(x)
  fwd = lambda p, s, x: bn.apply(p, s, x, training=True)
  if "axis_name" in options:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    fwd = jax.shard_map(fwd, mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=(P("d"), P()))
  text = jax.jit(fwd).lower(params, state, x).compile().as_text()
  programs = hlo_stats.sequences(text)
  assert len(programs) == 3, programs  # the entry and the two branches of the precision check
  entry = programs.pop("ENTRY")
  keep, second_pass = sorted(programs.values())  # the second pass (|mean| > 3 std) reads x again
  assert entry <= 8, programs
  # the floor's XLA (jaxlib 0.8.1) fuses less: debias's step powers take 10 kernels there
  limit = 8 if compat.JAXLIB_VERSION >= (0, 10, 2) else 10
  assert keep <= limit, programs


def _canonical_program(text: str):
  """The optimized HLO's instructions with metadata dropped and every name replaced by the order of
  its first use: two programs that differ only in names compare equal, constants included."""
  names = {}
  rename = lambda m: "%" + str(names.setdefault(m.group(0), len(names)))
  lines = [line for line in text.splitlines() if re.match(r"\s+(ROOT )?%", line)]
  strip = lambda line: re.sub(r",?\s*metadata=\{[^}]*\}", "", line)
  return [re.sub(r"%[\w.\-]+", rename, strip(line)) for line in lines]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_evaluation_compiles_to_flax_linens_program(dtype):
  """Evaluation (running statistics) is the very program flax.linen.BatchNorm compiles to, so its
  rows in `op_batch_norm` time two identical programs: they measure the benchmark's noise."""
  nn = pytest.importorskip("flax.linen")
  x = jnp.ones((8, 14, 14, 64), dtype)
  bn = normjax.batch_norm()
  params, state = bn.init(x)
  ours = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=False)[0])
  layer = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
  variables = layer.init(jax.random.key(0), x)
  theirs = jax.jit(lambda p, s, x: layer.apply({"params": p, "batch_stats": s}, x))
  state_dict = {"mean": state.mean, "var": state.var}
  ours_text = ours.lower(params, state, x).compile().as_text()
  theirs_text = theirs.lower(variables["params"], state_dict, x).compile().as_text()
  assert _canonical_program(ours_text) == _canonical_program(theirs_text)


@pytest.mark.skipif(
  compat.OLD_CPU_REDUCTIONS, reason="the facts of jaxlib ≥ 0.10's XLA:CPU (YNNPACK reductions)"
)
@pytest.mark.parametrize(
  "dtype, name, intermediates",
  [
    (jnp.float32, "Σ(x − K), Σ(x − K)²: one x − K", 1),
    (jnp.float32, "Σ(x − K), Σ(x − K)²: an alias each", 0),
    (jnp.float32, "Σx, Σx²: plain", 0),
    (jnp.bfloat16, "Σx, Σx²: plain", 1),
    (jnp.bfloat16, "Σx, Σx²: an alias each", 0),
  ],
)
def test_cpu_reductions_benchmark_shows_the_materialized_intermediates(dtype, name, intermediates):
  """`benchmarks/cpu_reductions.py`'s structural facts (lowering.py's module docstring): a shared
  `x − K` or float32 convert is written to memory for two sums; private aliases fuse it into each."""
  from benchmarks import cpu_reductions  # pylint: disable=g-import-not-at-top

  x = jnp.ones((8, 7, 7, 64), dtype)
  program = cpu_reductions.pair_programs()[name]
  compiled = cpu_reductions.compile_program(program, x, jnp.zeros((64,), jnp.float32))
  stats_ = hlo_stats.analyze(compiled.as_text(), full_numel=x.size)
  assert len(stats_["intermediates"]) == intermediates, stats_["intermediates"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eval_floor_benchmark_times_flax_normjax_and_programs_that_do_less(dtype):
  """`benchmarks/eval_floor.py`: flax's and normjax's evaluations are the same two kernels and the same
  numbers (against a float64 reference); the floors are one kernel each and compute what they say."""
  from benchmarks import eval_floor  # pylint: disable=g-import-not-at-top

  x = (jax.random.normal(jax.random.key(3), (2, 4, 4, 8)) * 3.0 + 2.0).astype(dtype)
  fns, params, stats_ = eval_floor.programs(x)
  x64, s64 = np.asarray(x, np.float64), np.asarray(params["scale"], np.float64)
  mean, var = np.asarray(stats_["mean"], np.float64), np.asarray(stats_["var"], np.float64)
  scale = s64 / np.sqrt(var + eval_floor.EPSILON)
  expected = {
    "flax": (x64 - mean) * scale + np.asarray(params["bias"], np.float64),
    "one pass, no rsqrt": (x64 - mean) * s64 + np.asarray(params["bias"], np.float64),
    "one pass, one multiply": x64 * s64,
  }
  expected["normjax"] = expected["flax"]
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  for name, fn in fns.items():
    y = fn(params, stats_, x)
    assert y.dtype == dtype and y.shape == x.shape, name
    atol = tolerance * np.abs(expected[name]).max()  # outputs near 0 (bias crosses it)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected[name], rtol=tolerance, atol=atol)
  rows = eval_floor.run_shape(x.shape, dtype, repeats=3, input_sets=1)
  kernels = {r["program"]: r["kernels"] for r in rows}
  assert kernels == {
    "flax": 2,
    "normjax": 2,
    "one pass, no rsqrt": 1,
    "one pass, one multiply": 1,
  }
  assert all(r["ratio"] > 0 and r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] for r in rows)
  summary = eval_floor.summary(rows)
  assert [s["program"] for s in summary] == list(kernels) and all(s["rows"] == 1 for s in summary)
