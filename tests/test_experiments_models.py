"""experiments.models: every model with every available norm factory, before and after the activation."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest

import normjax.linen as njl
from experiments import models


def _config(norm, **kw):
  return ml_collections.ConfigDict(
    {"norm": norm, "bn_momentum": 0.9, "ghost_batch_size": 4, "num_groups": 4, **kw}
  )


def _available(norm):
  return {"group_norm": hasattr(njl, "GroupNorm"), "layer_norm": hasattr(njl, "LayerNorm")}.get(
    norm, True
  )


@pytest.mark.parametrize("norm", [n for n in models.NORMS if n != "sync_batch_norm"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_mnist_cnn_with_each_norm(norm, position):
  if not _available(norm):
    with pytest.raises(NotImplementedError, match="not available in this normjax version"):
      models.make_norm(_config(norm))
    pytest.skip(f"{norm}: normjax.linen does not have it yet")
  model = models.MnistCNN(norm=models.make_norm(_config(norm)), norm_position=position)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  variables = jax.jit(functools.partial(model.init, training=False))(jax.random.key(1), x)
  logits, updates = jax.jit(functools.partial(model.apply, training=True, mutable=["batch_stats"]))(
    variables, x
  )
  assert logits.shape == (8, 10)
  has_stats = norm in ("batch_norm", "ghost_batch_norm", "batch_renorm")
  assert bool(updates.get("batch_stats")) == has_stats
  if has_stats:  # three norm layers, statistics updated by a training call
    assert len(variables["batch_stats"]) == 3
    changed = jax.tree.map(
      lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert any(jax.tree.leaves(changed))


def test_sync_batch_norm_is_global_under_shard_map():
  """sync_batch_norm inside shard_map over 8 devices equals batch_norm on the whole batch on one device."""
  mesh = jax.sharding.Mesh(jax.devices()[:8], ("batch",))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1)) * 3 + 1
  sync = models.MnistCNN(norm=models.make_norm(_config("sync_batch_norm")))
  plain = models.MnistCNN(norm=models.make_norm(_config("batch_norm")))
  variables = jax.jit(functools.partial(plain.init, training=False))(jax.random.key(1), x)
  expected, _ = jax.jit(functools.partial(plain.apply, training=True, mutable=["batch_stats"]))(
    variables, x
  )
  P = jax.sharding.PartitionSpec
  f = jax.shard_map(
    lambda v, x: sync.apply(v, x, training=True, mutable=["batch_stats"])[0],
    mesh=mesh,
    in_specs=(P(), P("batch")),
    out_specs=P("batch"),
    check_vma=False,
  )
  per_device = jax.shard_map(
    lambda v, x: plain.apply(v, x, training=True, mutable=["batch_stats"])[0],
    mesh=mesh,
    in_specs=(P(), P("batch")),
    out_specs=P("batch"),
    check_vma=False,
  )
  assert jnp.allclose(jax.jit(f)(variables, x), expected, atol=1e-4)
  assert not jnp.allclose(jax.jit(per_device)(variables, x), expected, atol=1e-3)


@pytest.mark.parametrize(
  "name,shape", [("cifar_cnn", (2, 32, 32, 3)), ("resnet20", (2, 32, 32, 3))]
)
def test_cifar_models(name, shape):
  config = _config(
    "batch_norm", model=name, model_kwargs={"width": 8, "hidden": 16} if name == "cifar_cnn" else {}
  )
  model = models.create_model(config, num_classes=10)
  variables = jax.eval_shape(
    functools.partial(model.init, training=False), jax.random.key(0), jnp.zeros(shape)
  )
  assert jax.eval_shape(
    functools.partial(model.apply, training=False), variables, jnp.zeros(shape)
  ).shape == (2, 10)
  if name == "cifar_cnn":
    assert variables["params"]["dense_1024"]["kernel"].shape == (4 * 4 * 8, 16)


def test_resnet_sizes():
  x = jnp.zeros((1, 32, 32, 3))
  counts = {}
  for name in ("resnet20", "resnet18"):
    model = models.create_model(_config("batch_norm", model=name), num_classes=10)
    params = jax.eval_shape(functools.partial(model.init, training=False), jax.random.key(0), x)[
      "params"
    ]
    counts[name] = sum(p.size for p in jax.tree.leaves(params))
  assert 0.26e6 < counts["resnet20"] < 0.28e6  # He et al. 2016: 0.27M
  assert 11.1e6 < counts["resnet18"] < 11.3e6


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="config.norm='batchnorm'"):
    models.make_norm(_config("batchnorm"))
  with pytest.raises(ValueError, match="norm_position='middle'"):
    model = models.MnistCNN(norm=models.Identity, norm_position="middle")
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), training=False)
