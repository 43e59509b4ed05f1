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
from typing import Any, Callable


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
  """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, stages of 64/128/256/512 filters."""

  norm: Callable[..., Any]
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, training: bool):
    x = nn.Conv(64, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
    x = nn.relu(self.norm()(x, training))
    for i, filters in enumerate((64, 128, 256, 512)):
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


def main():
  p = _common.parser("model_resnet18", __doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=8, help="timed steps per model")
  p.add_argument("--dtype", default="float32,bfloat16", help="compute dtypes, comma separated")
  args = p.parse_args()
  batch, steps, dtypes = args.batch, args.repeats or args.steps, args.dtype.split(",")
  if args.quick:
    batch, steps, dtypes = 4, 2, ["float32"]
  key = jax.random.key(0)
  images = [
    jax.random.normal(k, (batch, 32, 32, 3)) for k in jax.random.split(key, args.input_sets)
  ]
  labels = [jax.random.randint(k, (batch,), 0, 10) for k in jax.random.split(key, args.input_sets)]
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  rows = []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    models = {
      "normjax": ResNet18(functools.partial(normjax_norm, dtype=dtype), dtype=dtype),
      "flax": ResNet18(functools.partial(flax_norm, dtype=dtype), dtype=dtype),
    }
    states, steps_fn, losses = {}, {}, {}
    for name, model in models.items():
      variables = model.init(jax.random.key(1), images[0], training=False)
      params, batch_stats = variables["params"], variables["batch_stats"]
      states[name] = (params, batch_stats, tx.init(params))
      steps_fn[name] = make_step(model, tx)
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
    rows.append(row)
    print(row, flush=True)
  print()
  _common.print_table(
    rows,
    [
      ("dtype", "dtype", "{}"),
      ("batch", "batch", "{}"),
      ("normjax_ms", "normjax ms/step", "{:.1f}"),
      ("flax_ms", "flax ms/step", "{:.1f}"),
      ("normjax_img_s", "normjax img/s", "{:.1f}"),
      ("flax_img_s", "flax img/s", "{:.1f}"),
      ("ratio", "nj/flax", "{:.3f}"),
      ("ratio_min", "nj/flax(min)", "{:.3f}"),
    ],
  )
  _common.write_json(args.out, {"benchmark": "model_resnet18", "rows": rows})


if __name__ == "__main__":
  main()
