"""The models and the data-parallel train step that `benchmarks.tpu_compile` compiles for TPU slices.

* The experiments' models (`experiments.models`: the seeds' MNIST CNN and CIFAR CNN, ResNet-18 for
  CIFAR) with the experiments' norm factory (`experiments.models.make_norm`), and a bottleneck ResNet-50
  for 224×224 ImageNet-shaped inputs built here from flax convs and the same factory
  (`experiments.models` has ResNet-20 and ResNet-18 only). The ResNet-50 follows flax's
  `examples/imagenet` (He et al. 2016: 7×7 stem, max-pool, stages (3, 4, 6, 3) of 1×1–3×3–1×1
  blocks with stride on the 3×3 conv, zero-initialized last scale of each block).
* `train_step`: the step of `experiments.train._train_step` (value_and_grad of the cross-entropy,
  one `pmean` of gradients, loss and accuracy, the running statistics averaged over devices for the
  per-device norms, an optax update, a fused finiteness flag), written out here because importing
  `experiments.train` needs the experiments' data stack (tensorflow-datasets, grain, matplotlib),
  which a compile-only environment does not have. `tests/test_experiments_tpu_suite_step.py` checks
  on CPU that both steps give the same state and metrics.
* `make_train_step`: `experiments.train.make_steps`' train half, `jax.jit` of `jax.shard_map` over a
  1-D mesh named "batch", parameters replicated, the batch split along axis 0, the state donated.
"""

import dataclasses
import functools
from typing import Any, Callable, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from experiments import models

PER_DEVICE_STATS = ("batch_norm", "ghost_batch_norm", "batch_renorm")  # experiments.train's
NORMS = ("batch_norm", "sync_batch_norm", "ghost_batch_norm", "batch_renorm", "group_norm")


class Config(dict):
  """A dict read as attributes: the part of an `ml_collections.ConfigDict` that `make_norm` uses."""

  __getattr__ = dict.__getitem__


def norm_config(norm: str, ghost_batch_size: int = 8, num_groups: int = 8) -> Config:
  """The experiments' norm options for `models.make_norm` (momentum 0.9, epsilon 1e-5)."""
  return Config(
    norm=norm,
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    ghost_batch_size=ghost_batch_size,
    num_groups=num_groups,
  )


# ------------------------------------------------------------------------------------------ ResNet-50


class Bottleneck(nn.Module):
  """1×1 → 3×3 (stride) → 1×1 (4× features) with norms; projection shortcut when the shape changes."""

  features: int
  strides: int
  norm: models.NormFactory
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, training: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (1, 1))(x)
    y = models.NormAct(self.norm)(y, training=training)
    y = conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = models.NormAct(self.norm)(y, training=training)
    y = conv(4 * self.features, (1, 1))(y)
    y = self.norm()(y, training=training)
    if x.shape != y.shape:
      x = conv(4 * self.features, (1, 1), (self.strides, self.strides))(x)
      x = self.norm()(x, training=training)
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """Bottleneck ResNet-50 for 224×224×3 inputs (53 norm layers), the norm from a factory."""

  norm: models.NormFactory
  num_classes: int = 1000
  dtype: Any = None  # the convolutions' compute dtype (None: promote input and parameters)
  stage_sizes: Tuple[int, ...] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x, *, training: bool):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nn.Conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, dtype=self.dtype)(x)
    x = models.NormAct(self.norm)(x, training=training)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(64 * 2**i, strides, self.norm, self.dtype)(x, training=training)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


# --------------------------------------------------------------------------------------- model specs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model of the compile matrix: `build(norm_factory)`, its input shape and classes."""

  build: Callable[[models.NormFactory], nn.Module]
  image_shape: Tuple[int, int, int]
  num_classes: int


MODELS = {
  "mnist_cnn": ModelSpec(lambda norm: models.MnistCNN(norm=norm), (28, 28, 1), 10),
  "cifar_cnn": ModelSpec(lambda norm: models.CifarCNN(norm=norm), (32, 32, 3), 10),
  "resnet18": ModelSpec(lambda norm: models.ResNet18(norm=norm), (32, 32, 3), 10),
  "resnet50": ModelSpec(lambda norm: ResNet50(norm=norm), (224, 224, 3), 1000),
}


def build_model(name: str, norm: str, per_device_batch: int) -> nn.Module:
  """Model `name` with the experiments' norm `norm` (ghost batches of a quarter of the device batch)."""
  ghost = max(2, per_device_batch // 4)
  return MODELS[name].build(models.make_norm(norm_config(norm, ghost_batch_size=ghost)))


class FlaxBatchNorm(nn.Module):
  """`flax.linen.BatchNorm` in the norm-factory protocol (`norm()(x, training=...)`)."""

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  use_fast_variance: bool = True
  axis_name: Any = None

  @nn.compact
  def __call__(self, x, *, training: bool):
    return nn.BatchNorm(
      use_running_average=not training,
      momentum=self.momentum,
      epsilon=self.epsilon,
      dtype=self.dtype,
      use_fast_variance=self.use_fast_variance,
      axis_name=self.axis_name,
    )(x)


# ---------------------------------------------------------------------------------------- train step


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]: number of optimizer updates applied
  params: Any
  batch_stats: Any
  opt_state: Any


def optimizer() -> optax.GradientTransformation:
  """The experiments' "sgd" optimizer: weight decay 5e-4 on kernels, SGD with momentum 0.9."""
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(
    optax.add_decayed_weights(5e-4, mask=kernels), optax.sgd(0.1, momentum=0.9, nesterov=False)
  )


def _cross_entropy(logits, labels):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return losses.mean(), correct.mean()


def is_finite(tree) -> jax.Array:
  """bool[]: the float32 squared norm of `tree`'s floats is finite (experiments.train.is_finite)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def train_step(state: TrainState, batch, *, model, tx, config):
  """One step on this device's shard (inside shard_map over "batch"): `experiments.train._train_step`."""

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


def make_train_step(model, tx, config, mesh):
  """`jax.jit(jax.shard_map(train_step))` over `mesh`, as `experiments.train.make_steps` builds it."""
  step = jax.shard_map(
    functools.partial(train_step, model=model, tx=tx, config=config),
    mesh=mesh,
    in_specs=(P(), P(models.BATCH_AXIS)),
    out_specs=(P(), P()),
    check_vma=False,
  )
  return jax.jit(step, donate_argnums=0)


def abstract_state(model, tx, image_shape) -> TrainState:
  """The `TrainState` of `model` as `jax.ShapeDtypeStruct`s (no parameter is materialized)."""

  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), training=False)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
    )

  return jax.eval_shape(init, jax.random.key(0))


def norm_input_bytes(model, image_shape, batch: int, dtype=jnp.float32) -> Tuple[int, int]:
  """(number of norm layers, total bytes of their inputs) of one training forward at `batch`.

  Counted by tracing the model with every `nn.BatchNorm`-like call intercepted (`nn.intercept_methods`),
  so nothing runs.
  """
  seen = []

  def record(next_fun, args, kwargs, context):
    name = type(context.module).__name__
    if context.method_name == "__call__" and name in ("BatchNorm", "GroupNorm", "BatchRenorm"):
      x = args[0]
      if not any(s[0] is context.module for s in seen):
        seen.append((context.module, int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize))
    return next_fun(*args, **kwargs)

  def trace(key):
    x = jnp.zeros((batch, *image_shape), dtype)
    with nn.intercept_methods(record):
      return model.init_with_output(key, x, training=True)

  jax.eval_shape(trace, jax.random.key(0))
  return len(seen), sum(b for _, b in seen)
