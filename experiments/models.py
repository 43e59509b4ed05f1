"""CNNs that take a `norm` factory: any normjax layer (or none) plugs in, before or after the activation.

A norm factory is a zero-argument callable returning a linen module called as `norm()(x, training=...)`.
`make_norm(config)` builds one from a config; the names are:

| `config.norm` | layer | statistics under data parallelism |
|---|---|---|
| `"batch_norm"` | `normjax.linen.BatchNorm` | per device (each device normalizes with its shard's moments) |
| `"sync_batch_norm"` | `normjax.linen.BatchNorm(axis_name="batch")` | global (exact moments over the global batch) |
| `"ghost_batch_norm"` | `normjax.linen.GhostBatchNorm` | per ghost batch of `config.ghost_batch_size` |
| `"batch_renorm"` | `normjax.linen.BatchRenorm` | per device, renormalized towards the running moments |
| `"group_norm"` | `normjax.linen.GroupNorm(num_groups=config.num_groups)` | per example |
| `"layer_norm"` | `normjax.linen.LayerNorm` | per example |
| `"none"` | identity | — |

Example:
  >>> norm = make_norm(ml_collections.ConfigDict({"norm": "batch_norm", "bn_momentum": 0.9}))
  >>> model = MnistCNN(norm=norm)
  >>> variables = model.init(jax.random.key(0), jnp.ones((2, 28, 28, 1)), training=False)
"""

import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

import normjax
import normjax.linen as njl

NormFactory = Callable[[], nn.Module]
NORMS = (
  "batch_norm",
  "sync_batch_norm",
  "ghost_batch_norm",
  "batch_renorm",
  "group_norm",
  "layer_norm",
  "none",
)
BATCH_AXIS = "batch"  # the mesh / shard_map axis name over data-parallel devices


class Identity(nn.Module):
  """No normalization; accepts and ignores `training`."""

  @nn.compact
  def __call__(self, x, *, training: bool):
    del training
    return x


class _TrainingAgnostic(nn.Module):
  """Adapts a per-example norm whose `__call__` has no `training` argument to the factory protocol."""

  module: Callable[[], nn.Module]

  @nn.compact
  def __call__(self, x, *, training: bool):
    del training
    return self.module()(x)


def _optional_layer(name: str, **kwargs) -> NormFactory:
  layer = getattr(njl, name, None)
  if layer is None:
    raise NotImplementedError(
      f"normjax.linen.{name} is not available in this normjax version; "
      f"choose another config.norm from {NORMS}"
    )
  if "training" in inspect.signature(layer.__call__).parameters:
    return functools.partial(layer, **kwargs)
  return functools.partial(_TrainingAgnostic, module=functools.partial(layer, **kwargs))


def make_norm(config) -> NormFactory:
  """Returns the norm factory named by `config.norm` (see the module docstring), options from `config`.

  Raises:
    ValueError: an unknown name. NotImplementedError: a layer this normjax version does not have yet.
  """
  name = config.norm
  bn = dict(momentum=config.get("bn_momentum", 0.9), epsilon=config.get("bn_epsilon", 1e-5))
  if name == "batch_norm":
    return functools.partial(njl.BatchNorm, **bn)
  if name == "sync_batch_norm":
    return functools.partial(njl.BatchNorm, axis_name=BATCH_AXIS, **bn)
  if name == "ghost_batch_norm":
    return functools.partial(njl.GhostBatchNorm, ghost_batch_size=config.ghost_batch_size, **bn)
  if name == "batch_renorm":
    r_max, d_max = config.get("renorm_r_max", 3.0), config.get("renorm_d_max", 5.0)
    warmup = config.get("renorm_warmup_steps", 0)
    if (
      warmup
    ):  # Ioffe 2017's schedule with its step ratios (5k plain BN, d_max ramp to 25k, r_max to 40k)
      clip = normjax.batch_renorm_paper_schedule(warmup, r_max, 8 * warmup, d_max, 5 * warmup)
      r_max, d_max = clip.r_max, clip.d_max
    return functools.partial(
      njl.BatchRenorm,
      r_max=r_max,
      d_max=d_max,
      ghost_batch_size=config.get("renorm_ghost_batch_size", 0) or None,
      **bn,
    )
  if name == "group_norm":
    return _optional_layer("GroupNorm", num_groups=config.get("num_groups", 8))
  if name == "layer_norm":
    return _optional_layer("LayerNorm")
  if name == "none":
    return Identity
  raise ValueError(f"config.norm={name!r}: expected one of {NORMS}")


class NormAct(nn.Module):
  """Normalization and activation in the order `position` says: "before" (norm → act) or "after" (act → norm)."""

  norm: NormFactory
  act: Callable[[Any], Any] = nn.relu
  position: str = "before"

  @nn.compact
  def __call__(self, x, *, training: bool):
    if self.position == "before":
      return self.act(self.norm()(x, training=training))
    if self.position == "after":
      return self.norm()(self.act(x), training=training)
    raise ValueError(
      f"norm_position={self.position!r}: expected 'before' or 'after' (the activation)"
    )


def _use_bias(norm: NormFactory) -> bool:
  return norm is Identity  # a following norm with a bias makes the conv bias redundant


class MnistCNN(nn.Module):
  """The seeds' MNIST CNN: Conv 32 → BN → Conv 64 → BN → MaxPool → Dense 128 → BN → Dense 10 (ReLUs)."""

  norm: NormFactory
  num_classes: int = 10
  norm_position: str = "before"

  @nn.compact
  def __call__(self, x, *, training: bool):
    na = functools.partial(NormAct, norm=self.norm, position=self.norm_position)
    bias = _use_bias(self.norm) or self.norm_position == "after"
    x = na()(nn.Conv(32, (3, 3), use_bias=bias)(x), training=training)
    x = na()(nn.Conv(64, (3, 3), use_bias=bias)(x), training=training)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = na()(nn.Dense(128, use_bias=bias)(x), training=training)
    return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
  """The seeds' CIFAR-10 CNN: 3 × (Conv 128 3×3 → BN → ReLU → MaxPool 2), Dense 1024 → ReLU, Dense 10.

  The Dense 1024 layer is named "dense_1024" so that a `max_norm` constraint can select its kernel.
  """

  norm: NormFactory
  num_classes: int = 10
  norm_position: str = "before"
  width: int = 128
  hidden: int = 1024

  @nn.compact
  def __call__(self, x, *, training: bool):
    bias = _use_bias(self.norm) or self.norm_position == "after"
    for _ in range(3):
      x = nn.Conv(self.width, (3, 3), use_bias=bias)(x)
      x = NormAct(self.norm, position=self.norm_position)(x, training=training)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="dense_1024")(x))
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3×3 convs with norms, projection shortcut when the shape changes."""

  features: int
  strides: int
  norm: NormFactory
  norm_position: str = "before"
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, x, *, training: bool):
    bias = _use_bias(self.norm)
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), use_bias=bias)(x)
    y = NormAct(self.norm, position=self.norm_position)(y, training=training)
    y = self.conv(self.features, (3, 3), use_bias=bias)(y)
    y = self.norm()(y, training=training)
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), (self.strides, self.strides), use_bias=bias)(x)
      x = self.norm()(x, training=training)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet for 32×32 inputs: ResNet-20 (He et al. 2016, §4.2, widths 16/32/64) or ResNet-18 (64…512)."""

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  norm: NormFactory
  num_classes: int = 10
  norm_position: str = "before"
  weight_standardization: bool = (
    False  # every conv standardizes its kernel (normjax WeightStandardizedConv)
  )

  @nn.compact
  def __call__(self, x, *, training: bool):
    conv = njl.WeightStandardizedConv if self.weight_standardization else nn.Conv
    x = conv(self.widths[0], (3, 3), use_bias=_use_bias(self.norm))(x)
    x = NormAct(self.norm, position=self.norm_position)(x, training=training)
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        x = BasicBlock(width, 2 if i > 0 and j == 0 else 1, self.norm, self.norm_position, conv)(
          x, training=training
        )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64))
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))

MODELS = {"mnist_cnn": MnistCNN, "cifar_cnn": CifarCNN, "resnet20": ResNet20, "resnet18": ResNet18}


def create_model(config, num_classes: int) -> nn.Module:
  """The model `config.model` with the norm factory `make_norm(config)` and `config.norm_position`."""
  if config.model not in MODELS:
    raise ValueError(f"config.model={config.model!r}: expected one of {sorted(MODELS)}")
  kwargs = dict(config.get("model_kwargs", {}) or {})
  if config.get("weight_standardization", False):
    if not issubclass(
      MODELS[config.model].func
      if isinstance(MODELS[config.model], functools.partial)
      else MODELS[config.model],
      ResNet,
    ):
      raise ValueError(
        f"config.weight_standardization=True needs a ResNet model, got config.model={config.model!r}"
      )
    kwargs["weight_standardization"] = True
  return MODELS[config.model](
    norm=make_norm(config),
    num_classes=num_classes,
    norm_position=config.get("norm_position", "before"),
    **kwargs,
  )
