"""Precise-BN / AdaBN recalibration against float64 references computed on the same batches."""

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import normjax
import normjax.linen as njl

EPS = 1e-5


def _random_variables(model, x, seed=1):
  """Variables of `model` with random values (no init compilation): kernels, biases and means normal,
  scales and variances in [0.5, 1.5], integer counts zero."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, training=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return jnp.zeros(s.shape, s.dtype)
    if path[-1].key in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class ConvBN(nn.Module):
  ghost: int = 0

  @nn.compact
  def __call__(self, x, *, training):
    x = nn.Conv(4, (3, 3))(x)
    bn = njl.GhostBatchNorm(ghost_batch_size=self.ghost) if self.ghost else njl.BatchNorm()
    return bn(x, training=training)


class Net(nn.Module):
  """Conv → BN → relu → Conv → BN → relu → spatial mean → Dense → BN."""

  @nn.compact
  def __call__(self, x, *, training):
    x = nn.relu(njl.BatchNorm(momentum=0.9)(nn.Conv(4, (3, 3))(x), training=training))
    x = nn.relu(
      njl.BatchNorm(momentum=0.9)(nn.Conv(3, (3, 3), use_bias=False)(x), training=training)
    )
    x = nn.Dense(5)(x.mean((1, 2)))
    return njl.BatchNorm(momentum=0.9, use_scale=False)(x, training=training)


def _batches(sizes, seed=0, shape=(4, 4, 2)):
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray(rng.standard_normal((n,) + shape) * (1 + k) + k, jnp.float32)
    for k, n in enumerate(sizes)
  ]


# ---- float64 references ---------------------------------------------------------------------------


def ref_conv_same(x, kernel, bias=None):
  """Stride-1 'SAME' 2-D convolution (cross-correlation, flax's layout) in float64."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(xp[:, i : i + h, j : j + w, :] @ kernel[i, j] for i in range(kh) for j in range(kw))
  return out if bias is None else out + np.asarray(bias, np.float64)


def ref_bn_train(x, scale, bias):
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias


def ref_net_layer_inputs(params, x):
  """The inputs of Net's three BatchNorms on one batch, training mode, float64."""
  p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params)
  z1 = ref_conv_same(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
  a1 = np.maximum(ref_bn_train(z1, p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]), 0)
  z2 = ref_conv_same(a1, p["Conv_1"]["kernel"])
  a2 = np.maximum(ref_bn_train(z2, p["BatchNorm_1"]["scale"], p["BatchNorm_1"]["bias"]), 0)
  z3 = a2.mean((1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  return {"BatchNorm_0": z1, "BatchNorm_1": z2, "BatchNorm_2": z3}


def _population(arrays):
  """Mean and biased variance of the concatenation, per feature (last axis), float64."""
  flat = np.concatenate([np.asarray(a, np.float64).reshape(-1, a.shape[-1]) for a in arrays])
  return flat.mean(0), flat.var(0)


# ---- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ghost", [0, 4])
def test_single_layer_equals_statistics_of_concatenation(ghost):
  model = ConvBN(ghost=ghost)
  batches = _batches([8, 16, 8])
  variables = _random_variables(model, batches[0])
  new = normjax.linen.recalibrate_batch_stats(model.apply, variables, batches)
  conv = variables["params"]["Conv_0"]
  outs = [ref_conv_same(b, conv["kernel"], conv["bias"]) for b in batches]
  mean, var = _population(outs)
  stats = new["batch_stats"]["GhostBatchNorm_0" if ghost else "BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-5)
  assert stats["mean"].dtype == jnp.float32
  old = variables["batch_stats"]["GhostBatchNorm_0" if ghost else "BatchNorm_0"]
  np.testing.assert_array_equal(stats["count"], old["count"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new["params"], variables["params"])


def _net_reference(variables, batches):
  per_layer = [ref_net_layer_inputs(variables["params"], b) for b in batches]
  return {name: _population([d[name] for d in per_layer]) for name in per_layer[0]}


def _check_net(new, want, rtol=1e-4, atol=1e-5):
  for name, (mean, var) in want.items():
    np.testing.assert_allclose(
      new["batch_stats"][name]["mean"], mean, rtol=rtol, atol=atol, err_msg=name
    )
    np.testing.assert_allclose(
      new["batch_stats"][name]["var"], var, rtol=rtol, atol=atol, err_msg=name
    )


def test_multi_layer_equals_layer_by_layer_float64_reference():
  model = Net()
  batches = _batches([8, 24, 16], seed=3)
  variables = _random_variables(model, batches[0])
  new = normjax.linen.recalibrate_batch_stats(model.apply, variables, batches)
  _check_net(new, _net_reference(variables, batches))


@pytest.mark.parametrize("jit", [True, False])
def test_unbiased_storage(jit):
  """σ² N / (N − 1), N the total count per feature."""
  batches = _batches([4, 6], shape=(3,))
  variables = _random_variables(_APPLY_MODEL, batches[0])
  new = normjax.linen.recalibrate_batch_stats(_APPLY, variables, batches, unbiased=True, jit=jit)
  flat = np.concatenate([np.asarray(b, np.float64) for b in batches])
  np.testing.assert_allclose(new["batch_stats"]["var"], flat.var(0, ddof=1), rtol=1e-5)


def test_batches_sharded_over_eight_devices():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  model = Net()
  batches = _batches([8, 16, 8], seed=4)
  variables = _random_variables(model, batches[0])
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  sharded = [jax.device_put(b, NamedSharding(mesh, P("batch"))) for b in batches]
  assert len(sharded[1].sharding.device_set) == 8
  new = normjax.linen.recalibrate_batch_stats(model.apply, replicated, sharded)
  _check_net(new, _net_reference(variables, batches))


def test_adabn_recalibrates_on_a_new_domain():
  model = ConvBN()
  source, target = _batches([8, 8], seed=5), [b * 3.0 - 2.0 for b in _batches([8, 8], seed=6)]
  variables = _random_variables(model, source[0])
  adapted = normjax.linen.recalibrate_batch_stats(model.apply, variables, target)
  y = model.apply(adapted, jnp.concatenate(target), training=False)
  bn = variables["params"]["BatchNorm_0"]  # eval output on the target data: mean β, std |γ|
  np.testing.assert_allclose(np.asarray(y, np.float64).mean((0, 1, 2)), bn["bias"], atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(y, np.float64).std((0, 1, 2)), np.abs(bn["scale"]), rtol=1e-3
  )


def test_bad_input_raises():
  model = ConvBN()
  x = _batches([8])[0]
  variables = _random_variables(model, x)
  with pytest.raises(ValueError, match="batches is empty"):
    normjax.linen.recalibrate_batch_stats(model.apply, variables, [])
  with pytest.raises(ValueError, match="batches is empty"):
    normjax.linen.recalibrate_batch_stats(model.apply, variables, iter(()))
  dense = nn.Dense(3)
  dense_vars = {"params": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match="no BatchNorm layer reported"):
    normjax.linen.recalibrate_batch_stats(
      lambda v, b, training, mutable: dense.apply(v, b, mutable=mutable), dense_vars, [x]
    )


@hypothesis.given(
  sizes=st.lists(st.sampled_from([3, 8]), min_size=1, max_size=4), seed=st.integers(0, 99)
)
def test_property_merge_order_free_and_equal_to_concatenation(sizes, seed):
  """A bare BatchNorm (the identity before it): result = moments of the concatenated data."""
  rng = np.random.default_rng(seed)
  batches = [
    jnp.asarray(rng.standard_normal((n, 3)) * 5 + 10 * rng.standard_normal(), jnp.float32)
    for n in sizes
  ]
  variables = _random_variables(_APPLY_MODEL, batches[0])
  new = normjax.linen.recalibrate_batch_stats(_APPLY, variables, batches)
  mean, var = _population(batches)
  np.testing.assert_allclose(new["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(new["batch_stats"]["var"], var, rtol=1e-4, atol=1e-4)


_APPLY_MODEL = njl.BatchNorm()
_APPLY = _APPLY_MODEL.apply
