"""ResNet-18 (CIFAR variant) train step: normjax.linen.BatchNorm vs flax.linen.BatchNorm, images/s.

The same model code takes a `norm` factory; only the BatchNorm class differs. The train step is SGD with
momentum 0.9 and weight decay through optax, softmax cross-entropy, batch statistics updated, jitted
with donated state. `--dtype bfloat16` computes convolutions and activations in bf16 (parameters and
BatchNorm statistics stay float32). The two models are timed round-robin in the same process on the
same random batches (several rotated); compile and warm-up are excluded; median (and min) of the steps.

Usage:
  python -m benchmarks.model_resnet18                      # CPU default: batch 32, 32x32 images
  python -m benchmarks.model_resnet18 --batch 256 --steps 50 --dtype bfloat16   # GPU-sized
  python -m benchmarks.model_resnet18 --quick
"""

import functools
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import normjax.linen as njl
from benchmarks import _common


class BasicBlock(nn.Module):
  filters: int
  strides: int
  norm: Callable[..., Any]
  dtype: Any

  @nn.compact
  def __call__(self, x, training):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=1)(x)
    y = nn.relu(self.norm()(y, training))
    y = conv(self.filters, (3, 3), padding=1)(y)
    y = self.norm()(y, training)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), (self.strides, self.strides))(x)
      x = self.norm()(x, training)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, stages of 64/128/256/512 filters.

  `stages` (filters per stage of two blocks) is there for smoke tests only: e.g. `(16,)` is a tiny
  network that compiles in seconds on a CPU.
  """

  norm: Callable[..., Any]
  num_classes: int = 10
  dtype: Any = jnp.float32
  stages: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, training: bool):
    x = nn.Conv(self.stages[0], (3, 3), padding=1, use_bias=False, dtype=self.dtype)(
      x.astype(self.dtype)
    )
    x = nn.relu(self.norm()(x, training))
    for i, filters in enumerate(self.stages):
      for j in range(2):
        x = BasicBlock(filters, 2 if (i > 0 and j == 0) else 1, self.norm, self.dtype)(x, training)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


def normjax_norm(dtype=None):
  layer = njl.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  return lambda x, training: layer(x, training=training)


def flax_norm(dtype=None):
  layer = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  return lambda x, training: layer(x, use_running_average=not training)


def make_step(model, tx):
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, training=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]

  def step(state, images, labels):
    params, batch_stats, opt_state = state
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return jax.jit(step, donate_argnums=0)


def synthetic_batches(batch, count, key=0):
  """`count` random (images, labels) pairs: CIFAR-shaped (batch, 32, 32, 3) float32 and int labels."""
  keys = jax.random.split(jax.random.key(key), count)
  images = [jax.random.normal(k, (batch, 32, 32, 3)) for k in keys]
  labels = [jax.random.randint(k, (batch,), 0, 10) for k in keys]
  return images, labels


def optimizer():
  """SGD with momentum 0.9 and weight decay 5e-4 (the step every row times)."""
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def build(dtype, stages=(64, 128, 256, 512)):
  """{"normjax": model, "flax": model}: the same ResNet-18 with either BatchNorm, `dtype` compute."""
  return {
    "normjax": ResNet18(functools.partial(normjax_norm, dtype=dtype), dtype=dtype, stages=stages),
    "flax": ResNet18(functools.partial(flax_norm, dtype=dtype), dtype=dtype, stages=stages),
  }


def init_state(model, tx, images):
  """(params, batch_stats, opt_state) of `model`, initialized by one jitted call.

  On a CPU the initializer is compiled with XLA's backend optimizations off: it runs once, and
  XLA:CPU takes ~8× longer to optimize the random initializers than to run them unoptimized.
  """
  init = jax.jit(functools.partial(model.init, training=False))
  key = jax.random.key(1)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  variables = init.lower(key, images).compile(compiler_options=options)(key, images)
  params, batch_stats = variables["params"], variables["batch_stats"]
  return params, batch_stats, tx.init(params)


def time_train_steps(batch, steps, dtype_name, input_sets=3, stages=(64, 128, 256, 512)):
  """One row: normjax and flax train steps timed round-robin on the same synthetic batches.

  Compilation and one warm-up step per input set are excluded; the row holds the median and minimum
  ms per step, images/s and the last loss of each model, and normjax/flax ratios.
  """
  images, labels = synthetic_batches(batch, input_sets)
  tx = optimizer()
  models = build(jnp.dtype(dtype_name), stages)
  states = {name: init_state(model, tx, images[0]) for name, model in models.items()}
  steps_fn = {name: make_step(model, tx) for name, model in models.items()}
  losses = {}
  # Warm-up/compile: one step per input set (the state is donated, so it threads through).
  for name in models:
    for imgs, labs in zip(images, labels):
      states[name], losses[name] = steps_fn[name](states[name], imgs, labs)
    jax.block_until_ready(states[name])
  times = {name: [] for name in models}
  for i in range(steps):
    imgs, labs = images[i % len(images)], labels[i % len(labels)]
    for name in models:
      start = time.perf_counter()
      states[name], losses[name] = steps_fn[name](states[name], imgs, labs)
      jax.block_until_ready(states[name])
      times[name].append(time.perf_counter() - start)
  row = {"dtype": dtype_name, "batch": batch, "steps": steps}
  for name in models:
    row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    row[f"{name}_min_ms"] = min(times[name]) * 1e3
    row[f"{name}_img_s"] = batch / statistics.median(times[name])
    row[f"{name}_loss"] = float(losses[name])
  row["ratio"] = row["normjax_ms"] / row["flax_ms"]
  row["ratio_min"] = row["normjax_min_ms"] / row["flax_min_ms"]
  return row


COLUMNS = [
  ("dtype", "dtype", "{}"),
  ("batch", "batch", "{}"),
  ("normjax_ms", "normjax ms/step", "{:.1f}"),
  ("flax_ms", "flax ms/step", "{:.1f}"),
  ("normjax_img_s", "normjax img/s", "{:.1f}"),
  ("flax_img_s", "flax img/s", "{:.1f}"),
  ("ratio", "nj/flax", "{:.3f}"),
  ("ratio_min", "nj/flax(min)", "{:.3f}"),
]


def main():
  p = _common.parser("model_resnet18", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8, help="timed steps per model")
  p.add_argument("--dtype", default="float32,bfloat16", help="compute dtypes, comma separated")
  args = _common.parse_args(p)
  batch, steps, dtypes = args.batch, args.repeats or args.steps, args.dtype.split(",")
  if args.quick:
    batch, steps, dtypes = 4, 2, ["float32"]
  rows = []
  for dtype_name in dtypes:
    rows.append(time_train_steps(batch, steps, dtype_name, args.input_sets))
    print(rows[-1], flush=True)
  print()
  _common.print_table(rows, COLUMNS)
  _common.write_json(args.out, {"benchmark": "model_resnet18", "rows": rows})


if __name__ == "__main__":
  main()
