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

Fault tolerance: Orbax checkpoints every `config.checkpoint_every` steps and at the end; a restarted run
restores the latest one and, since batch `i` is a function of `(seed, i)`, continues exactly as an
uninterrupted run would. A non-finite loss raises `FloatingPointError` before any later checkpoint is
written, so the last good checkpoint is kept.
"""

import functools
import json
import os
import platform
import time
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import normjax
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
    return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1))
  raise ValueError(f"config.schedule={config.schedule!r}: expected 'constant', 'cosine' or 'warmup_cosine'")


def _max_norm_constraint(config) -> optax.GradientTransformation:
  constraint = getattr(normjax, "max_norm", None)
  if constraint is None:
    raise NotImplementedError(f"config.max_norm={config.max_norm} needs normjax.max_norm, which this normjax "
                              "version does not have yet; set config.max_norm=None")
  def dense_1024_kernel(path, leaf):  # the seeds' constraint: the Dense 1024 kernel only
    names = [getattr(k, "key", None) for k in path]
    return "dense_1024" in names and names[-1] == "kernel" and leaf.ndim == 2

  return constraint(config.max_norm, where=dense_1024_kernel)


def create_optimizer(config, total_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optimizer` ("sgd" with `config.momentum`, "adam", "adamw"), weight decay on kernels, max-norm."""
  schedule = create_learning_rate(config, total_steps)
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  parts = []
  if config.optimizer == "sgd":
    if config.get("weight_decay", 0.0):
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=kernels))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.get("nesterov", False)))
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
    averaged = jax.lax.pmean(jax.tree.map(lambda v, f: v if f else jnp.zeros(()), batch_stats, floats),
                             models.BATCH_AXIS)
    batch_stats = jax.tree.map(lambda v, a, f: a if f else v, batch_stats, averaged, floats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"loss": loss, "accuracy": accuracy}


def _eval_step(state: TrainState, batch, *, model):
  """Sums of loss, correct predictions and examples on this shard, with running statistics."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = model.apply(variables, batch["image"], training=False)
  loss, correct = _cross_entropy(logits, batch["label"], batch["mask"])
  return jax.lax.psum({"loss": loss, "correct": correct, "count": batch["mask"].sum()}, models.BATCH_AXIS)


def make_steps(model, tx, config, mesh):
  """Jitted, data-parallel `train_step(state, batch)` and `eval_step(state, batch)`."""
  data, replicated = P(models.BATCH_AXIS), P()
  train = jax.shard_map(functools.partial(_train_step, model=model, tx=tx, config=config), mesh=mesh,
                        in_specs=(replicated, data), out_specs=(replicated, replicated), check_vma=False)
  evaluate = jax.shard_map(functools.partial(_eval_step, model=model), mesh=mesh,
                           in_specs=(replicated, data), out_specs=replicated, check_vma=False)
  return jax.jit(train, donate_argnums=0), jax.jit(evaluate)


def create_train_state(config, model, tx, info, mesh) -> TrainState:
  """Initializes parameters from `config.seed`, directly replicated over the mesh."""

  def init(key):
    x = jnp.zeros((1, *info.image_shape), jnp.float32)
    variables = model.init(key, x, training=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(config.seed))


def to_host(tree):
  """Replicated global arrays → NumPy (works when not every device is addressable, i.e. multi-host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def _global_batch(batch: Dict[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def evaluate(eval_step, state, test_source, config, sharding) -> Dict[str, float]:
  """Loss and accuracy over the whole test split (exact: padded examples are masked out)."""
  totals = None
  for batch in input_pipeline.eval_batches(test_source, config):
    sums = eval_step(state, _global_batch(batch, sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = to_host(totals)
  return {"eval_loss": float(totals["loss"] / totals["count"]),
          "eval_accuracy": float(totals["correct"] / totals["count"])}


def recalibrate(state: TrainState, model, train_source, config, mesh) -> TrainState:
  """Replaces the running statistics by population statistics (precise BN) of `config.recalibrate_steps`
  training batches, with `normjax.recalibrate_batch_stats`; parameters are unchanged.

  The moments are those of the global batches whatever the norm: a "sync_batch_norm" model runs under
  shard_map (its layers reduce over "batch"), the others under plain `jit` of the sharded global batch,
  where XLA makes the statistics global.

  Raises:
    NotImplementedError: this normjax version has no `recalibrate_batch_stats`.
  """
  recalibrate_fn = getattr(normjax, "recalibrate_batch_stats", None)
  if recalibrate_fn is None:
    raise NotImplementedError("config.recalibrate_steps > 0 needs normjax.recalibrate_batch_stats, which this "
                              "normjax version does not have")
  if not state.batch_stats:
    return state
  apply_fn = model.apply
  if config.norm == "sync_batch_norm":
    def apply_fn(variables, x, *, training, mutable):
      f = jax.shard_map(lambda v, x: model.apply(v, x, training=training, mutable=mutable), mesh=mesh,
                        in_specs=(P(), P(models.BATCH_AXIS)), out_specs=(P(models.BATCH_AXIS), P()),
                        check_vma=False)
      return f(variables, x)
  sharding = NamedSharding(mesh, P(models.BATCH_AXIS))
  batches = input_pipeline.train_batches(train_source, config, total_steps=config.recalibrate_steps)
  images = [_global_batch({"image": b["image"]}, sharding)["image"] for b in batches]
  variables = recalibrate_fn(apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, images)
  return state.replace(batch_stats=variables["batch_stats"])


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.get("keep_checkpoints", 2), create=True,
                                         enable_async_checkpointing=config.get("async_checkpointing", True))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _save_run_info(workdir: str, config, info) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  run = {"seed": config.seed, "dataset": info.__dict__, "devices": jax.device_count(),
         "local_devices": jax.local_device_count(), "processes": jax.process_count(),
         "platform": jax.default_backend(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
         "jax": jax.__version__, "normjax": normjax.__version__}
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump(run, f, indent=2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains `config.model` on `config.dataset`, checkpointing into and logging to `workdir`.

  Resumes from the latest checkpoint in `workdir/checkpoints` if there is one.

  Returns:
    Final metrics: `train_loss`, `train_accuracy` (the last logging window), `eval_loss`, `eval_accuracy`,
    `steps`, `time_s` (wall time of this call, compilation and evaluation included).

  Raises:
    FloatingPointError: the training loss became NaN or Inf (the last good checkpoint is kept).
  """
  return train_and_evaluate_with_state(config, workdir)[1]


def train_and_evaluate_with_state(config: ml_collections.ConfigDict,
                                  workdir: str) -> Tuple[TrainState, Dict[str, float]]:
  """`train_and_evaluate` that also returns the final (replicated, global) `TrainState`."""
  t0 = time.time()
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  train_source, test_source, info = input_pipeline.get_datasets(config)
  total_steps = input_pipeline.num_steps(config, info)
  if config.batch_size % jax.device_count() or config.eval_batch_size % jax.device_count():
    raise ValueError(f"batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be "
                     f"divisible by the {jax.device_count()} devices")
  mesh = make_mesh()
  data_sharding = NamedSharding(mesh, P(models.BATCH_AXIS))
  model = models.create_model(config, info.num_classes)
  tx, schedule = create_optimizer(config, total_steps)
  state = create_train_state(config, model, tx, info, mesh)
  train_step, eval_step = make_steps(model, tx, config, mesh)

  manager = _checkpoint_manager(workdir, config) if config.checkpoint_every >= 0 else None
  start_step = 0
  if manager is not None and manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    start_step = int(to_host(state.step))
  if lead:
    _save_run_info(workdir, config, info)
  writer = metrics_lib.MetricWriter(workdir, start_step=start_step, enabled=lead)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total_steps, initial=start_step, desc=os.path.basename(os.path.normpath(workdir)),
             disable=not (lead and config.get("progress_bar", True)), dynamic_ncols=True, leave=False)
  batches = input_pipeline.prefetch(
      input_pipeline.train_batches(train_source, config, start_step=start_step, total_steps=total_steps),
      config.get("prefetch", 2))
  pending, last_train, last_eval = [], {}, {}
  probe = probes_lib.make_probe(config, model, test_source)
  probe_every = config.get("probe_every", 0) or config.eval_every or total_steps
  if probe is not None and start_step == 0:
    writer.write("activations", 0, probe(state))

  def flush(step):  # fetch the pending metrics, stop on a non-finite loss, log their mean
    nonlocal pending, last_train
    if not pending:
      return
    values = to_host(pending)
    pending = []
    losses = np.array([v["loss"] for v in values])
    if not np.all(np.isfinite(losses)):
      bad = step - len(values) + 1 + int(np.argmin(np.isfinite(losses)))
      if manager is not None:
        manager.wait_until_finished()
      good = manager.latest_step() if manager is not None else None
      bar.close()
      writer.close()
      raise FloatingPointError(
          f"training loss is {losses[~np.isfinite(losses)][0]} at step {bad}: stopping. The last good "
          f"checkpoint (step {good}) is kept in {os.path.join(workdir, 'checkpoints')}; lower the learning rate "
          "or check the data and normalization settings")
    last_train = {"loss": float(losses.mean()), "accuracy": float(np.mean([v["accuracy"] for v in values])),
                  "learning_rate": float(schedule(step - 1))}
    writer.write("train", step, last_train)
    bar.set_postfix(loss=f"{last_train['loss']:.4f}", acc=f"{last_train['accuracy']:.3f}")

  for step in range(start_step + 1, total_steps + 1):
    state, step_metrics = train_step(state, _global_batch(next(batches), data_sharding))
    pending.append(step_metrics)
    bar.update(1)
    last = step == total_steps
    checkpoint = manager is not None and (last or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0))
    if last or checkpoint or step % config.log_every == 0:
      flush(step)
    if probe is not None and (last or step % probe_every == 0):
      writer.write("activations", step, probe(state))
    if last or (config.eval_every > 0 and step % config.eval_every == 0):
      last_eval = evaluate(eval_step, state, test_source, config, data_sharding)  # running statistics
      writer.write("eval", step, last_eval)
      if not last and config.get("recalibrate_at_every_eval") and config.get("recalibrate_steps", 0) > 0:
        recalibrated = recalibrate(state, model, train_source, config, mesh)
        writer.write("recalibrated", step, evaluate(eval_step, recalibrated, test_source, config, data_sharding))
    if checkpoint:
      manager.save(step, args=ocp.args.StandardSave(state))
  bar.close()
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if not last_eval:  # resumed after the final step: evaluate the restored state
    last_eval = evaluate(eval_step, state, test_source, config, data_sharding)
  if config.get("recalibrate_steps", 0) > 0 and state.batch_stats:
    recalibrated = recalibrate(state, model, train_source, config, mesh)
    after = evaluate(eval_step, recalibrated, test_source, config, data_sharding)
    writer.write("recalibrated", total_steps, after)
    last_eval.update({f"{k}_recalibrated": v for k, v in after.items()})
  writer.close()
  if lead:
    metrics_lib.plot_runs({config.get("name", "run"): workdir}, os.path.join(workdir, "curves.png"),
                          title=f"{config.model} / {config.norm} on {config.dataset}")
  result = {"train_loss": last_train.get("loss", float("nan")),
            "train_accuracy": last_train.get("accuracy", float("nan")),
            **last_eval, "steps": total_steps, "time_s": time.time() - t0}
  if lead:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return state, result

