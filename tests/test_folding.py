"""Conv-BN folding: a folded model equals the unfolded eval-mode model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.linen as njl


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


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, training):
    x = nn.relu(njl.BatchNorm()(nn.Conv(4, (3, 3), use_bias=False)(x), training=training))
    x = nn.relu(
      njl.FrozenBatchNorm(use_scale=False)(nn.Conv(6, (3, 3), strides=2)(x), training=training)
    )
    x = nn.Dense(5)(x.mean((1, 2)))
    return njl.BatchNorm(epsilon=1e-3)(x, training=training)


class NotFoldable(nn.Module):
  @nn.compact
  def __call__(self, x, *, training):
    return njl.BatchNorm()(nn.relu(nn.Dense(3)(x)), training=training)


def ref_fold(kernel, bias, scale, beta, mean, var, eps):
  """float64: W' = W γ/sqrt(σ²+ε), b' = (b − μ) γ/sqrt(σ²+ε) + β."""
  f = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
  return np.asarray(kernel, np.float64) * f, (np.asarray(bias, np.float64) - mean) * f + beta


def test_single_pair_matches_reference_and_layer_outputs():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(4), jnp.float32)
  bn_params = {
    "scale": jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
  }
  state = normjax.BatchNormState(
    jnp.asarray(rng.standard_normal(4), jnp.float32),
    jnp.asarray(rng.uniform(0.1, 3, 4), jnp.float32),
    jnp.asarray(0),
  )
  k, b = normjax.fold_batch_norm(kernel, bias, bn_params, state, epsilon=1e-5)
  want_k, want_b = ref_fold(
    kernel, bias, bn_params["scale"], bn_params["bias"], state.mean, state.var, 1e-5
  )
  np.testing.assert_allclose(k, want_k, rtol=1e-6)
  np.testing.assert_allclose(b, want_b, rtol=1e-6, atol=1e-6)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32)
  conv_y = nn.Conv(4, (3, 3)).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  bn = normjax.batch_norm()
  want, _ = bn.apply(bn_params, state, conv_y, training=False)
  got = nn.Conv(4, (3, 3)).apply({"params": {"kernel": k, "bias": b}}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  k0, b0 = normjax.fold_batch_norm(kernel, None, {}, {"mean": state.mean, "var": state.var})
  want_k, want_b = ref_fold(kernel, np.zeros(4), 1.0, 0.0, state.mean, state.var, 1e-5)
  np.testing.assert_allclose(k0, want_k, rtol=1e-6)
  np.testing.assert_allclose(b0, want_b, rtol=1e-6, atol=1e-6)


def test_whole_model_folds_to_an_equivalent_model_without_batch_norm():
  model = Net()
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8, 2)), jnp.float32)
  variables = _random_variables(model, x)
  apply_fn, folded = normjax.linen.fold_batch_norm_model(model, variables, x, training=False)
  assert set(folded["params"]) == {"Conv_0", "Conv_1", "Dense_0"}
  assert all(not v for v in folded["batch_stats"].values()) if "batch_stats" in folded else True
  assert set(folded["params"]["Conv_0"]) == {"kernel", "bias"}
  want = jax.jit(lambda v, x: model.apply(v, x, training=False))(variables, x)
  got = jax.jit(lambda v, x: apply_fn(v, x, training=False))(folded, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # The folded variables hold no BatchNorm: running the original model on them fails.
  with pytest.raises(Exception):
    model.apply(folded, x, training=False)


def test_bad_input_raises():
  x = jnp.ones((2, 4))
  model = NotFoldable()
  variables = _random_variables(model, x)
  with pytest.raises(
    ValueError, match="BatchNorm at 'BatchNorm_0' does not directly follow a Conv or Dense"
  ):
    normjax.linen.fold_batch_norm_model(model, variables, x, training=False)
  net = Net()
  xi = jnp.ones((1, 4, 4, 2))
  net_vars = _random_variables(net, xi)
  with pytest.raises(ValueError, match="called in training mode"):
    normjax.linen.fold_batch_norm_model(net, net_vars, xi, training=True)
  state = normjax.BatchNormState(jnp.zeros(3), jnp.ones(3), jnp.asarray(0))
  with pytest.raises(ValueError, match=r"BatchNorm mean has shape \(3,\); folding needs \(4,\)"):
    normjax.fold_batch_norm(jnp.ones((2, 4)), None, {}, state)
  with pytest.raises(ValueError, match="epsilon=0"):
    normjax.fold_batch_norm(jnp.ones((2, 3)), None, {}, state, epsilon=0)
