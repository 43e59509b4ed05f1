"""TPU facts from ahead-of-time compilation on a CPU host (`benchmarks.tpu_compile`); needs libtpu.

libtpu compiles for TPU topologies without a TPU (`benchmarks._tpu`). These tests compile a small set
for one v5e chip, a v5e 2x2 slice (4 chips) and a v5e 4x4 slice (16 chips) and assert what the
optimized HLO and the compiler's analyses say:

  * a synchronized BatchNorm layer under `shard_map` costs one all-reduce round in the forward (two
    with `stats_shift="batch"`, or under `check_vma=False` where the running-mean shift is averaged
    first) and at most one more in forward+backward for the backward's two sums (with `stats_shift=
    "batch"` none: given `dy`, XLA merges them into the forward's second round); every payload is a
    few float32 vectors of the C features, never an activation; on one chip there is no collective;
  * `axis_index_groups` in groups of 2 sums by one round of collective-permutes of C floats per sum,
    every source and target inside a group (no all-reduce in the forward); groups of 8 by 3 rounds
    on 64 chips and by one all-reduce on 16 (2 groups); an inner axis of a 2-D mesh gives replica
    groups of the group size;
  * normjax's BatchNorm fwd+bwd moves no more bytes (the compiler's cost model) than flax's;
  * registry layers compile with `shard_map`'s varying-axis checks on (also synchronized statistics
    over a `vmap` axis: the core layer with `axis_index_groups` and the Equinox face), and the MNIST
    CNN train step compiles; per-device memory of the step is flat from
    4 to 16 chips at a fixed batch per device.

Run: `TPU_SKIP_MDS_QUERY=1 python -m pytest -q tests/test_tpu_compile.py` in an environment with
`pip install -e '.[tpu-aot,equinox]'`. Without libtpu the module is skipped.
"""

import functools
import importlib.util

import pytest

if importlib.util.find_spec("libtpu") is None:
  pytest.skip(
    "libtpu is not installed: the TPU compile tests need it (pip install -e '.[tpu-aot,equinox]')",
    allow_module_level=True,
  )

from benchmarks import _tpu  # noqa: E402  (first: libtpu's environment, before jax)
from benchmarks import tpu_compile as tc  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

C = tc.COLLECTIVE_SHAPE[-1]
C_VECTOR = 4 * C  # bytes of one float32 vector over the C features
SLICE = "v5e:2x2"


@functools.lru_cache(maxsize=None)
def _layer(name):
  return {layer.name: layer for layer in tc.sync_layers()}[name]


@functools.lru_cache(maxsize=None)
def _sync_row(name, slice_name=SLICE):
  return tc.compile_sync_layer(_layer(name), slice_name)


def _facts_hold(name, row):
  failures = tc.Failures()
  tc.check_sync_layer(_layer(name), row, failures)
  assert failures.items == [], failures.items


def test_synchronized_layer_forward_one_round_backward_one_round():
  row = _sync_row("normjax")
  assert row["status"] == "ok", row
  assert (row["fwd_all_reduce"], row["bwd_all_reduce"]) == (1, 1), row
  assert row["fwd_bytes"] == [2 * C_VECTOR], "forward: the two shifted sums (the count is static)"
  assert all(b <= 4 * C_VECTOR for b in row["fwd_bwd_bytes"]), row["fwd_bwd_bytes"]
  assert row["fwd_group_sizes"] == [4], "one replica group: the whole slice"
  _facts_hold("normjax", row)


@pytest.mark.parametrize(
  "name, rounds",
  [
    ("normjax.linen", (1, 1)),
    ("flax.linen", (1, 1)),
    ('normjax stats_shift="batch"', (2, 0)),  # backward sums ride the forward's 2nd round
    ("normjax, check_vma=False (experiments.train)", (2, 1)),
  ],
)
def test_rounds_of_each_synchronized_variant(name, rounds):
  row = _sync_row(name)
  assert row["status"] == "ok", row
  assert (row["fwd_all_reduce"], row["bwd_all_reduce"]) == rounds, row
  assert max(row["fwd_bytes"] + row["fwd_bwd_bytes"]) <= 3 * C_VECTOR, row
  _facts_hold(name, row)


def test_one_chip_has_no_collective():
  row = _sync_row("normjax", "v5e:1")
  assert row["status"] == "ok" and row["fwd_bwd_all_reduce"] == 0, row


def test_device_groups_sum_by_permutes_inside_the_groups():
  name = f"normjax axis_index_groups (groups of {tc.GROUP_SIZE})"
  row = _sync_row(name)
  assert row["fwd_all_reduce"] == 0 and row["fwd_permutes"] == 2, row
  assert row["fwd_permute_bytes"] == [C_VECTOR] * 2, "Σ(x−K), Σ(x−K)²: one C-vector each"
  assert row["fwd_permutes_inside_groups"] and row["fwd_bwd_permutes_inside_groups"], row
  # the backward's only all-reduce is dscale and dbias over the whole slice (data parallel)
  assert row["fwd_bwd_bytes"] == [2 * C_VECTOR], row
  assert row["fwd_bwd_group_sizes"] == [row["devices"]], row
  _facts_hold(name, row)


@pytest.mark.parametrize("slice_name, permutes", [("v5e:4x4", 0), ("v5e:8x8", 6)])
def test_groups_of_a_host_butterfly_where_rounds_are_fewer_than_groups(slice_name, permutes):
  """Groups of 8: on 16 chips (2 groups) one all-reduce of both groups' sums; on 64 chips (8 groups)
  the butterfly, 3 rounds for each of the forward's two sums, every permute inside a group."""
  name = f"normjax axis_index_groups (groups of {tc.HOST_GROUP_SIZE})"
  row = _sync_row(name, slice_name)
  assert row["fwd_permutes"] == permutes and row["fwd_all_reduce"] == (0 if permutes else 1), row
  assert row["fwd_permutes_inside_groups"] and row["fwd_bwd_permutes_inside_groups"], row
  _facts_hold(name, row)


def test_inner_mesh_axis_keeps_the_statistics_inside_the_groups():
  name = f"normjax, inner axis of a 2-D mesh ({tc.GROUP_SIZE} devices)"
  row = _sync_row(name)
  assert row["fwd_all_reduce"] == 1 and row["fwd_group_sizes"] == [tc.GROUP_SIZE], row
  assert row["fwd_groups"] == [row["devices"] // tc.GROUP_SIZE], row
  assert row["fwd_bytes"] == [2 * C_VECTOR], row
  _facts_hold(name, row)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_normjax_moves_no_more_bytes_than_flax(dtype):
  failures = tc.Failures()
  impls = ["normjax", "normjax sync", "flax", "flax two-pass"]
  mesh_ = _tpu.mesh("v5e:1", tc.BATCH)
  row = tc.op_bytes_row((256, 28, 28, 128), jnp.dtype(dtype), mesh_, impls, failures)
  assert failures.items == [], failures.items
  tc.check_op_bytes([row], failures)
  assert failures.items == [], failures.items
  assert row["normjax"] <= row["flax"] + tc.OP_BYTES_SLACK, row
  assert row["normjax sync"] <= row["flax"] + tc.OP_BYTES_SLACK, row
  assert row["normjax"] < row["flax two-pass"], row


@pytest.mark.parametrize("slice_name", ["v5e:1", SLICE])
@pytest.mark.parametrize(
  "entry",
  [
    "batch_norm",
    "linen.BatchNorm",
    "nnx.BatchNorm",
    "batch_norm/axis_index_groups",  # statistics over a vmap axis: with the varying-axis checks on
    "equinox.BatchNorm",
  ],
)
def test_registry_layers_compile(entry, slice_name):
  from tests import registry  # pylint: disable=g-import-not-at-top

  if entry.startswith("equinox."):
    pytest.importorskip("equinox")  # .ci/run installs normjax[tpu-aot,equinox]

  mesh_ = _tpu.mesh(slice_name, tc.DATA)
  row = tc.compile_registry_entry(registry.by_name(entry), jnp.bfloat16, slice_name, mesh_)
  assert row["status"] == "ok", row


@functools.lru_cache(maxsize=None)
def _mnist(norm, slice_name):
  return tc.compile_model("mnist_cnn", norm, slice_name, per_device_batch=32)


@pytest.mark.parametrize("norm", ["batch_norm", "sync_batch_norm"])
def test_mnist_cnn_train_step_compiles(norm):
  row = _mnist(norm, SLICE)
  assert row["status"] == "ok", row
  assert row["all_gather"] == row["reduce_scatter"] == row["all_to_all"] == 0, row
  if norm == "batch_norm":  # per-device statistics: only the step's own (combined) all-reduces
    assert row["norm_all_reduces"] == 0, row
  else:  # per layer: the forward sums and the backward sums; the layers' shifts share one round
    assert row["norm_bwd_all_reduces"] == row["norm_layers"], row
    assert row["norm_layers"] <= row["norm_fwd_all_reduces"] <= row["norm_layers"] + 1, row
    assert row["norm_all_reduce_bytes"] < row["norm_input_bytes"] / 100, row


def test_per_device_memory_is_flat_from_4_to_16_chips():
  rows = [_mnist("sync_batch_norm", SLICE), _mnist("sync_batch_norm", "v5e:4x4")]
  assert [r["chips"] for r in rows] == [4, 16]
  memory = [r["memory_bytes"] for r in rows]
  assert max(memory) / min(memory) - 1 <= tc.MEMORY_TOLERANCE, memory


def test_hlo_parser_reads_collectives_and_iota_replica_groups():
  hlo = "\n".join(
    [
      "ENTRY %main (p: f32[4]) -> f32[4] {",
      "  %p = f32[4]{0} parameter(0)",
      "  %all-reduce = (f32[1,128]{1,0}, f32[128]{0}) all-reduce(%a, %b), channel_id=1, "
      "replica_groups={{0,1},{2,3}}, to_apply=%add",
      "  %ag = (f32[2]{0}, f32[4]{0}) all-gather-start(%p), replica_groups=[2,2]<=[2,2]T(1,0)",
      "  %cp = (f32[1,256]{1,0}, f32[1,256]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) "
      "collective-permute-start(%p), channel_id=2, source_target_pairs={{0,1},{1,0},{3,2}}",
      "  %cp-done = f32[1,256]{1,0} collective-permute-done(%cp)",
      "  ROOT %ag-done = f32[4]{0} all-gather-done(%ag)",
      "}",
    ]
  )
  found = _tpu.collectives(hlo)
  assert [c["kind"] for c in found] == ["all-reduce", "all-gather", "collective-permute"]
  assert found[0]["bytes"] == 2 * 128 * 4 and found[0]["replica_groups"] == [[0, 1], [2, 3]]
  assert found[1]["bytes"] == 16 and found[1]["replica_groups"] == [[0, 2], [1, 3]]
  assert found[2]["bytes"] == 256 * 4, "the array each device receives, not the u32 contexts"
  assert found[2]["pairs"] == [[0, 1], [1, 0], [3, 2]] and found[0]["pairs"] is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernel_runs_and_moves_less_than_flax(dtype):
  """With v5e's VMEM budget a fitting shape takes the Pallas forward and backward kernels, whose
  fwd+bwd moves 5 N by its fusions and kernels (the floor: read x, write y; read x and dy, write dx)
  against flax's 7 N (bfloat16) or 8 N (float32); at 7×7 the kernels read the compiler's (H, W, N, C)
  layout in place (no copies: 5 N too); a shape whose layout they cannot take (4×4: (4, 128) tiles,
  `pallas_batch_norm.LAYOUT`) keeps the XLA path."""
  failures = tc.Failures()
  mesh_ = _tpu.mesh("v5e:1", tc.BATCH)
  shapes = [(64, 16, 16, 256), (32, 7, 7, 512), (32, 4, 4, 512)]
  rows = [tc.pallas_row(s, jnp.dtype(dtype), mesh_, failures) for s in shapes]
  assert failures.items == [], failures.items
  tc.check_pallas_rows(rows, failures)
  assert failures.items == [], failures.items
  for row in rows[:2]:
    assert row["normjax Pallas kernels"] == 2, row
    assert row["normjax Pallas"] <= 5.05 + tc.OP_BYTES_SLACK, row
    assert row["flax"] >= 7.0 and row["normjax"] >= 7.0, row
  assert not rows[2]["fits"] and rows[2]["normjax Pallas kernels"] == 0, rows[2]


@pytest.mark.parametrize(
  "shape, kernel",
  [
    ((256, 56, 56, 64), "two sweeps + two sweeps"),  # the batch on the lanes, features on sublanes
    ((256, 28, 28, 128), "two sweeps + two sweeps"),
    ((256, 14, 14, 256), "resident + resident"),  # the (H, W, N, C) view
  ],
)
def test_moonshot_rows_move_under_six_tenths_of_flax(shape, kernel):
  """Issue 16.3's bfloat16 ResNet-50 rows ≥ 25 MB at batch 256 (v5e's budget): fwd+bwd by the
  kernels' block specs ≤ 0.6× flax's compiler figure, and below flax's own fusion bytes."""
  failures = tc.Failures()
  row = tc.pallas_row(shape, jnp.dtype("bfloat16"), _tpu.mesh("v5e:1", tc.BATCH), failures)
  assert failures.items == [], failures.items
  assert row["kernel"] == kernel and row["normjax Pallas kernels"] == 2, row
  assert row["normjax Pallas"] <= 0.6 * row["flax cost model"], row
  assert row["normjax Pallas"] < row["flax"], row


@pytest.mark.parametrize("slice_name", ["v4:2x2x1", "v5p:2x2x1", "v6e:2x2"])
def test_pallas_kernel_compiles_for_each_generation(slice_name):
  """A block within the budget: the resident kernels."""
  _grad_step_kernels(slice_name, (16, 16, 16, 128), "normjax_bn_stream", 0)


@pytest.mark.parametrize("slice_name", ["v4:2x2x1", "v5e:1", "v5p:2x2x1", "v6e:2x2"])
def test_streaming_kernels_compile_for_each_generation(slice_name):
  """A block larger than the budget (28×28 at 32 images: its (H, W, N, C) view, 6.4 MB of bfloat16
  per 128 features) runs the two-sweep kernels (`pallas_streaming`) forward and backward."""
  _grad_step_kernels(slice_name, (32, 28, 28, 128), "normjax_bn_stream", 2)


def _grad_step_kernels(slice_name, shape, name, named):
  """The gradient step of `batch_norm(tpu_kernel=True)` on one device of the slice, with a budget
  within v4's 16 MiB: two Pallas kernels, `named` of them called `name*`."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import normjax  # pylint: disable=g-import-not-at-top
  from normjax._src import pallas_batch_norm  # pylint: disable=g-import-not-at-top

  bn = normjax.batch_norm(tpu_kernel=True)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  params, state = jax.eval_shape(bn.init, x)
  mesh_ = Mesh(np.array(_tpu.slice_devices(slice_name)[:1]), ("one",))
  args = [_tpu.abstract(v, mesh_) for v in (params, state, x)]

  def step(params, state, x):
    loss = lambda p, x: jnp.sum(bn.apply(p, state, x, training=True)[0].astype(jnp.float32))  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(params, x)

  with pallas_batch_norm.assume_vmem_budget(8 * 2**20):  # within v4's 16 MiB
    hlo = jax.jit(step).lower(*args).compile().as_text()
  assert hlo.count('custom_call_target="tpu_custom_call"') == 2, slice_name  # forward, backward
  calls = [ln for ln in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in ln]
  assert sum(f"%{name}" in ln for ln in calls) == named, (slice_name, calls)
