"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Data parallelism. All devices of all processes form a 1-D mesh with axis `"batch"`. The train step is
`jax.jit` of a `jax.shard_map` over that mesh: parameters and optimizer state are replicated
(`NamedSharding(mesh, P())`), each batch is split along its first dimension (`P("batch")`) and each process
feeds only its own rows (`jax.make_array_from_process_local_data`). Inside the shard_map each device runs the
model on its shard; gradients and metrics are averaged with one `pmean` over `"batch"`.

Batch statistics are chosen by the config's norm, never by the parallelism:

* `"sync_batch_norm"` gives the layers `axis_name="batch"`: moments are exact over the global batch
  (normjax combines per-device counts, means and M2s), so the result does not depend on the device count.
* `"batch_norm"` (and ghost / renorm) normalizes each device's shard with that shard's moments, as
  PyTorch DDP without SyncBN does. The running statistics are then averaged over devices at every step
  (a `pmean`, equal to the EMA of the per-device moments' mean), so they stay replicated.

(Under a plain `jit` over a sharded global batch, without shard_map, XLA would make every BatchNorm global;
the explicit shard_map makes the per-device choice possible and the synchronized one explicit.)

Fault tolerance (see experiments/README.md, "Runs that never lose work"):

* Orbax checkpoints every `config.checkpoint_every` steps and at the end, written to a temporary directory
  and renamed when complete; a restarted run restores the latest one and, since batch `i` is a function of
  `(seed, i)`, continues exactly as an uninterrupted run would.
* Only finite states are saved: the jitted step also returns one fused `isfinite` flag over the new
  parameters, optimizer state, batch statistics and loss, and the flags are checked before every save. On a
  non-finite one the run stops with `FloatingPointError`, naming the last (finite) checkpoint and the command
  that continues from it with a lower learning rate (`config.restore_from`, in a fresh work directory).
* The config is checked before any work, and a work directory resumes only with a config equal to its saved
  one in every key that changes the run (`config_checks`). A finished run rerun returns its final metrics.
"""

import dataclasses
import functools
import json
import os
import platform
import re
import shlex
import time
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import normjax
import normjax.linen as njl
from experiments import config_checks
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import models
from experiments import probes as probes_lib

PER_DEVICE_STATS = ("batch_norm", "ghost_batch_norm", "batch_renorm")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]: number of optimizer updates applied
  params: Any
  batch_stats: Any
  opt_state: Any


def make_mesh() -> Mesh:
  """A 1-D mesh named "batch" over every device of every process."""
  return Mesh(np.array(jax.devices()), (models.BATCH_AXIS,))


def create_learning_rate(config, total_steps: int) -> optax.Schedule:
  """`config.schedule`: "constant", "cosine" or "warmup_cosine" (warmup `config.warmup_steps`)."""
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
    )
  raise ValueError(
    f"config.schedule={config.schedule!r}: expected 'constant', 'cosine' or 'warmup_cosine'"
  )


def _max_norm_constraint(config) -> optax.GradientTransformation:
  constraint = getattr(normjax, "max_norm", None)
  if constraint is None:
    raise NotImplementedError(
      f"config.max_norm={config.max_norm} needs normjax.max_norm, which this normjax "
      "version does not have yet; set config.max_norm=None"
    )

  def dense_1024_kernel(path, leaf):  # the seeds' constraint: the Dense 1024 kernel only
    names = [getattr(k, "key", None) for k in path]
    return "dense_1024" in names and names[-1] == "kernel" and leaf.ndim == 2

  return constraint(config.max_norm, where=dense_1024_kernel)


def create_optimizer(
  config, total_steps: int
) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optimizer` ("sgd" with `config.momentum`, "adam", "adamw"), weight decay on kernels, max-norm."""
  schedule = create_learning_rate(config, total_steps)
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  parts = []
  if config.optimizer == "sgd":
    if config.get("weight_decay", 0.0):
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=kernels))
    parts.append(
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.get("nesterov", False))
    )
  elif config.optimizer == "adam":
    parts.append(optax.adam(schedule))
  elif config.optimizer == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=config.get("weight_decay", 0.0), mask=kernels))
  else:
    raise ValueError(f"config.optimizer={config.optimizer!r}: expected 'sgd', 'adam' or 'adamw'")
  if config.get("max_norm"):
    parts.append(_max_norm_constraint(config))
  return optax.chain(*parts), schedule


def _cross_entropy(logits, labels, mask=None):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if mask is None:
    return losses.mean(), correct.mean()
  return (losses * mask).sum(), (correct * mask).sum()


def _train_step(state: TrainState, batch, *, model, tx, config):
  """One step on this device's shard (runs inside shard_map over "batch")."""

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = model.apply(variables, batch["image"], training=True, mutable=["batch_stats"])
    loss, accuracy = _cross_entropy(logits, batch["label"])
    return loss, (accuracy, updates.get("batch_stats", {}))

  (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), models.BATCH_AXIS)
  if config.norm in PER_DEVICE_STATS:  # per-device moments: keep the running statistics replicated
    floats = jax.tree.map(lambda v: jnp.issubdtype(v.dtype, jnp.floating), batch_stats)
    averaged = jax.lax.pmean(
      jax.tree.map(lambda v, f: v if f else jnp.zeros(()), batch_stats, floats), models.BATCH_AXIS
    )
    batch_stats = jax.tree.map(lambda v, a, f: a if f else v, batch_stats, averaged, floats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, {"loss": loss, "accuracy": accuracy, "finite": is_finite((new_state, loss))}


def is_finite(tree) -> jax.Array:
  """bool[]: the float32 squared norm of `tree`'s floats is finite, i.e. no NaN or Inf and no value whose
  square overflows (|x| > 1.8e19: one step from Inf, e.g. in a running variance, which squares activations).

  One fused reduction, computed inside the jitted step: checking the whole train state costs no transfer
  (only this flag reaches the host, with the loss).
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _eval_step(state: TrainState, batch, *, model):
  """Sums of loss, correct predictions and examples on this shard, with running statistics."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = model.apply(variables, batch["image"], training=False)
  loss, correct = _cross_entropy(logits, batch["label"], batch["mask"])
  return jax.lax.psum(
    {"loss": loss, "correct": correct, "count": batch["mask"].sum()}, models.BATCH_AXIS
  )


def make_steps(model, tx, config, mesh):
  """Jitted, data-parallel `train_step(state, batch)` and `eval_step(state, batch)`."""
  data, replicated = P(models.BATCH_AXIS), P()
  train = jax.shard_map(
    functools.partial(_train_step, model=model, tx=tx, config=config),
    mesh=mesh,
    in_specs=(replicated, data),
    out_specs=(replicated, replicated),
    check_vma=False,
  )
  evaluate = jax.shard_map(
    functools.partial(_eval_step, model=model),
    mesh=mesh,
    in_specs=(replicated, data),
    out_specs=replicated,
    check_vma=False,
  )
  return jax.jit(train, donate_argnums=0), jax.jit(evaluate)


def create_train_state(config, model, tx, info, mesh) -> TrainState:
  """Initializes parameters from `config.seed`, directly replicated over the mesh."""

  def init(key):
    x = jnp.zeros((1, *info.image_shape), jnp.float32)
    variables = model.init(key, x, training=False)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
    )

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(config.seed))


def to_host(tree):
  """Replicated global arrays → NumPy (works when not every device is addressable, i.e. multi-host)."""
  return jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree
  )


def _global_batch(batch: Dict[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def evaluate(eval_step, state, test_source, config, sharding) -> Dict[str, float]:
  """Loss and accuracy over the whole test split (exact: padded examples are masked out)."""
  totals = None
  for batch in input_pipeline.eval_batches(test_source, config):
    sums = eval_step(state, _global_batch(batch, sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = to_host(totals)
  return {
    "eval_loss": float(totals["loss"] / totals["count"]),
    "eval_accuracy": float(totals["correct"] / totals["count"]),
  }


@functools.lru_cache(maxsize=8)
def _recalibration_apply_fn(model, mesh, synchronized: bool):
  """The same function object for a (model, mesh) pair, so recalibration compiles once per run
  (`recalibrate_batch_stats` caches its jitted step by the function's identity)."""
  if not synchronized:
    return model.apply

  def apply_fn(variables, x, *, training, mutable):
    f = jax.shard_map(
      lambda v, x: model.apply(v, x, training=training, mutable=mutable),
      mesh=mesh,
      in_specs=(P(), P(models.BATCH_AXIS)),
      out_specs=(P(models.BATCH_AXIS), P()),
      check_vma=False,
    )
    return f(variables, x)

  return apply_fn


def recalibrate(state: TrainState, model, train_source, config, mesh) -> TrainState:
  """Replaces the running statistics by population statistics (precise BN) of `config.recalibrate_steps`
  training batches, with `normjax.linen.recalibrate_batch_stats`; parameters are unchanged.

  The moments are those of the global batches whatever the norm: a "sync_batch_norm" model runs under
  shard_map (its layers reduce over "batch"), the others under plain `jit` of the sharded global batch,
  where XLA makes the statistics global.
  """
  if not state.batch_stats:
    return state
  apply_fn = _recalibration_apply_fn(model, mesh, config.norm == "sync_batch_norm")
  sharding = NamedSharding(mesh, P(models.BATCH_AXIS))
  batches = input_pipeline.train_batches(train_source, config, total_steps=config.recalibrate_steps)
  images = [_global_batch({"image": b["image"]}, sharding)["image"] for b in batches]
  variables = njl.recalibrate_batch_stats(
    apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, images
  )
  return state.replace(batch_stats=variables["batch_stats"])


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  # cleanup_tmp_directories: a save killed before its atomic rename leaves `<step>.orbax-checkpoint-tmp`,
  # never a half-written `<step>`; the next run deletes the leftover.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints,
    create=True,
    enable_async_checkpointing=config.async_checkpointing,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
  )


def checkpoint_steps(workdir: str):
  """The finalized checkpoint steps in `workdir/checkpoints`, ascending (no Orbax call)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _write_json(path: str, value) -> None:
  """Writes JSON atomically: a kill leaves the old file or the new one, never a truncated one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def check_workdir(config, workdir: str) -> None:
  """Refuses to resume `workdir` with a config that differs from its saved one in a key that changes the run.

  A work directory has progress if it holds a checkpoint or `final_metrics.json`; one without progress is
  simply (re)started. See `config_checks.RESUMABLE_KEYS` for the keys that may change.
  """
  saved_path = os.path.join(workdir, "config.json")
  steps = checkpoint_steps(workdir)
  progress = steps or os.path.exists(os.path.join(workdir, "final_metrics.json"))
  if progress and os.path.exists(saved_path):
    config_checks.check_resume(
      _read_json(saved_path),
      json.loads(config.to_json_best_effort()),
      workdir,
      steps[-1] if steps else None,
    )


def _save_run_info(workdir: str, config, info) -> None:
  _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  _write_json(
    os.path.join(workdir, "run.json"),
    {
      "seed": config.seed,
      "dataset": info.__dict__,
      "devices": jax.device_count(),
      "local_devices": jax.local_device_count(),
      "processes": jax.process_count(),
      "platform": jax.default_backend(),
      "machine": f"{platform.machine()} {platform.processor()}".strip(),
      "jax": jax.__version__,
      "normjax": normjax.__version__,
    },
  )


def _restore_checkpoint(
  manager: ocp.CheckpointManager, step: int, target: TrainState
) -> TrainState:
  """Restores checkpoint `step` onto `target`'s structure and shardings; refuses a non-finite one."""
  where = os.path.join(str(manager.directory), str(step))
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0][:300]
    raise config_checks.ConfigError(
      f"{where}: this checkpoint does not fit the model, norm and optimizer this config builds ({first}); "
      "restore it with the config it was saved with (its work directory's config.json)"
    ) from None
  if not bool(to_host(jax.jit(is_finite)(state))):
    raise FloatingPointError(
      f"{where}: the checkpoint holds NaN, Inf or values whose square overflows float32; "
      "restore an earlier step with "
      "a fresh --workdir and --config.restore_from=<workdir>:<step>"
    )
  return state


def restore_or_init(config, workdir: str, manager, state: TrainState) -> Tuple[TrainState, int]:
  """The latest checkpoint of `workdir`; else, in a new work directory, `config.restore_from`; else `state`."""
  if manager is not None and manager.latest_step() is not None:
    state = _restore_checkpoint(manager, manager.latest_step(), state)
  elif config.restore_from:
    source, step = config_checks.parse_restore_from(config.restore_from)
    available = checkpoint_steps(source)
    if step not in available:
      raise FileNotFoundError(
        f"config.restore_from={config.restore_from!r}: no checkpoint {step} in "
        f"{os.path.join(source, 'checkpoints')}; expected one of the steps {available}"
      )
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(
      os.path.abspath(os.path.join(source, "checkpoints")), options=options
    ) as other:
      state = _restore_checkpoint(other, step, state)
  return state, int(to_host(state.step))


def _restart_advice(config, workdir: str, good: Optional[Tuple[str, int]]) -> str:
  """The exact command that continues a diverged run with half the learning rate in a fresh work directory."""
  lr = f"{config.learning_rate / 2:g}"
  base = re.sub(
    r"_from_\d+_lr[^/]*$", "", os.path.normpath(workdir)
  )  # no suffix chains on repeated advice
  fresh = f"{base}_from_{good[1] if good else 0}_lr{lr}"
  restore = f" --config.restore_from={shlex.quote(f'{good[0]}:{good[1]}')}" if good else ""
  return (
    f"python -m experiments.main --config experiments/configs/from_workdir.py:{shlex.quote(workdir)}"
    f"{restore} --config.learning_rate={lr} --workdir {shlex.quote(fresh)}"
  )


def restart_step(workdir: str, steps) -> Tuple[int, str]:
  """The checkpoint a diverged run should continue from, among its kept `steps` (ascending), and why.

  The latest one, unless the training loss logged at it (train.csv) is more than twice the lowest loss logged
  up to it: a checkpoint saved while the loss was already rising holds a state (and momentum) on its way to
  Inf, from which a lower learning rate rarely recovers. Then the latest kept one saved before the rise.
  """
  path = os.path.join(workdir, "train.csv")
  losses = (
    {int(r["step"]): float(r["loss"]) for r in metrics_lib.read_csv(path)}
    if os.path.exists(path)
    else {}
  )
  calm = [
    s for s in steps if s in losses and losses[s] <= 2 * min(v for t, v in losses.items() if t <= s)
  ]
  if not calm or calm[-1] == steps[-1]:
    return steps[-1], ""
  last = steps[-1]
  return calm[-1], (
    f" The training loss logged there ({losses.get(last, float('nan')):.4g}) is more than twice "
    f"the lowest before it, so the command restores step {calm[-1]}, the latest kept checkpoint "
    "saved before the loss rose."
  )


def divergence_error(
  config, workdir: str, step: int, loss: float, good: Optional[Tuple[str, int]]
) -> FloatingPointError:
  """The error a non-finite loss or state raises: what happened, the last finite checkpoint
  (`(workdir, step)`, None if there is none), and the command that continues from it."""
  what = (
    f"the training loss is {loss}"
    if not np.isfinite(loss)
    else f"the parameters, optimizer state or batch statistics hold NaN, Inf or values whose square overflows "
    f"float32 (loss {loss:.4g})"
  )
  if good is not None:
    why = ""
    if good[0] == workdir:
      restart, why = restart_step(workdir, checkpoint_steps(workdir))
    kept = (
      f"Every saved checkpoint is finite; the last is step {good[1]} in "
      f"{os.path.join(good[0], 'checkpoints')}. Rerunning the same command resumes from step {good[1]} and "
      f"diverges again at step {step} (batches depend on the step only).{why} To continue from step "
      f"{restart if why else good[1]} with half the learning rate, in a fresh work directory, run:"
    )
    good = (good[0], restart) if why else good
  else:
    kept = (
      "No checkpoint was saved before it (checkpoints are saved only while everything is finite). To "
      "start again with half the learning rate, in a fresh work directory, run:"
    )
  return FloatingPointError(
    f"training diverged at step {step}: {what}; stopped. {kept}\n\n  {_restart_advice(config, workdir, good)}"
    "\n\nIf it diverges again, lower the learning rate further (the same advice is printed) or check the "
    "data and the normalization settings."
  )


def _completed_result(workdir: str, total_steps: int) -> Optional[Dict[str, float]]:
  """The saved final metrics of a run that already reached `total_steps`, or None."""
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    return None
  result = _read_json(path)
  return (
    result
    if result.get("steps") == total_steps and np.isfinite(result.get("train_loss", np.nan))
    else None
  )


def _last_logged_train(workdir: str, step: int) -> Dict[str, float]:
  """The `train.csv` row of `step` (the last logging window of a finished run), or {}."""
  path = os.path.join(workdir, "train.csv")
  rows = metrics_lib.read_csv(path) if os.path.exists(path) else []
  row = next((r for r in rows if int(r["step"]) == step), None)
  return {"loss": float(row["loss"]), "accuracy": float(row["accuracy"])} if row else {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains `config.model` on `config.dataset`, checkpointing into and logging to `workdir`.

  The config is checked before any work (`config_checks.check_config`). A work directory with progress
  resumes from its latest checkpoint, if its saved config agrees in every key that changes the run
  (`check_workdir`); a finished one returns its saved final metrics and writes nothing. A new work
  directory starts from `config.restore_from` ("<workdir>:<step>") if set.

  Returns:
    Final metrics: `train_loss`, `train_accuracy` (the last logging window), `eval_loss`, `eval_accuracy`,
    `steps`, `time_s` (wall time of this call, compilation and evaluation included).

  Raises:
    config_checks.ConfigError: an invalid config, or one that differs from the work directory's run.
    FloatingPointError: the loss or the train state (parameters, optimizer state, batch statistics) became
      NaN or Inf; the message names the last checkpoint (all saved checkpoints are finite) and the
      command that continues from it with a lower learning rate.
  """
  return train_and_evaluate_with_state(config, workdir)[1]


def train_and_evaluate_with_state(
  config: ml_collections.ConfigDict, workdir: str
) -> Tuple[TrainState, Dict[str, float]]:
  """`train_and_evaluate` that also returns the final (replicated, global) `TrainState`."""
  t0 = time.time()
  lead = jax.process_index() == 0
  config_checks.check_config(config, device_count=jax.device_count())
  check_workdir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  train_source, test_source, info = input_pipeline.get_datasets(config)
  total_steps = input_pipeline.num_steps(config, info)
  config_checks.check_total_steps(config, total_steps, info.num_train)
  mesh = make_mesh()
  model = models.create_model(config, info.num_classes)
  tx, schedule = create_optimizer(config, total_steps)
  manager = _checkpoint_manager(workdir, config) if config.checkpoint_every >= 0 else None
  state, start_step = restore_or_init(
    config, workdir, manager, create_train_state(config, model, tx, info, mesh)
  )
  if start_step > total_steps:
    raise config_checks.ConfigError(
      f"{workdir} holds a checkpoint at step {start_step}, beyond the {total_steps} steps of this config "
      f"(num_steps={config.num_steps}, num_epochs={config.num_epochs}); raise them to extend the run, or "
      "use another --workdir"
    )
  done = _completed_result(workdir, total_steps) if start_step == total_steps else None
  if done is not None:
    if lead:
      print(
        f"{workdir}: the run is complete ({total_steps} steps); final metrics from final_metrics.json",
        flush=True,
      )
    return state, done
  if lead:
    _save_run_info(workdir, config, info)
  train_step, eval_step = make_steps(model, tx, config, mesh)
  run = _Run(
    config,
    workdir,
    model,
    schedule,
    mesh,
    NamedSharding(mesh, P(models.BATCH_AXIS)),
    train_source,
    test_source,
    train_step,
    eval_step,
    manager,
    total_steps,
    metrics_lib.MetricWriter(workdir, start_step=start_step, enabled=lead),
    config_checks.parse_restore_from(config.restore_from)
    if not checkpoint_steps(workdir)
    else None,
  )
  state, last_train, last_eval = _train_loop(run, state, start_step)
  return state, _finish(run, state, last_train, last_eval, t0)


@dataclasses.dataclass
class _Run:
  """What the training loop and the final evaluation share."""

  config: Any
  workdir: str
  model: Any
  schedule: optax.Schedule
  mesh: Mesh
  data_sharding: NamedSharding
  train_source: Any
  test_source: Any
  train_step: Any
  eval_step: Any
  manager: Optional[ocp.CheckpointManager]
  total_steps: int
  writer: metrics_lib.MetricWriter
  origin: Optional[
    Tuple[str, int]
  ]  # the (workdir, step) of `config.restore_from` if this run started there


def _log_window(run: _Run, pending, step: int, bar) -> Dict[str, float]:
  """Fetches the pending step metrics; stops on a non-finite loss or state, else logs their mean."""
  values = to_host(pending)
  bad = [i for i, v in enumerate(values) if not bool(v["finite"])]
  if bad:
    if run.manager is not None:
      run.manager.wait_until_finished()  # an async save of the last finite state completes first
    own = run.manager.latest_step() if run.manager is not None else None
    good = (
      (run.workdir, own) if own is not None else run.origin
    )  # origin: the checkpoint it started from
    bar.close()
    run.writer.close()
    raise divergence_error(
      run.config, run.workdir, step - len(values) + 1 + bad[0], float(values[bad[0]]["loss"]), good
    )
  window = {
    "loss": float(np.mean([v["loss"] for v in values])),
    "accuracy": float(np.mean([v["accuracy"] for v in values])),
    "learning_rate": float(run.schedule(step - 1)),
  }
  run.writer.write("train", step, window)
  bar.set_postfix(loss=f"{window['loss']:.4f}", acc=f"{window['accuracy']:.3f}")
  return window


def _train_loop(run: _Run, state: TrainState, start_step: int):
  """Steps `start_step + 1 … total_steps`: logs, evaluates, probes and saves (finite states only)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  config, lead = run.config, jax.process_index() == 0
  bar = tqdm(
    total=run.total_steps,
    initial=start_step,
    desc=os.path.basename(os.path.normpath(run.workdir)),
    disable=not (lead and config.progress_bar),
    dynamic_ncols=True,
    leave=False,
  )
  batches = input_pipeline.prefetch(
    input_pipeline.train_batches(
      run.train_source, config, start_step=start_step, total_steps=run.total_steps
    ),
    config.prefetch,
  )
  pending, last_train, last_eval = [], {}, {}
  probe = probes_lib.make_probe(config, run.model, run.test_source)
  probe_every = config.probe_every or config.eval_every or run.total_steps
  if probe is not None and start_step == 0:
    run.writer.write("activations", 0, probe(state))
  for step in range(start_step + 1, run.total_steps + 1):
    state, step_metrics = run.train_step(state, _global_batch(next(batches), run.data_sharding))
    pending.append(step_metrics)
    bar.update(1)
    last = step == run.total_steps
    save = run.manager is not None and (
      last or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
    )
    if last or save or step % config.log_every == 0:  # before a save: only finite states are saved
      last_train, pending = _log_window(run, pending, step, bar), []
    if probe is not None and (last or step % probe_every == 0):
      run.writer.write("activations", step, probe(state))
    if last or (config.eval_every > 0 and step % config.eval_every == 0):
      last_eval = _evaluate_and_log(
        run, state, step, recalibrated=not last and config.recalibrate_at_every_eval
      )
    if save:
      run.manager.save(step, args=ocp.args.StandardSave(state))
  bar.close()
  if run.manager is not None:
    run.manager.wait_until_finished()
    run.manager.close()
  return state, last_train, last_eval


def _evaluate_and_log(
  run: _Run, state: TrainState, step: int, *, recalibrated: bool
) -> Dict[str, float]:
  """Evaluates with the running statistics (and, if asked, after recalibration); logs both."""
  result = evaluate(run.eval_step, state, run.test_source, run.config, run.data_sharding)
  run.writer.write("eval", step, result)
  if recalibrated and run.config.recalibrate_steps > 0:
    other = recalibrate(state, run.model, run.train_source, run.config, run.mesh)
    run.writer.write(
      "recalibrated",
      step,
      evaluate(run.eval_step, other, run.test_source, run.config, run.data_sharding),
    )
  return result


def _finish(run: _Run, state: TrainState, last_train, last_eval, t0: float) -> Dict[str, float]:
  """Final evaluation (and recalibration), curves and `final_metrics.json`; returns the final metrics."""
  config, lead = run.config, jax.process_index() == 0
  if not last_eval:  # resumed at the final step: evaluate the restored state
    last_eval = evaluate(run.eval_step, state, run.test_source, config, run.data_sharding)
    last_train = last_train or _last_logged_train(run.workdir, run.total_steps)
  if config.recalibrate_steps > 0 and state.batch_stats:
    recalibrated = recalibrate(state, run.model, run.train_source, config, run.mesh)
    after = evaluate(run.eval_step, recalibrated, run.test_source, config, run.data_sharding)
    run.writer.write("recalibrated", run.total_steps, after)
    last_eval = {**last_eval, **{f"{k}_recalibrated": v for k, v in after.items()}}
  run.writer.close()
  if lead:
    metrics_lib.plot_runs(
      {config.get("name", "run"): run.workdir},
      os.path.join(run.workdir, "curves.png"),
      title=f"{config.model} / {config.norm} on {config.dataset}",
    )
  result = {
    "train_loss": last_train.get("loss", float("nan")),
    "train_accuracy": last_train.get("accuracy", float("nan")),
    **last_eval,
    "steps": run.total_steps,
    "time_s": time.time() - t0,
  }
  if lead:
    _write_json(os.path.join(run.workdir, "final_metrics.json"), result)
  return result
