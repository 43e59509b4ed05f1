"""Frozen BatchNorm: running statistics used and never updated, affine optionally trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.linen as njl


def _setup(shape=(4, 3, 3, 5), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
  c = shape[-1]
  params = {
    "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
  }
  state = normjax.BatchNormState(
    jnp.asarray(rng.normal(size=c), jnp.float32),
    jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
    jnp.asarray(7, jnp.int32),
  )
  return x, params, state


def ref_frozen(x, params, state, eps=1e-5):
  """Ioffe & Szegedy 2015, Alg. 2 (inference): y = γ (x − E[x]) / sqrt(Var[x] + ε) + β."""
  x = np.asarray(x, np.float64)
  mean, var = (np.asarray(v, np.float64) for v in (state.mean, state.var))
  return np.asarray(params["scale"]) * (x - mean) / np.sqrt(var + eps) + np.asarray(params["bias"])


@pytest.mark.parametrize("training", [True, False])
def test_uses_running_statistics_and_never_updates(training):
  x, params, state = _setup()
  fbn = normjax.frozen_batch_norm()
  y, new_state = jax.jit(lambda p, s, x: fbn.apply(p, s, x, training=training))(params, state, x)
  np.testing.assert_allclose(y, ref_frozen(x, params, state), rtol=1e-5, atol=1e-5)
  for a, b in zip(new_state, state):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("trainable", [True, False])
def test_gradients(trainable):
  x, params, state = _setup()
  fbn = normjax.frozen_batch_norm(trainable_affine=trainable)
  dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

  def loss(p, mean, var, x):
    return jnp.sum(fbn.apply(p, state._replace(mean=mean, var=var), x, training=True)[0] * dy)

  dparams, dmean, dvar, dx = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
    params, state.mean, state.var, x
  )
  inv = 1 / np.sqrt(np.asarray(state.var, np.float64) + 1e-5)
  np.testing.assert_allclose(dx, dy * np.asarray(params["scale"]) * inv, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(dmean, 0.0)
  np.testing.assert_array_equal(dvar, 0.0)
  if trainable:
    xhat = (np.asarray(x, np.float64) - np.asarray(state.mean)) * inv
    np.testing.assert_allclose(dparams["scale"], (dy * xhat).sum((0, 1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], dy.sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
  else:
    np.testing.assert_array_equal(dparams["scale"], 0.0)
    np.testing.assert_array_equal(dparams["bias"], 0.0)


def test_linen_loads_batch_norm_variables_and_matches_its_eval_output():
  x, _, _ = _setup()
  bn = njl.BatchNorm(momentum=0.5)
  variables = bn.init(jax.random.key(0), x, training=False)
  _, updates = bn.apply(variables, x, training=True, mutable=["batch_stats"])
  variables = {**variables, **updates}
  frozen = njl.FrozenBatchNorm()
  assert jax.tree_util.tree_structure(
    frozen.init(jax.random.key(0), x, training=True)
  ) == jax.tree_util.tree_structure(variables)
  y, mutated = frozen.apply(variables, x, training=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, bn.apply(variables, x, training=False), rtol=1e-6, atol=1e-6)
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, mutated["batch_stats"], variables["batch_stats"]
  )


def test_bad_input_raises():
  x, params, state = _setup()
  with pytest.raises(ValueError, match="epsilon=0"):
    normjax.frozen_batch_norm(epsilon=0)
  with pytest.raises(ValueError, match="state.mean has shape"):
    normjax.frozen_batch_norm().apply(params, state._replace(mean=jnp.zeros(4)), x, training=False)
  with pytest.raises(TypeError, match="training"):
    normjax.frozen_batch_norm().apply(params, state, x, training=1)
