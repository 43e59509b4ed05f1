"""TPU compile suite (no TPU needed): every layer, face and train step compiled for TPU v4/v5e/v5p/v6e.

libtpu compiles for any TPU topology on a CPU host (`benchmarks._tpu`); this suite compiles, for slices
from one chip to 256 chips, data parallel over the whole slice (`jax.shard_map` over a 1-D mesh of every
device, the batch split along axis 0, a fixed batch per device):

* `registry`: every entry of `tests/registry.py` (every public constructor and face: core, linen, nnx,
  Equinox), float32 and bfloat16 input, training and evaluation, forward and backward (one program
  per entry and dtype; a failing one is compiled again mode by mode to name the mode).
* `models`: the experiments' train step (`benchmarks._tpu_models`, as `experiments.train` builds it:
  jit of a shard_map, check_vma=False) for the MNIST CNN, the CIFAR CNN, ResNet-18 (CIFAR) and a
  bottleneck ResNet-50 (224×224×3) with norm = batch_norm, sync_batch_norm, ghost_batch_norm,
  batch_renorm and group_norm; per-device memory (`memory_analysis`) and collectives of each.
* `collectives`: one synchronized BatchNorm layer per slice (C = 256, bfloat16, 32×14×14 per device):
  collectives in the forward and in forward+backward, their payloads and replica groups, for normjax
  (default, under shard_map with and without `check_vma`, `stats_shift="batch"`, the linen face,
  `axis_index_groups`, and an inner axis of a 2-D mesh) and flax.linen.BatchNorm(axis_name=...).
* `bytes`: the compiler's `bytes accessed` of BatchNorm fwd+bwd on one v5e chip at ResNet-50 shapes,
  batch 256, every variant, normjax vs flax; and of whole train steps (ResNet-18 CIFAR, batch 512, and
  ResNet-50 ImageNet-shaped, batch 128, bfloat16), normjax vs flax. With `--msa off` the train steps
  are compiled again with the compiler's memory-space assignment (VMEM placement) off.

Facts are asserted, not only printed (`check_*`): the collective rounds per synchronized layer, that
their payloads are per-feature vectors (never an activation), that device groups' permutes stay
inside the groups,
and that per-device memory of the ResNet-50 step stays flat from 4 to 256 chips. Every failure (a
compile error, naming layer, options, dtype, mode and slice; or a fact that does not hold) is collected
and printed at the end, and the exit status is then 1.

All figures are the TPU compiler's cost model and buffer assignment, not timings.

Usage (libtpu needed: `pip install -e '.[tpu-aot,equinox]'`):
  python -m benchmarks.tpu_compile                  # the full matrix (hours on 2 cores)
  python -m benchmarks.tpu_compile --ci             # a subset: a few minutes
  python -m benchmarks.tpu_compile --parts collectives,bytes --topologies v5e:2x2,v5e:16x16
  python -m benchmarks.tpu_compile --parts bytes --msa off   # the train steps, VMEM placement off
  python -m benchmarks.tables                       # BENCHMARKS.md's tables from the JSON
"""

from benchmarks import _tpu  # first: it sets libtpu's environment before jax is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Tuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import tables  # noqa: E402
from normjax._src import collectives  # noqa: E402
from normjax._src import pallas_batch_norm  # noqa: E402
from normjax._src import pallas_plan  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
OUT_FILES = {
  "registry": "tpu_compile.json",
  "models": "tpu_compile.json",
  "collectives": "tpu_collectives.json",
  "bytes": "tpu_bytes.json",
  "pallas": "tpu_pallas.json",
}
PARTS = ("registry", "models", "collectives", "bytes", "pallas")
# libtpu's flag that turns off memory-space assignment (the compiler's placement of buffers in VMEM)
MSA_OFF = "--xla_vf_vmem_memory_space_assignment=false"
CI_SLICES = ("v5e:1", "v5e:2x2")
MEMORY_SLICES = ("v5e:2x2", "v5e:4x4", "v5e:8x8", "v5e:16x16")  # 4 to 256 chips
MEMORY_TOLERANCE = 0.02  # per-device memory may vary by 2 % between slice sizes
DATA = "data"  # the registry's mesh axis (the Equinox entries' own vmap axis is "batch")
BATCH = "batch"  # experiments.models.BATCH_AXIS


# ------------------------------------------------------------------------------------------ failures


@dataclasses.dataclass
class Failures:
  """Compile failures and facts that do not hold, collected over the whole run."""

  items: List[dict] = dataclasses.field(default_factory=list)

  def add(self, what: str, **where):
    item = {"what": what, **where}
    self.items.append(item)
    print("FAILED " + tables.row_line(item), flush=True)

  def check(self, ok: bool, fact: str, **where) -> bool:
    """Records `fact` as a failure unless `ok`."""
    if not ok:
      self.add(f"fact does not hold: {fact}", **where)
    return bool(ok)


def _error_line(error: BaseException) -> str:
  lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


# -------------------------------------------------------------------------------------- registry


REGISTRY_MODES = {  # name -> (training, with backward)
  "training fwd": (True, False),
  "training fwd+bwd": (True, True),
  "evaluation fwd": (False, False),
  "evaluation fwd+bwd": (False, True),
}


def _per_device_program(driver, modes: Dict[str, tuple]):
  """`f(params, state, x, ct)` running `driver` in each mode on this device's `x`; every output gets a
  leading axis of 1 (out_specs P(DATA): each device's own values, whatever varies)."""

  def run(params, state, x, ct):
    out = {}
    for name, (training, backward) in modes.items():
      apply = functools.partial(_apply_driver, driver, state, training=training)
      if backward:
        y, vjp, new_state = jax.vjp(apply, params, x, has_aux=True)
        out[name] = (y, new_state, vjp(ct.astype(y.dtype)))
      else:
        out[name] = apply(params, x)
    return jax.tree.map(lambda a: a[None], out)

  return run


def _apply_driver(driver, state, params, x, *, training):
  return driver.apply(params, state, x, training=training)


def registry_program(entry, dtype, mesh_, modes, check_vma=True):
  """(shard_map program, abstract args) of registry `entry` in `modes` over `mesh_`."""
  from jax.experimental import checkify  # pylint: disable=g-import-not-at-top

  driver = entry.driver()
  x = entry.input(dtype)
  params, state = driver.init(x)  # concrete, on the host (the entries' inputs are tiny)
  y = jax.eval_shape(lambda p, s, x: driver.apply(p, s, x, training=True)[0], params, state, x)
  mapped = jax.shard_map(
    _per_device_program(driver, modes),
    mesh=mesh_,
    in_specs=(P(), P(), P(DATA), P(DATA)),
    out_specs=P(DATA),
    check_vma=check_vma,
  )
  fn = checkify.checkify(mapped) if entry.checkify else mapped
  args = (
    _tpu.abstract(params, mesh_),
    _tpu.abstract(state, mesh_),
    _tpu.global_batch(x.shape, x.dtype, mesh_, DATA),
    _tpu.global_batch(y.shape, y.dtype, mesh_, DATA),
  )
  return fn, args


def _compile_registry(entry, dtype, mesh_, modes, check_vma=True):
  fn, args = registry_program(entry, dtype, mesh_, modes, check_vma)
  return _tpu.compile_facts(fn, *args)


@functools.lru_cache(maxsize=None)
def jax_psum_over_vmap_axis_fails() -> bool:
  """True when this jax cannot `psum` over a `vmap` axis inside `shard_map(check_vma=True)`.

  A JAX bug (jax 0.10.2: `AssertionError` in `pvary`), independent of normjax: every layer that
  synchronizes over a vmap axis (normjax's `axis_name` under `jax.vmap`, Equinox's BatchNorm, also
  `eqx.nn.BatchNorm` itself) fails to trace there. Checked with five lines of pure JAX on a CPU mesh.
  """
  mesh_ = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), (DATA,))
  inner = lambda xi: jax.lax.psum(xi, "v")  # noqa: E731
  body = jax.shard_map(
    lambda x: jax.vmap(inner, axis_name="v")(x), mesh=mesh_, in_specs=P(DATA), out_specs=P(DATA)
  )
  try:
    jax.jit(body).lower(jnp.zeros((2, 3)))
    return False
  except AssertionError:
    return True


JAX_VMAP_PSUM_BUG = (
  "JAX bug: psum over a vmap axis inside shard_map(check_vma=True) raises AssertionError "
  "(reproduced without normjax); compiled with check_vma=False"
)


def _failing_modes(entry, dtype, mesh_, check_vma) -> Dict[str, str]:
  """{mode: error} of the modes that fail to compile alone."""
  errors = {}
  for mode, flags in REGISTRY_MODES.items():
    try:
      _compile_registry(entry, dtype, mesh_, {mode: flags}, check_vma)
    except Exception as error:  # pylint: disable=broad-except
      errors[mode] = _error_line(error)
  return errors


def compile_registry_entry(entry, dtype, slice_name, mesh_) -> dict:
  """One registry cell: every mode in one shard_map(check_vma=True) program.

  When that fails, the failing modes are named (each compiled alone) and the cell is compiled again
  with check_vma=False (as experiments.train runs). A check_vma=True failure that the JAX bug
  `jax_psum_over_vmap_axis_fails` explains is not counted as a failure of the entry.
  """
  row = {"slice": slice_name, "entry": entry.name, "covers": ",".join(entry.covers)}
  row["dtype"] = jnp.dtype(dtype).name
  try:
    facts, row["seconds"] = _timed(lambda: _compile_registry(entry, dtype, mesh_, REGISTRY_MODES))
    return {
      **row,
      "status": "ok",
      "bytes_accessed": facts.bytes_accessed,
      "memory_bytes": facts.memory_bytes,
    }
  except Exception as error:  # pylint: disable=broad-except  (collected and reported)
    row["error"] = _error_line(error)
    explained = isinstance(error, AssertionError) and jax_psum_over_vmap_axis_fails()
  if not explained:
    row["mode_errors"] = _failing_modes(entry, dtype, mesh_, check_vma=True)
    row["failed_modes"] = list(row["mode_errors"])
  try:
    facts, row["seconds"] = _timed(
      lambda: _compile_registry(entry, dtype, mesh_, REGISTRY_MODES, check_vma=False)
    )
    row.update(bytes_accessed=facts.bytes_accessed, memory_bytes=facts.memory_bytes)
    if explained:
      return {**row, "status": "ok, check_vma=False (JAX bug)", "note": JAX_VMAP_PSUM_BUG}
    return {**row, "status": "failed with check_vma=True (compiles with check_vma=False)"}
  except Exception as error:  # pylint: disable=broad-except
    row.update(status="failed", check_vma_false_error=_error_line(error))
  if explained:
    row["mode_errors"] = _failing_modes(entry, dtype, mesh_, check_vma=False)
    row["failed_modes"] = list(row["mode_errors"])
  return row


def registry_ok(row) -> bool:
  return row["status"] in ("ok", "ok, check_vma=False (JAX bug)")


def run_registry(
  slices, dtypes, failures: Failures, name_filter=None, done=None, save=None
) -> List[dict]:
  from tests import registry  # pylint: disable=g-import-not-at-top  (imports flax, optax, equinox)

  rows, done = [], done or {}
  entries = [e for e in registry.entries() if not name_filter or name_filter in e.name]
  for slice_name in slices:
    mesh_ = _tpu.mesh(slice_name, DATA)
    for entry in entries:
      for dtype in dtypes:
        key = (slice_name, entry.name, jnp.dtype(dtype).name)
        row = done.get(key) or compile_registry_entry(entry, dtype, slice_name, mesh_)
        rows.append(row)
        if save:
          save(rows)
        shown = ("slice", "entry", "dtype", "status", "seconds")
        print(tables.row_line({k: row[k] for k in shown if k in row}), flush=True)
        if not registry_ok(row):
          failures.add(
            row["status"],
            part="registry",
            slice=slice_name,
            layer=entry.name,
            covers=row["covers"],
            dtype=row["dtype"],
            modes=",".join(row.get("failed_modes", [])) or "every mode",
            error=row["error"],
          )
  return rows


# ---------------------------------------------------------------------------------------- models


def compile_model(model_name, norm, slice_name, per_device_batch) -> dict:
  """One cell of the models part: the experiments' train step, compiled for the slice."""
  from benchmarks import _tpu_models as tm  # pylint: disable=g-import-not-at-top

  row = {
    "slice": slice_name,
    "model": model_name,
    "norm": norm,
    "per_device_batch": per_device_batch,
  }
  mesh_ = _tpu.mesh(slice_name, BATCH)
  spec = tm.MODELS[model_name]
  model = tm.build_model(model_name, norm, per_device_batch)
  tx = tm.optimizer()
  try:
    state = _tpu.abstract(tm.abstract_state(model, tx, spec.image_shape), mesh_)
    batch = {
      "image": _tpu.global_batch((per_device_batch, *spec.image_shape), jnp.float32, mesh_),
      "label": _tpu.global_batch((per_device_batch,), jnp.int32, mesh_),
    }
    step = tm.make_train_step(model, tx, tm.norm_config(norm), mesh_)
    facts, row["seconds"] = _timed(lambda: _tpu.compile_facts(step, state, batch, donate_argnums=0))
  except Exception as error:  # pylint: disable=broad-except
    return {**row, "status": "failed", "error": _error_line(error)}
  layers, norm_bytes = tm.norm_input_bytes(model, spec.image_shape, per_device_batch)
  row.update(status="ok", norm_layers=layers, norm_input_bytes=norm_bytes, **facts.summary())
  row.update(all_reduce_phases(facts.collectives))
  row.update(_tpu.describe(slice_name))
  return row


def all_reduce_phases(found) -> dict:
  """All-reduces by where their (first merged) op comes from: a norm layer's forward or backward, or
  the step (gradients, metrics, running statistics); XLA's combiner may merge several into one."""
  reduces = [c for c in found if c["kind"] == "all-reduce"]
  norm = [c for c in reduces if "Norm" in c["op_name"]]
  backward = [c for c in norm if "transpose" in c["op_name"]]
  return {
    "norm_all_reduces": len(norm),
    "norm_fwd_all_reduces": len(norm) - len(backward),
    "norm_bwd_all_reduces": len(backward),
    "norm_all_reduce_bytes": sum(c["bytes"] for c in norm),
    "step_all_reduces": len(reduces) - len(norm),
  }


def run_models(
  slices, models_, norms, per_device_batch, failures, done=None, save=None
) -> List[dict]:
  rows, done = [], done or {}
  for slice_name in slices:
    for model_name in models_:
      for norm in norms:
        key = (slice_name, model_name, norm)
        row = done.get(key) or compile_model(model_name, norm, slice_name, per_device_batch)
        rows.append(row)
        if save:
          save(rows)
        print(tables.row_line(row), flush=True)
        if row["status"] != "ok":
          failures.add(
            "compile failed",
            part="models",
            slice=slice_name,
            model=model_name,
            norm=norm,
            per_device_batch=per_device_batch,
            error=row["error"],
          )
  return rows


def check_memory_flat(rows, failures: Failures) -> List[dict]:
  """Per-device memory of each (model, norm) over `MEMORY_SLICES` (4 to 256 chips): within 2 %."""
  out = []
  for (model_name, norm), group in _group_rows(rows, ("model", "norm")).items():
    group = [r for r in group if r["slice"] in MEMORY_SLICES and r["status"] == "ok"]
    if len(group) < 2:
      continue
    memory = [r["memory_bytes"] for r in group]
    spread = max(memory) / min(memory) - 1.0
    out.append({"model": model_name, "norm": norm, "spread": spread, "slices": len(group)})
    failures.check(
      spread <= MEMORY_TOLERANCE,
      f"per-device memory flat within {MEMORY_TOLERANCE:.0%} from "
      f"{group[0]['chips']} to {group[-1]['chips']} chips",
      model=model_name,
      norm=norm,
      spread=spread,
    )
  return out


def _group_rows(rows, keys):
  groups = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
  return groups


# ----------------------------------------------------------------------------------- collectives

COLLECTIVE_SHAPE = (32, 14, 14, 256)  # per device; C = 256
GROUP_SIZE = 2  # axis_index_groups: consecutive pairs of devices
HOST_GROUP_SIZE = 8  # axis_index_groups of one host's devices (8 GPUs, or a v4 host's 8 cores)


@dataclasses.dataclass(frozen=True)
class SyncLayer:
  """A synchronized BatchNorm variant of the collectives part.

  `make(n)` gives `(apply(params, state, x) -> (y, state), params, state)` for an axis of n devices;
  `expect` = (forward rounds, rounds forward+backward adds to them) of all-reduce, None where nothing
  is asserted.
  """

  name: str
  make: Callable[[int], Any]
  check_vma: bool = True
  grid: bool = (
    False  # a 2-D mesh (n / GROUP_SIZE, GROUP_SIZE); the layer reduces over the inner axis
  )
  expect: Optional[tuple] = None
  min_devices: int = 1
  group_size: Optional[int] = None  # axis_index_groups of this many consecutive devices


def _normjax_layer(**options):
  import normjax  # pylint: disable=g-import-not-at-top

  def make(n):
    opts = {k: (v(n) if callable(v) else v) for k, v in options.items()}
    bn = normjax.batch_norm(momentum=0.9, **opts)
    params, state = bn.init(jnp.zeros(COLLECTIVE_SHAPE, jnp.bfloat16))
    return (lambda p, s, x: bn.apply(p, s, x, training=True)), params, state

  return make


def _linen_layer(cls, **fields):
  def make(n):
    fields_n = {k: (v(n) if callable(v) else v) for k, v in fields.items()}
    layer = cls(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16, **fields_n)
    variables = jax.eval_shape(
      layer.init, jax.random.key(0), jnp.zeros(COLLECTIVE_SHAPE, jnp.bfloat16)
    )
    variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables)

    def apply(params, state, x):
      y, updates = layer.apply({"params": params, **state}, x, mutable=list(state))
      return y, updates

    return apply, variables["params"], {k: v for k, v in variables.items() if k != "params"}

  return make


def groups_of(size):
  """`axis_index_groups` of `size` consecutive devices, as a function of the axis size."""
  return lambda n: [list(range(i, i + size)) for i in range(0, n, size)]


_groups = groups_of(GROUP_SIZE)


def sync_layers():
  """The synchronized BatchNorm variants of the collectives part, with their expected rounds."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import normjax.linen as njl  # pylint: disable=g-import-not-at-top

  return [
    SyncLayer("normjax", _normjax_layer(axis_name=BATCH), expect=(1, 1)),
    SyncLayer(
      "normjax, check_vma=False (experiments.train)",
      _normjax_layer(axis_name=BATCH),
      check_vma=False,
      expect=(2, 1),
    ),
    SyncLayer(  # Σg and Σg·(x − μ) need only μ, so XLA merges them into the forward's 2nd round
      'normjax stats_shift="batch"',
      _normjax_layer(axis_name=BATCH, stats_shift="batch"),
      expect=(2, 0),
    ),
    SyncLayer("normjax.linen", _linen_layer(njl.BatchNorm, axis_name=BATCH), expect=(1, 1)),
    SyncLayer("flax.linen", _linen_layer(nn.BatchNorm, axis_name=BATCH), expect=(1, 1)),
    SyncLayer(
      f"normjax axis_index_groups (groups of {GROUP_SIZE})",
      _normjax_layer(axis_name=BATCH, axis_index_groups=_groups),
      expect=(0, 1),  # statistics by permutes inside the groups; the bwd adds dscale, dbias's psum
      min_devices=2 * GROUP_SIZE,
      group_size=GROUP_SIZE,
    ),
    SyncLayer(  # butterfly (3 rounds) where there are more than 3 groups, else one all-reduce
      f"normjax axis_index_groups (groups of {HOST_GROUP_SIZE})",
      _normjax_layer(axis_name=BATCH, axis_index_groups=groups_of(HOST_GROUP_SIZE)),
      min_devices=2 * HOST_GROUP_SIZE,
      group_size=HOST_GROUP_SIZE,
    ),
    SyncLayer(  # backward: the BN sums over "inner", then the parameters' gradient over "outer"
      f"normjax, inner axis of a 2-D mesh ({GROUP_SIZE} devices)",
      _normjax_layer(axis_name="inner"),
      grid=True,
      expect=(1, 2),
      min_devices=2 * GROUP_SIZE,
    ),
    SyncLayer(
      f"flax.linen axis_index_groups (groups of {GROUP_SIZE})",
      _linen_layer(nn.BatchNorm, axis_name=BATCH, axis_index_groups=_groups),
      min_devices=2 * GROUP_SIZE,
      group_size=GROUP_SIZE,
    ),
  ]


def _layer_programs(apply, mesh_, data_spec, check_vma):
  """(forward, forward+backward) shard_map programs of a layer; states and outputs per device."""
  stacked = lambda tree: jax.tree.map(lambda a: a[None], tree)  # noqa: E731

  def fwd(params, state, x):
    y, new_state = apply(params, state, x)
    return y, stacked(new_state)

  def fwd_bwd(params, state, x, dy):
    y, vjp, new_state = jax.vjp(lambda p, x: apply(p, state, x), params, x, has_aux=True)
    dparams, dx = vjp(dy)
    return y, stacked(new_state), dparams, dx

  common = dict(mesh=mesh_, check_vma=check_vma)
  out = (data_spec, data_spec)
  forward = jax.shard_map(fwd, in_specs=(P(), P(), data_spec), out_specs=out, **common)
  backward = jax.shard_map(
    fwd_bwd, in_specs=(P(), P(), data_spec, data_spec), out_specs=out + (P(), data_spec), **common
  )
  return forward, backward


def _round_summary(found, prefix, group_size=None):
  """Counts, payloads and replica groups of a program's collectives, keys prefixed; with `group_size`,
  whether every collective-permute stays inside consecutive groups of that many devices."""
  reduces = [c for c in found if c["kind"] == "all-reduce"]
  permutes = [c for c in found if c["kind"] == "collective-permute"]
  groups = [c["replica_groups"] for c in reduces if c["replica_groups"]]
  pairs = [pair for c in permutes for pair in (c["pairs"] or [])]
  return {
    f"{prefix}_all_reduce": len(reduces),
    f"{prefix}_permutes": len(permutes),
    f"{prefix}_permute_bytes": [c["bytes"] for c in permutes],
    f"{prefix}_permutes_inside_groups": None
    if group_size is None
    else all(a // group_size == b // group_size for a, b in pairs),
    f"{prefix}_other": len(found) - len(reduces) - len(permutes),
    f"{prefix}_bytes": [c["bytes"] for c in reduces],
    f"{prefix}_group_sizes": sorted({len(g) for gs in groups for g in gs}),
    f"{prefix}_groups": sorted({len(gs) for gs in groups}),
  }


def compile_sync_layer(layer: SyncLayer, slice_name) -> dict:
  info = _tpu.describe(slice_name)
  n = info["devices"]
  row = {"slice": slice_name, "devices": n, "chips": info["chips"], "layer": layer.name}
  row.update(C=COLLECTIVE_SHAPE[-1], x_bytes=int(np.prod(COLLECTIVE_SHAPE)) * 2)
  if layer.grid:
    mesh_ = _tpu.grid_mesh(slice_name, ("outer", "inner"), GROUP_SIZE)
    data_spec = P(("outer", "inner"))
    x = _tpu.global_batch(COLLECTIVE_SHAPE, jnp.bfloat16, mesh_, ("outer", "inner"))
  else:
    mesh_, data_spec = _tpu.mesh(slice_name, BATCH), P(BATCH)
    x = _tpu.global_batch(COLLECTIVE_SHAPE, jnp.bfloat16, mesh_)
  try:
    apply, params, state = layer.make(n)
    forward, backward = _layer_programs(apply, mesh_, data_spec, layer.check_vma)
    p, s = _tpu.abstract(params, mesh_), _tpu.abstract(state, mesh_)
    fwd = _tpu.compile_facts(forward, p, s, x)
    both = _tpu.compile_facts(backward, p, s, x, x)
  except NotImplementedError as error:
    return {**row, "status": "unsupported", "error": _error_line(error)}
  except Exception as error:  # pylint: disable=broad-except
    return {**row, "status": "failed", "error": _error_line(error)}
  row.update(status="ok", **_round_summary(fwd.collectives, "fwd", layer.group_size))
  row.update(_round_summary(both.collectives, "fwd_bwd", layer.group_size))
  row["bwd_all_reduce"] = row["fwd_bwd_all_reduce"] - row["fwd_all_reduce"]
  row["fwd_bwd_bytes_accessed"] = both.bytes_accessed
  return row


def _check_groups(layer: SyncLayer, row, check, c_vector) -> int:
  """Device groups: permutes inside the groups (`collectives.permute_rounds` rounds for each of the
  forward's two sums, C floats each) where they are fewer than the groups, else one all-reduce over
  the slice. The backward's all-reduce over the slice is dscale and dbias (data parallel). Returns
  how many C-vectors a payload may hold."""
  groups = groups_of(layer.group_size)(row["devices"])
  rounds = collectives.permute_rounds(groups)
  check(row["fwd_bwd_group_sizes"] == [row["devices"]], "device groups: all-reduces span the slice")
  if rounds >= len(groups):
    check(
      row["fwd_permutes"] == 0 and row["fwd_all_reduce"] == 1,
      f"{len(groups)} groups: the forward's sums are one all-reduce (permutes: {rounds} rounds)",
    )
    return 3 * len(groups)  # count, Σ(x − K), Σ(x − K)² of every group
  check(
    row["fwd_all_reduce"] == 0 and row["fwd_permute_bytes"] == [c_vector] * (2 * rounds),
    f"device groups: the forward's two sums take {rounds} permute round(s) each, of C floats",
  )
  check(
    row["fwd_permutes_inside_groups"] and row["fwd_bwd_permutes_inside_groups"],
    "device groups: every permute stays inside a group",
  )
  return 3


def check_sync_layer(layer: SyncLayer, row, failures: Failures) -> None:
  """The asserted facts of one collectives row (see the module docstring)."""
  where = dict(part="collectives", slice=row["slice"], layer=layer.name)
  if row["status"] != "ok" or row["devices"] == 1:
    if row["status"] == "ok":  # one device: the sums need no collective at all
      failures.check(row["fwd_bwd_all_reduce"] == 0, "no all-reduce on one device", **where)
    return
  c_vector = 4 * row["C"]  # one float32 vector of C features
  check = functools.partial(failures.check, **where)
  check(
    row["fwd_other"] == 0 and row["fwd_bwd_other"] == 0, "no all-gather, reduce-scatter, all-to-all"
  )
  vectors = 3
  if layer.group_size:
    vectors = _check_groups(layer, row, check, c_vector)
  else:
    check(row["fwd_bwd_permutes"] == 0, "no collective-permute")
  payloads = row["fwd_bytes"] + row["fwd_bwd_bytes"] + row["fwd_bwd_permute_bytes"]
  check(
    max(payloads, default=0) <= vectors * c_vector,
    f"every payload ≤ {vectors} C-vectors, never an activation",
  )
  check(max(payloads, default=0) * 8 < row["x_bytes"], "payloads ≪ the activation")
  if layer.expect is not None:
    fwd_rounds, bwd_rounds = layer.expect
    check(row["fwd_all_reduce"] == fwd_rounds, f"forward: {fwd_rounds} all-reduce round(s)")
    check(row["bwd_all_reduce"] == bwd_rounds, f"backward: {bwd_rounds} all-reduce round(s)")
  sizes = row["fwd_group_sizes"]
  if layer.grid:
    check(sizes == [GROUP_SIZE], f"inner axis: replica groups of {GROUP_SIZE} devices")
  elif not layer.group_size:
    check(sizes == [row["devices"]], "replica group: the whole slice")


def run_collectives(slices, failures: Failures) -> List[dict]:
  rows = []
  for slice_name in slices:
    n = _tpu.describe(slice_name)["devices"]
    for layer in sync_layers():
      if n < layer.min_devices:
        continue
      row = compile_sync_layer(layer, slice_name)
      rows.append(row)
      print(tables.row_line(row), flush=True)
      if row["status"] == "failed":
        failures.add(
          "compile failed",
          part="collectives",
          slice=slice_name,
          layer=layer.name,
          error=row["error"],
        )
      check_sync_layer(layer, row, failures)
  return rows


# ----------------------------------------------------------------------------------------- bytes

OP_BATCH = 256
OP_SHAPES = [
  (56, 56, 64),
  (28, 28, 128),
  (14, 14, 256),
  (7, 7, 512),
  (56, 56, 256),
  (28, 28, 512),
  (14, 14, 1024),
  (7, 7, 2048),
]
CI_OP_SHAPES = [(28, 28, 128)]
OP_IMPLS = {  # name -> (library, variant, extra normjax options)
  "normjax": ("normjax", "default", {}),
  "normjax ghost": ("normjax", "ghost", {}),
  "normjax renorm": ("normjax", "renorm", {}),
  "normjax masked": ("normjax", "masked", {}),
  "normjax sync": ("normjax", "sync", {}),
  'normjax stats_shift="batch"': ("normjax", "default", {"stats_shift": "batch"}),
  "flax": ("flax", "default", {}),
  "flax two-pass": ("flax_two_pass", "default", {}),
  "flax masked": ("flax", "masked", {}),
  "flax sync": ("flax", "sync", {}),
}


KERNEL_IMPLS = {"normjax tpu_kernel=True": ("normjax", "default", {"tpu_kernel": True})}


def _op_program(impl, shape, dtype, mesh_):
  """(fwd+bwd function, abstract args) of one op row: y, new state, dx, dscale, dbias."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import normjax  # pylint: disable=g-import-not-at-top
  from benchmarks import op_batch_norm  # pylint: disable=g-import-not-at-top

  library, variant, extra = {**OP_IMPLS, **KERNEL_IMPLS}[impl]
  x = jax.ShapeDtypeStruct(shape, dtype)
  if library == "normjax":
    bn = normjax.batch_norm(**op_batch_norm.variant_options(variant, shape[0]), **extra)
    params, state = jax.eval_shape(bn.init, x)
    apply = lambda p, s, x, mask: bn.apply(p, s, x, training=True, mask=mask)  # noqa: E731
  else:
    layer = nn.BatchNorm(
      momentum=0.99,
      epsilon=1e-5,
      use_fast_variance=library == "flax",
      axis_name=BATCH if variant == "sync" else None,
      dtype=dtype,
    )
    variables = jax.eval_shape(
      functools.partial(layer.init, use_running_average=True), jax.random.key(0), x
    )
    params, state = variables["params"], variables["batch_stats"]

    def apply(p, s, x, mask):
      return layer.apply(
        {"params": p, "batch_stats": s},
        x,
        use_running_average=False,
        mask=mask,
        mutable=["batch_stats"],
      )

  fn = op_batch_norm._mode_fns(apply, None)["fwd+bwd"]  # pylint: disable=protected-access
  masked = variant == "masked"
  if variant == "sync":
    fn = jax.shard_map(
      functools.partial(fn, mask=None),
      mesh=mesh_,
      in_specs=(P(), P(), P(BATCH), P(BATCH)),
      out_specs=(P(BATCH), P(), P(BATCH), P(), P()),
    )
  elif not masked:
    fn = functools.partial(fn, mask=None)
  args = [_tpu.abstract(params, mesh_), _tpu.abstract(state, mesh_)]
  args += [_tpu.global_batch(shape, dtype, mesh_)] * 2
  if masked:
    args.append(_tpu.global_batch(shape[:-1] + (1,), jnp.bool_, mesh_))
  return fn, args


def op_bytes_row(shape, dtype, mesh_, impls, failures: Failures) -> dict:
  n_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  row = {"shape": "x".join(map(str, shape)), "dtype": jnp.dtype(dtype).name, "N_bytes": n_bytes}
  for impl in impls:
    try:
      fn, args = _op_program(impl, shape, dtype, mesh_)
      with pallas_batch_norm.assume_vmem_budget(
        0
      ):  # the portable XLA program (Pallas: `pallas_row`)
        row[impl] = _tpu.compile_facts(fn, *args).bytes_accessed / n_bytes
    except Exception as error:  # pylint: disable=broad-except
      failures.add(
        "compile failed",
        part="bytes",
        layer=impl,
        shape=row["shape"],
        dtype=row["dtype"],
        error=_error_line(error),
      )
  return row


OP_BYTES_SLACK = 0.05  # in N: a pass over the activation costs ≥ 1 N, per-feature vectors ≪ 0.05 N


def check_op_bytes(rows, failures: Failures) -> None:
  """normjax's default fwd+bwd moves no more bytes than flax's (within `OP_BYTES_SLACK` N: no extra
  pass over the activation), against flax's default and two-pass variance."""
  for row in rows:
    if "normjax" in row and "flax" in row:
      failures.check(
        row["normjax"] <= min(row["flax"], row.get("flax two-pass", np.inf)) + OP_BYTES_SLACK,
        "normjax fwd+bwd bytes accessed ≤ flax's (no extra pass over the activation)",
        part="bytes",
        shape=row["shape"],
        dtype=row["dtype"],
        normjax=row["normjax"],
        flax=row["flax"],
      )


V5E_VMEM_BUDGET = (
  96 * 2**20
)  # 3/4 of a v5e core's 128 MiB (what `vmem_budget()` takes on a v5e host)
PALLAS_IMPLS = ("normjax", "flax")


_MSA_OPS = ("copy-start", "slice-start", "slice-done")  # memory-space assignment's prefetches


def _hlo_traffic(hlo: str) -> Tuple[float, float, int]:
  """Operand + result bytes over the ENTRY's top-level instructions, split into memory-space
  assignment's prefetches (`_MSA_OPS` and its `ConcatBitcast` reassembly) and everything else
  (fusions, kernels), and the number of Pallas kernels. A streaming kernel's inputs count once more
  for the share of chunks its second sweep reads again (`pallas_plan.reread`, from the plan in
  its name): what its block specs copy."""
  reassembly = set(re.findall(r'%(\S+) = [^\n]*custom_call_target="ConcatBitcast"', hlo))
  msa = compute = 0.0
  for row in _tpu.entry_traffic(hlo):
    if row["op"] in _MSA_OPS or row["name"] in reassembly:
      msa += row["read"] + row["written"]
    else:
      compute += row["read"] * (1 + pallas_plan.reread(row["name"])) + row["written"]
  return compute, msa, hlo.count('custom_call_target="tpu_custom_call"')


_KERNEL_KINDS = {"resident": "resident", "streaming": "two sweeps", None: "XLA"}


def pallas_row(shape, dtype, mesh_, failures: Failures) -> dict:
  """The fwd+bwd of one op row with the Pallas kernel (v5e's VMEM budget) against the XLA programs.

  `bytes accessed` alone cannot compare them: the compiler's cost model does not see into a custom
  call. Each program is also measured by the operand and result bytes of its top-level HLO
  instructions (`_tpu.entry_traffic`) in units of N, split into fusions and kernels (`compute`; for
  the kernel exactly what its block specs copy: each `x` block in once, each `y` block out once; a
  streaming kernel's second sweep reads the uncached chunks again) and
  memory-space assignment's prefetches into VMEM (`msa`).
  """
  n_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  row = {"shape": "x".join(map(str, shape)), "dtype": jnp.dtype(dtype).name, "N_bytes": n_bytes}
  kinds = [
    choose(shape, dtype, dtype, V5E_VMEM_BUDGET)
    for choose in (pallas_plan.forward_kernel, pallas_plan.backward_kernel)
  ]
  row["kernel"] = " + ".join(_KERNEL_KINDS[k] for k in kinds)
  row["fits"] = kinds[0] is not None
  programs = {"normjax Pallas": ("normjax tpu_kernel=True", V5E_VMEM_BUDGET)}
  programs.update({impl: (impl, 0) for impl in PALLAS_IMPLS})
  for name, (impl, budget) in programs.items():
    try:
      fn, args = _op_program(impl, shape, dtype, mesh_)
      with pallas_batch_norm.assume_vmem_budget(budget):
        facts = _tpu.compile_facts(fn, *args)
    except Exception as error:  # pylint: disable=broad-except
      failures.add(
        "compile failed", part="pallas", layer=name, shape=row["shape"], error=_error_line(error)
      )
      continue
    compute, msa, kernels = _hlo_traffic(facts.hlo)
    row[name] = compute / n_bytes
    row[f"{name} msa"] = msa / n_bytes
    row[f"{name} cost model"] = facts.bytes_accessed / n_bytes
    row[f"{name} kernels"] = kernels
  return row


PALLAS_SHAPES = [(OP_BATCH,) + s for s in OP_SHAPES] + [
  (32, 56, 56, 64),
  (32, 32, 32, 128),
  (64, 16, 16, 256),
  (4096, 1024),
]


PALLAS_MODELS = (  # (model, images per chip): data parallel training runs 32 per device
  ("ResNet-18 CIFAR", 32),
  ("ResNet-18 CIFAR", 64),
  ("ResNet-50 ImageNet", 32),
)
PALLAS_MODEL_LABELS = {"normjax Pallas": "normjax tpu_kernel=True", "normjax": "normjax (default)"}
PALLAS_MODEL_PROGRAMS = {
  "normjax Pallas": ("normjax", V5E_VMEM_BUDGET, {"tpu_kernel": True}),
  "normjax": ("normjax", 0),
  "flax": ("flax", 0),
}


def run_pallas(failures: Failures, shapes, dtypes, models=PALLAS_MODELS) -> dict:
  """The op rows, and whole train steps (bfloat16) with and without the kernels (none: op rows only)."""
  mesh_ = _tpu.mesh("v5e:1", BATCH)
  rows = []
  for dtype in dtypes:
    for shape in shapes:
      rows.append(pallas_row(tuple(shape), dtype, mesh_, failures))
      print(tables.row_line(rows[-1]), flush=True)
  check_pallas_rows(rows, failures)
  model_rows = []
  for name, batch in models:
    model_rows += model_bytes_rows(
      mesh_, jnp.bfloat16, [name], failures, batch=batch, programs=PALLAS_MODEL_PROGRAMS
    )
  return {"rows": rows, "models": model_rows} if models else {"rows": rows}


def check_pallas_rows(rows, failures: Failures) -> None:
  """Where the kernel fits, the program runs it and moves no more than flax's and the XLA path's, by
  the cost model and by its fusions and kernels (within `OP_BYTES_SLACK`); where it does not, the
  program is the XLA path's."""
  for row in rows:
    if "normjax Pallas" not in row:
      continue
    pallas, others = row["normjax Pallas"], [row.get("flax", np.inf), row.get("normjax", np.inf)]
    model = row["normjax Pallas cost model"]
    model_others = [row.get("flax cost model", np.inf), row.get("normjax cost model", np.inf)]
    ran = row["normjax Pallas kernels"] >= 1
    if row["fits"]:
      holds = ran and pallas <= min(others) + OP_BYTES_SLACK
      holds = holds and model <= min(model_others) + OP_BYTES_SLACK
    else:  # the XLA path's program
      holds = not ran and model == row.get("normjax cost model")
    failures.check(
      holds,
      "the Pallas kernel runs exactly where it fits, and moves no more than flax's and XLA's",
      part="pallas",
      shape=row["shape"],
      dtype=row["dtype"],
    )


def _model_norms(dtype):
  """The norm factories of the model-level bytes rows (all with BatchNorm dtype=`dtype`)."""
  import normjax.linen as njl  # pylint: disable=g-import-not-at-top
  from benchmarks import _tpu_models as tm  # pylint: disable=g-import-not-at-top

  bn = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
  return {
    "normjax": functools.partial(njl.BatchNorm, **bn),
    'normjax stats_shift="batch"': functools.partial(njl.BatchNorm, stats_shift="batch", **bn),
    'normjax stats_method="fast"': functools.partial(njl.BatchNorm, stats_method="fast", **bn),
    "flax": functools.partial(tm.FlaxBatchNorm, **bn),
    "flax two-pass": functools.partial(tm.FlaxBatchNorm, use_fast_variance=False, **bn),
  }


def _positional(norm):
  """A factory for `benchmarks.model_resnet18` (it calls `norm()(x, training)` positionally)."""
  return lambda: lambda x, training: norm()(x, training=training)


MODEL_BYTES = {  # name -> (builder(norm factory, dtype), image shape, batch)
  "ResNet-18 CIFAR": ("resnet18", (32, 32, 3), 512),
  "ResNet-50 ImageNet": ("resnet50", (224, 224, 3), 128),
}


def model_bytes_rows(
  mesh_, dtype, names, failures: Failures, *, batch=None, programs=None
) -> List[dict]:
  """Bytes accessed of a whole train step (SGD momentum; one chip), each norm in the same model.

  `batch` overrides `MODEL_BYTES`' batch; `programs` maps a row label to `(norm, VMEM budget)` or
  `(norm, VMEM budget, options)`: a norm of `_model_norms` with those extra options (e.g.
  `tpu_kernel=True`), compiled with that Pallas budget (default: every norm, budget 0)."""
  from benchmarks import _tpu_models as tm  # pylint: disable=g-import-not-at-top
  from benchmarks import model_resnet18  # pylint: disable=g-import-not-at-top

  norms = _model_norms(dtype)
  programs = programs or {impl: (impl, 0) for impl in norms}
  rows = []
  for name in names:
    kind, image_shape, default_batch = MODEL_BYTES[name]
    batch = batch or default_batch
    row = {"model": name, "batch": batch, "dtype": jnp.dtype(dtype).name}
    for impl, (norm_name, budget, *extra) in programs.items():
      norm = functools.partial(norms[norm_name], **(extra[0] if extra else {}))
      if kind == "resnet18":
        model = model_resnet18.ResNet18(_positional(norm), dtype=dtype)
      else:
        model = tm.ResNet50(norm=norm, dtype=dtype)
      tx = tm.optimizer()
      try:
        variables = jax.eval_shape(
          lambda k: model.init(k, jnp.zeros((1, *image_shape), dtype), training=False),
          jax.random.key(0),
        )
        params, stats = variables["params"], variables["batch_stats"]
        state = _tpu.abstract((params, stats, jax.eval_shape(tx.init, params)), mesh_)
        images = _tpu.global_batch((batch, *image_shape), dtype, mesh_)
        labels = _tpu.global_batch((batch,), jnp.int32, mesh_)
        step = model_resnet18.make_step(model, tx)
        with pallas_batch_norm.assume_vmem_budget(budget):
          facts, seconds = _timed(lambda: _tpu.compile_facts(step, state, images, labels))
      except Exception as error:  # pylint: disable=broad-except
        failures.add(
          "compile failed", part="bytes", model=name, layer=impl, error=_error_line(error)
        )
        continue
      row[f"{impl} GB"] = facts.bytes_accessed / 1e9
      row[f"{impl} memory GB"] = facts.memory_bytes / 1e9
      compute, msa, kernels = _hlo_traffic(facts.hlo)
      row[f"{impl} compute GB"], row[f"{impl} MSA GB"] = compute / 1e9, msa / 1e9
      row[f"{impl} kernels"] = kernels
      if impl == "normjax":
        layers, norm_bytes = tm.norm_input_bytes(model, image_shape, batch, dtype)
        row.update(norm_layers=layers, norm_N_GB=norm_bytes / 1e9)
      print(f"  {name} {impl}: {facts.bytes_accessed / 1e9:.2f} GB ({seconds:.0f} s)", flush=True)
    rows.append(row)
  return rows


def run_bytes(failures, shapes, dtypes, model_names, msa=True) -> dict:
  """The op rows and the model rows; with `msa=False` (the compiler's memory-space assignment off,
  see `MSA_OFF`) only the model rows, as `models_msa_off`."""
  mesh_ = _tpu.mesh("v5e:1", BATCH)
  if not msa:
    return {"models_msa_off": model_bytes_rows(mesh_, jnp.bfloat16, model_names, failures)}
  ops = []
  for dtype in dtypes:
    for shape in shapes:
      row = op_bytes_row((OP_BATCH,) + tuple(shape), dtype, mesh_, list(OP_IMPLS), failures)
      ops.append(row)
      print(tables.row_line(row), flush=True)
  check_op_bytes(ops, failures)
  model_rows = model_bytes_rows(mesh_, jnp.bfloat16, model_names, failures)
  return {"ops": ops, "models": model_rows}


# ---------------------------------------------------------------------------------------- tables


def _load(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _gib(value):
  return None if value is None else value / 2**30


def _status_counts(group) -> dict:
  status = [r["status"] for r in group]
  return {
    "cells": len(group),
    "ok": status.count("ok"),
    "jax_bug": sum(s.startswith("ok, check_vma=False") for s in status),
    "vma_only": sum(s.startswith("failed with check_vma=True") for s in status),
    "failed": status.count("failed"),
  }


@tables.register("tpu_compile_matrix")
def _matrix_table():
  payload = _load("tpu_compile.json")
  out = []
  for part, what in (("registry", "registry entries × 2 dtypes"), ("models", "train steps")):
    for (slice_name,), group in _group_rows(payload.get(part, []), ("slice",)).items():
      out.append({"slice": slice_name, "what": what, **_status_counts(group)})
  columns = [
    ("slice", "slice", "{}"),
    ("what", "compiled", "{}"),
    ("cells", "cells", "{}"),
    ("ok", "ok", "{}"),
    ("jax_bug", "ok with check_vma=False only (JAX bug)", "{}"),
    ("vma_only", "fail with check_vma=True only", "{}"),
    ("failed", "failed", "{}"),
  ]
  text = tables.markdown(out, columns)
  failed = {}
  for f in payload.get("failures", []):
    key = (
      f.get("layer") or f.get("model"),
      f.get("norm"),
      f.get("modes"),
      f.get("error", "")[:110],
    )
    failed.setdefault(key, []).append((f.get("slice"), f.get("dtype")))
  slices = {s["slice"] for s in payload.get("slices", [])}
  lines = []
  for (layer, norm, modes, error), where in failed.items():
    at = {w[0] for w in where}
    at_text = f"all {len(slices)} slices" if at == slices else ", ".join(sorted(at))
    dtypes = ", ".join(sorted({w[1] for w in where if w[1]}))
    options = f" norm={norm}" if norm else ""
    lines.append(f"- `{layer}`{options} ({modes}; {at_text}; {dtypes}): {error}")
  if lines:
    text += "\n\nFailures:\n\n" + "\n".join(lines)
  return text


@tables.register("tpu_compile_models")
def _models_table():
  rows = [r for r in _load("tpu_compile.json").get("models", []) if r.get("status") == "ok"]
  for r in rows:
    r["memory_GiB"] = _gib(r.get("memory_bytes"))
    r["temp_GiB"] = _gib(r.get("temp_bytes"))
    r["bytes_GB"] = r["bytes_accessed"] / 1e9
  columns = [
    ("slice", "slice", "{}"),
    ("chips", "chips", "{}"),
    ("devices", "devices", "{}"),
    ("model", "model", "{}"),
    ("norm", "norm", "{}"),
    ("per_device_batch", "batch/device", "{}"),
    ("memory_GiB", "memory/device GiB", "{:.3f}"),
    ("temp_GiB", "temp GiB", "{:.3f}"),
    ("bytes_GB", "bytes accessed GB", "{:.2f}"),
    ("all_reduce", "all-reduces", "{}"),
    ("norm_all_reduces", "of them from norms", "{}"),
    ("norm_layers", "norm layers", "{}"),
  ]
  return tables.markdown(rows, columns)


@tables.register("tpu_memory")
def _memory_table():
  payload = _load("tpu_compile.json")
  rows = [
    r
    for r in payload.get("models", [])
    if r.get("status") == "ok"
    and r["model"] == "resnet50"
    and r["slice"] in MEMORY_SLICES + ("v4:2x2x1", "v5e:1")
  ]
  for r in rows:
    r["memory_GiB"] = _gib(r["memory_bytes"])
    r["argument_GiB"] = _gib(r["argument_bytes"])
    r["output_GiB"] = _gib(r["output_bytes"])
    r["temp_GiB"] = _gib(r["temp_bytes"])
  rows.sort(key=lambda r: (r["norm"], r["chips"], r["devices"]))
  columns = [
    ("norm", "norm", "{}"),
    ("slice", "slice", "{}"),
    ("chips", "chips", "{}"),
    ("devices", "devices", "{}"),
    ("per_device_batch", "batch/device", "{}"),
    ("argument_GiB", "argument GiB", "{:.3f}"),
    ("output_GiB", "output GiB", "{:.3f}"),
    ("temp_GiB", "temp GiB", "{:.3f}"),
    ("memory_GiB", "total/device GiB", "{:.4f}"),
  ]
  text = tables.markdown(rows, columns)
  spreads = payload.get("memory_flat", [])
  if spreads:
    text += "\n\n" + tables.markdown(
      spreads,
      [
        ("model", "model", "{}"),
        ("norm", "norm", "{}"),
        ("slices", "slices (4–256 chips)", "{}"),
        ("spread", "max/min − 1", "{:.2e}"),
      ],
    )
  return text


def _bytes_list(values):
  return " + ".join(str(v) for v in values) if values else "—"


def _groups_text(row, prefix):
  counts, sizes = row[f"{prefix}_groups"], row[f"{prefix}_group_sizes"]
  return " / ".join(f"{g} × {n}" for g, n in zip(counts, sizes)) if counts else "—"


def _permutes_text(row):
  fwd, both = row.get("fwd_permutes", 0), row.get("fwd_bwd_permutes", 0)
  if not (fwd or both):
    return "—"
  sizes = sorted(set(row["fwd_permute_bytes"] + row["fwd_bwd_permute_bytes"]))
  inside = row.get("fwd_bwd_permutes_inside_groups")
  where = ", inside the groups" if inside else (", crossing groups" if inside is False else "")
  return f"{fwd} / {both} ({_bytes_list(sizes)}{where})"


_UNSUPPORTED = "flax: lax.pmean(axis_index_groups=) is not implemented under shard_map"


@tables.register("tpu_collectives")
def _collectives_table():
  rows = _load("tpu_collectives.json")["rows"]
  out = []
  for r in rows:
    if r.get("status") != "ok":
      note = _UNSUPPORTED if r.get("status") == "unsupported" else r.get("error", "")[:100]
      out.append({"slice": r["slice"], "layer": r["layer"], "note": f"{r['status']}: {note}"})
      continue
    out.append(
      {
        "slice": r["slice"],
        "devices": r["devices"],
        "layer": r["layer"],
        "fwd": r["fwd_all_reduce"],
        "fwd_b": _bytes_list(r["fwd_bytes"]),
        "both": r["fwd_bwd_all_reduce"],
        "both_b": _bytes_list(r["fwd_bwd_bytes"]),
        "bwd": r["bwd_all_reduce"],
        "groups": _groups_text(r, "fwd"),
        "permutes": _permutes_text(r),
        "other": r["fwd_bwd_other"],
      }
    )
  columns = [
    ("slice", "slice", "{}"),
    ("devices", "devices", "{}"),
    ("layer", "synchronized BatchNorm", "{}"),
    ("fwd", "fwd all-reduces", "{}"),
    ("fwd_b", "fwd payloads (bytes)", "{}"),
    ("both", "fwd+bwd all-reduces", "{}"),
    ("both_b", "fwd+bwd payloads (bytes)", "{}"),
    ("bwd", "added by the bwd", "{}"),
    ("groups", "fwd replica groups (count × size)", "{}"),
    ("permutes", "collective-permutes fwd / fwd+bwd (bytes each)", "{}"),
    ("other", "other collectives", "{}"),
    ("note", "note", "{}"),
  ]
  return tables.markdown(out, columns)


@tables.register("tpu_bytes_ops")
def _bytes_ops_table():
  rows = _load("tpu_bytes.json")["ops"]
  for r in rows:
    if "normjax" in r and "flax" in r:
      r["ratio"] = r["normjax"] / r["flax"]
  columns = [("shape", "shape (NHWC)", "{}"), ("dtype", "dtype", "{}")]
  columns += [(impl, impl, "{:.2f}") for impl in OP_IMPLS]
  columns += [("ratio", "normjax / flax", "{:.3f}")]
  return "bytes accessed in units of N = bytes of x; floors 5N and 8N.\n\n" + tables.markdown(
    rows, columns
  )


@tables.register("tpu_bytes_pallas")
def _bytes_pallas_table():
  rows = [r for r in _load("tpu_pallas.json")["rows"] if "normjax Pallas" in r]
  for r in rows:
    r["kernel"] = r["kernel"] if r["fits"] else "no: XLA path"
    r["/ flax cost model"] = r["normjax Pallas"] / r["flax cost model"]
    r["/ flax fusions"] = r["normjax Pallas"] / r["flax"]
  columns = [
    ("shape", "shape (NHWC)", "{}"),
    ("dtype", "dtype", "{}"),
    ("kernel", "fwd + bwd", "{}"),
  ]
  for impl, label in (("normjax Pallas", "Pallas"), ("normjax", "normjax XLA"), ("flax", "flax")):
    columns += [
      (f"{impl} cost model", f"{label}: cost model", "{:.2f}"),
      (impl, f"{label}: fusions + kernels", "{:.2f}"),
      (f"{impl} msa", f"{label}: MSA prefetches", "{:.2f}"),
    ]
  columns += [
    ("/ flax cost model", "Pallas fusions + kernels / flax cost model", "{:.2f}"),
    ("/ flax fusions", "Pallas / flax fusions + kernels", "{:.2f}"),
  ]
  head = "fwd+bwd on one v5e chip, in units of N = bytes of x; floors 5N and 8N.\n\n"
  return head + tables.markdown(rows, columns)


@tables.register("tpu_bytes_pallas_models")
def _bytes_pallas_models_table():
  out = []
  for r in _load("tpu_pallas.json").get("models", []):
    for impl in PALLAS_MODEL_PROGRAMS:
      if r.get(f"{impl} GB") is None:
        continue
      out.append(
        {
          "model": r["model"],
          "batch": r["batch"],
          "impl": PALLAS_MODEL_LABELS.get(impl, impl),
          "kernels": r.get(f"{impl} kernels"),
          **_versus_flax(r, impl, ""),
          **_traffic_versus_flax(r, impl),
          "memory": r.get(f"{impl} memory GB"),
        }
      )
  columns = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("impl", "BatchNorm", "{}"),
    ("kernels", "Pallas kernels", "{}"),
    ("GB", "cost model GB", "{:.3f}"),
    ("ratio", "cost model / flax", "{:.4f}"),
    ("compute_GB", "fusions + kernels GB", "{:.3f}"),
    ("compute_ratio", "fusions + kernels / flax", "{:.4f}"),
    ("msa_GB", "MSA prefetches GB", "{:.3f}"),
    ("memory", "memory GB", "{:.3f}"),
  ]
  head = "Train step (SGD momentum) on one v5e chip, bfloat16, BatchNorm `dtype=bfloat16`.\n\n"
  return head + tables.markdown(out, columns)


@tables.register("tpu_bytes_models")
def _bytes_models_table():
  data = _load("tpu_bytes.json")
  msa_off = {r["model"]: r for r in data.get("models_msa_off", [])}
  out = []
  for r in data["models"]:
    off = msa_off.get(r["model"], {})
    for impl in _MODEL_IMPLS:
      if r.get(f"{impl} GB") is None:
        continue
      out.append(
        {
          "model": r["model"],
          "batch": r["batch"],
          "dtype": r["dtype"],
          "impl": impl,
          **_versus_flax(r, impl, ""),
          **_versus_flax(off, impl, "off_"),
          **_traffic_versus_flax(r, impl),
          "memory": r.get(f"{impl} memory GB"),
          "N": r.get("norm_N_GB"),
          "layers": r.get("norm_layers"),
        }
      )
  columns = [
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("dtype", "dtype", "{}"),
    ("impl", "BatchNorm", "{}"),
    ("GB", "bytes accessed GB", "{:.3f}"),
    ("ratio", "/ flax", "{:.4f}"),
    ("delta_N", "− flax, in ΣN", "{:+.2f}"),
    ("compute_GB", "fusions + kernels GB", "{:.3f}"),
    ("compute_ratio", "fusions + kernels / flax", "{:.4f}"),
    ("msa_GB", "MSA prefetches GB", "{:.3f}"),
    ("off_GB", "MSA off: GB", "{:.3f}"),
    ("off_ratio", "MSA off: / flax", "{:.4f}"),
    ("memory", "memory GB", "{:.2f}"),
    ("layers", "BN layers", "{}"),
    ("N", "ΣN GB", "{:.2f}"),
  ]
  return tables.markdown(out, columns)


def _versus_flax(row, impl, prefix):
  """`{prefix}GB`, `{prefix}ratio` to flax and `{prefix}delta_N` (per byte of BatchNorm input)."""
  gb, flax_gb, norm_n = row.get(f"{impl} GB"), row.get("flax GB"), row.get("norm_N_GB")
  if gb is None:
    return {}
  return {
    f"{prefix}GB": gb,
    f"{prefix}ratio": gb / flax_gb if flax_gb else None,
    f"{prefix}delta_N": (gb - flax_gb) / norm_n if flax_gb and norm_n else None,
  }


def _traffic_versus_flax(row, impl):
  """The step's operand + result bytes of fusions and kernels (and its ratio to flax's), and of
  memory-space assignment's prefetches (`_hlo_traffic`); empty for rows measured before them."""
  compute, flax_compute = row.get(f"{impl} compute GB"), row.get("flax compute GB")
  if compute is None:
    return {}
  return {
    "compute_GB": compute,
    "compute_ratio": compute / flax_compute if flax_compute else None,
    "msa_GB": row.get(f"{impl} MSA GB"),
  }


_MODEL_IMPLS = (
  "normjax",
  'normjax stats_shift="batch"',
  'normjax stats_method="fast"',
  "flax",
  "flax two-pass",
)


# ------------------------------------------------------------------------------------------ main


def _write(path, payload):
  tmp = f"{path}.tmp"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=float)
  os.replace(tmp, path)
  print(f"wrote {path}", flush=True)


def _machine():
  import platform  # pylint: disable=g-import-not-at-top

  import flax  # pylint: disable=g-import-not-at-top
  import libtpu  # pylint: disable=g-import-not-at-top

  return {
    "host": platform.platform(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "flax": flax.__version__,
    "libtpu": getattr(libtpu, "__version__", "?"),
    "note": "ahead-of-time compilation for TPU on a CPU host: the compiler's figures, not timings",
  }


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ci", action="store_true", help="a subset that finishes in a few minutes")
  p.add_argument(
    "--topologies", default=None, help=f"slices, comma separated (of {list(_tpu.SLICES)})"
  )
  p.add_argument("--parts", default=",".join(PARTS), help=f"of {PARTS}")
  p.add_argument("--out", default=RESULTS, help="directory of the JSON results")
  p.add_argument("--models", default="mnist_cnn,cifar_cnn,resnet18,resnet50")
  p.add_argument(
    "--norms", default="batch_norm,sync_batch_norm,ghost_batch_norm,batch_renorm,group_norm"
  )
  p.add_argument("--per-device-batch", type=int, default=32)
  p.add_argument("--entries", default=None, help="only registry entries whose name contains this")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--resume", action="store_true", help="keep the ok cells of an earlier --out JSON")
  p.add_argument(
    "--pallas-ops-only",
    action="store_true",
    help="with --parts pallas: only the op rows (a few minutes); the train steps' rows are kept",
  )
  p.add_argument(
    "--msa",
    choices=("on", "off"),
    default="on",
    help="off: compile with the TPU compiler's memory-space assignment off (LIBTPU_INIT_ARGS, set "
    "before libtpu loads); with --parts bytes, only the model rows, kept as models_msa_off",
  )
  return p.parse_args(argv)


def _settings(args):
  """The run's selections; --ci narrows them to a subset of a few minutes."""
  slices = args.topologies.split(",") if args.topologies else list(_tpu.SLICES)
  s = dict(
    slices=slices,
    parts=args.parts.split(","),
    models=args.models.split(","),
    norms=args.norms.split(","),
    dtypes=[jnp.dtype(d) for d in args.dtypes.split(",")],
    entries=args.entries,
    op_shapes=OP_SHAPES,
    model_bytes=list(MODEL_BYTES),
  )
  if args.ci:
    s.update(
      slices=args.topologies.split(",") if args.topologies else list(CI_SLICES),
      models=["mnist_cnn"],
      norms=["batch_norm", "sync_batch_norm"],
      entries=args.entries or "batch_norm/axis",
      op_shapes=CI_OP_SHAPES,
      model_bytes=[],
    )
  return s


class Store:
  """One JSON results file: the parts of this run replace the file's, the others are kept; written
  after every row (a long run that stops keeps what it compiled; `--resume` continues it)."""

  def __init__(self, path, machine):
    self.path = path
    self.data = {}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)
    self.data["machine"] = machine

  def done(self, part, keys):
    """{key: row} of the rows of `part` in the file that compiled as asked (what `--resume` keeps;
    a cell that compiled only with check_vma=False is compiled again)."""
    return {
      tuple(r[k] for k in keys): r for r in self.data.get(part, []) if r.get("status") == "ok"
    }

  def put(self, part, value):
    self.data[part] = value
    _write(self.path, self.data)


def _compile_parts(s, args, failures, machine):
  """The registry and models parts into tpu_compile.json."""
  store = Store(os.path.join(args.out, OUT_FILES["registry"]), machine)
  store.data["slices"] = [_tpu.describe(n) for n in s["slices"]]
  if "registry" in s["parts"]:
    done = store.done("registry", ("slice", "entry", "dtype")) if args.resume else {}
    save = functools.partial(store.put, "registry")
    run_registry(s["slices"], s["dtypes"], failures, s["entries"], done, save)
  if "models" in s["parts"]:
    done = store.done("models", ("slice", "model", "norm")) if args.resume else {}
    save = functools.partial(store.put, "models")
    rows = run_models(
      s["slices"], s["models"], s["norms"], args.per_device_batch, failures, done, save
    )
    store.data["memory_flat"] = check_memory_flat(rows, failures)
  ran = [p for p in ("registry", "models") if p in s["parts"]]
  kept = [f for f in store.data.get("failures", []) if f.get("part") not in ran]
  store.put("failures", kept + [f for f in failures.items if f.get("part") in ran])


def main(argv=None):
  args = parse_args(argv)
  if "JAX_PLATFORMS" not in os.environ:  # compile-only: the host's CPU runs the (tiny) inits
    jax.config.update("jax_platforms", "cpu")
  if not _tpu.libtpu_available():
    sys.exit("benchmarks.tpu_compile needs libtpu (pip install -e '.[tpu-aot,equinox]')")
  if args.msa == "off":  # read by libtpu when it loads, at the first topology below
    os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {MSA_OFF}".strip()
  s = _settings(args)
  failures = Failures()
  start = time.perf_counter()
  machine = _machine()
  try:
    if "registry" in s["parts"] or "models" in s["parts"]:
      _compile_parts(s, args, failures, machine)
    if "collectives" in s["parts"]:
      rows = run_collectives(s["slices"], failures)
      Store(os.path.join(args.out, OUT_FILES["collectives"]), machine).put("rows", rows)
    if "bytes" in s["parts"]:
      msa = args.msa == "on"
      result = run_bytes(failures, s["op_shapes"], s["dtypes"], s["model_bytes"], msa=msa)
      store = Store(os.path.join(args.out, OUT_FILES["bytes"]), machine)
      store.data.update(result)
      store.put("failures", [f for f in failures.items if f.get("part") == "bytes"])
    if "pallas" in s["parts"]:
      models = () if args.pallas_ops_only else PALLAS_MODELS
      result = run_pallas(failures, PALLAS_SHAPES, s["dtypes"], models)
      store = Store(os.path.join(args.out, OUT_FILES["pallas"]), machine)
      for key, value in result.items():
        store.put(key, value)
  except Exception:  # pylint: disable=broad-except  (a bug of the suite: reported with the rest)
    failures.add("suite error", error=traceback.format_exc().strip().splitlines()[-1])
  print(f"\n{time.perf_counter() - start:.0f} s; {len(failures.items)} failure(s)")
  for item in failures.items:
    print("  " + tables.row_line(item))
  if failures.items:
    sys.exit(1)


if __name__ == "__main__":
  main()
