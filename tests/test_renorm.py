"""Batch Renormalization's running statistics (Ioffe 2017, Algorithm 1): moving averages of μ and of
σ = sqrt(σ²_B + ε), checked against the Keras layer itself and a float64 transcription of Keras' algorithm."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 reads it once, at its first import

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
from normjax._src import renorm as renorm_lib
from tests import references as ref

EPS = 1e-3  # Keras' default epsilon


def _batches(steps, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (0.4 * t + (0.5 + 0.6 * t) * rng.standard_normal(shape)).astype(np.float32)
    for t in range(steps)
  ]


def _gamma_beta(channels, seed=1):
  rng = np.random.default_rng(seed)
  return rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.normal(size=channels).astype(
    np.float32
  )


def _normjax_steps(bn, params, state, batches, dy=None):
  """y, new state (and gradients of <y, dy> w.r.t. x and params) for each batch, threading the state."""
  out = []
  for i, x in enumerate(batches):
    (y, new_state), pullback = jax.vjp(lambda p, x: bn.apply(p, state, x, training=True), params, x)
    grads = None
    if dy is not None:
      dparams, dx = pullback((dy[i], jax.tree_util.tree_map(jnp.zeros_like, new_state)))
      grads = dict(dx=dx, dgamma=dparams["scale"], dbeta=dparams["bias"])
    y_eval, _ = bn.apply(params, new_state, x, training=False)
    out.append(dict(y=y, state=new_state, y_inference=y_eval, grads=grads))
    state = new_state
  return out


def test_matches_keras_renorm_layer_step_by_step():
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("this comparison runs Keras on its JAX backend")
  momentum, r_max, d_max, steps, shape = 0.9, 1.5, 0.5, 6, (16, 4)
  batches, dys = _batches(steps, shape), _batches(steps, shape, seed=7)
  gamma, beta = _gamma_beta(shape[1])

  layer = keras.layers.BatchNormalization(
    momentum=momentum,
    epsilon=EPS,
    renorm=True,
    renorm_momentum=momentum,
    renorm_clipping={"rmin": 1.0 / r_max, "rmax": r_max, "dmax": d_max},
  )
  layer.build((None, shape[1]))
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  names = [v.name for v in layer.non_trainable_variables]
  trainable = [v.value for v in layer.trainable_variables]
  non_trainable = [v.value for v in layer.non_trainable_variables]
  keras_steps = []
  for x, dy in zip(batches, dys):

    def train(trainable, x, non_trainable=non_trainable):
      return layer.stateless_call(trainable, non_trainable, x, training=True)

    (y, new_non_trainable), pullback = jax.vjp(train, trainable, jnp.asarray(x))
    (dgamma, dbeta), dx = pullback(
      (jnp.asarray(dy), jax.tree_util.tree_map(jnp.zeros_like, new_non_trainable))
    )
    non_trainable = new_non_trainable
    variables = dict(zip(names, non_trainable))
    y_eval, _ = layer.stateless_call(trainable, non_trainable, x, training=False)
    keras_steps.append(
      dict(y=y, y_inference=y_eval, dx=dx, dgamma=dgamma, dbeta=dbeta, **variables)
    )

  bn = normjax.batch_renorm(r_max=r_max, d_max=d_max, momentum=momentum, epsilon=EPS)
  params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
  _, state = bn.init(batches[0])
  state = state._replace(var=state.var - EPS)  # Keras starts its moving σ at 1: sqrt(var + ε) = 1
  ours = _normjax_steps(bn, params, state, batches, dys)

  for k, o in zip(keras_steps, ours):
    np.testing.assert_allclose(o["y"], k["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o["state"].mean, k["moving_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o["state"].var, k["moving_variance"], rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(o["state"].var + EPS), k["moving_stddev"], rtol=1e-5)
    np.testing.assert_allclose(o["y_inference"], k["y_inference"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o["grads"]["dx"], k["dx"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(o["grads"]["dgamma"], k["dgamma"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o["grads"]["dbeta"], k["dbeta"], rtol=1e-5, atol=1e-5)
  # with renorm_momentum = momentum, Keras' renorm averages are its moving averages: one state suffices
  np.testing.assert_allclose(
    keras_steps[-1]["renorm_stddev"], keras_steps[-1]["moving_stddev"], rtol=1e-6
  )
  # the moving σ, not σ², is averaged: the EMA of σ² would be larger (Jensen) by a measurable margin
  var_ema = np.ones(shape[1]) - EPS
  for x in batches:
    var_ema = momentum * var_ema + (1 - momentum) * x.astype(np.float64).var(0)
  assert np.all(var_ema - np.asarray(ours[-1]["state"].var) > 1e-2)


@pytest.mark.parametrize(
  "momentum, r_max, d_max", [(0.9, 1.5, 0.5), (0.7, 3.0, 5.0), (0.99, 1.1, 0.1)]
)
def test_matches_keras_algorithm_float64_reference(momentum, r_max, d_max):
  steps, shape = 8, (12, 3)
  batches = _batches(steps, shape, seed=3)
  gamma, beta = _gamma_beta(shape[1], seed=4)
  bn = normjax.batch_renorm(r_max=r_max, d_max=d_max, momentum=momentum, epsilon=EPS)
  params = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
  _, state = bn.init(batches[0])
  ours = _normjax_steps(bn, params, state, batches)
  # normjax's default state (var 1) has σ = sqrt(1 + ε): Keras' algorithm started at that σ
  want = ref.keras_renorm_steps(
    batches,
    gamma.astype(np.float64),
    beta.astype(np.float64),
    momentum=momentum,
    renorm_momentum=momentum,
    eps=EPS,
    rmin=1 / r_max,
    rmax=r_max,
    dmax=d_max,
    initial_variance=1.0 + EPS,
  )
  for o, w in zip(ours, want):
    np.testing.assert_allclose(o["y"], w["y"], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(o["state"].mean, w["moving_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o["state"].var, w["moving_variance"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(o["y_inference"], w["y_inference"], rtol=1e-5, atol=2e-5)
  assert int(ours[-1]["state"].count) == steps
  clipped = np.array([w["clipped"] for w in want])
  if r_max < 3.0:  # tight limits: the clipping is exercised; wide limits: the free corrections are
    assert clipped.any()
  else:
    assert (~clipped).all()


@pytest.mark.parametrize(
  "momentum, debias, unbiased",
  [(None, False, False), (0.8, True, False), (0.8, False, True), (None, False, True)],
)
def test_sigma_average_composes_with_debias_cumulative_and_unbiased(momentum, debias, unbiased):
  """`debias`, `momentum=None` and `unbiased_running_var` apply to σ exactly as they apply to σ²."""
  batches = _batches(5, (10, 3), seed=5)
  bn = normjax.batch_renorm(
    momentum=momentum, debias=debias, unbiased_running_var=unbiased, epsilon=EPS
  )
  params, state = bn.init(batches[0])
  step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
  n = batches[0].shape[0]
  sigmas, means = [], []
  for x in batches:
    state = step(state, x)
    x64 = x.astype(np.float64)
    means.append(x64.mean(0))
    sigmas.append(np.sqrt(x64.var(0) * (n / (n - 1) if unbiased else 1.0) + EPS))
    want_sigma = ref.running_statistics(sigmas, np.full(3, np.sqrt(1 + EPS)), momentum, debias)[-1]
    want_mean = ref.running_statistics(means, np.zeros(3), momentum, debias)[-1]
    np.testing.assert_allclose(
      state.var, np.maximum(want_sigma**2 - EPS, 0.0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(state.mean, want_mean, rtol=1e-5, atol=1e-6)
  if momentum is None and not unbiased:  # the cumulative average of the five σ_B, by hand
    np.testing.assert_allclose(np.sqrt(state.var + EPS), np.mean(sigmas, axis=0), rtol=1e-5)


def test_ghost_batches_renormalize_per_group_and_average_sigma_of_mean_variance():
  x = _batches(1, (12, 2), seed=8)[0] * 2.0 + 1.0
  momentum, r_max, d_max = 0.6, 1.3, 0.4
  bn = normjax.batch_renorm(
    r_max=r_max,
    d_max=d_max,
    momentum=momentum,
    epsilon=EPS,
    ghost_batch_size=4,
    use_scale=False,
    use_bias=False,
  )
  params, state = bn.init(x)
  state = state._replace(mean=jnp.array([0.5, -0.5]), var=jnp.array([2.0, 0.5]))
  y, new_state = bn.apply(params, state, x, training=True)
  mu0, sigma0 = np.array([0.5, -0.5]), np.sqrt(np.array([2.0, 0.5]) + EPS)
  x64, group_means, group_vars = x.astype(np.float64), [], []
  for rows in ref.ghost_groups(12, 4, "consecutive"):
    xg = x64[rows]
    mean, var = xg.mean(0), xg.var(0)
    r = np.clip(np.sqrt(var + EPS) / sigma0, 1 / r_max, r_max)
    d = np.clip((mean - mu0) / sigma0, -d_max, d_max)
    np.testing.assert_allclose(
      np.asarray(y)[rows], (xg - mean) / np.sqrt(var + EPS) * r + d, rtol=1e-5, atol=1e-5
    )
    group_means.append(mean), group_vars.append(var)
  # the running targets are the groups' mean μ and sqrt(mean σ² + ε) (tf-keras' virtual batches)
  sigma = momentum * sigma0 + (1 - momentum) * np.sqrt(np.mean(group_vars, 0) + EPS)
  np.testing.assert_allclose(new_state.var, sigma**2 - EPS, rtol=1e-5)
  np.testing.assert_allclose(
    new_state.mean, momentum * mu0 + (1 - momentum) * np.mean(group_means, 0), rtol=1e-5
  )


def test_running_var_update_by_hand():
  # σ_old = sqrt(3 + 1) = 2, σ_B = sqrt(15 + 1) = 4; EMA 0.5 → σ = 3, var = 9 − 1 = 8
  var = renorm_lib.running_var_update(
    jnp.array([3.0]),
    jnp.array([15.0]),
    jnp.array(0, jnp.int32),
    momentum=0.5,
    debias=False,
    epsilon=1.0,
  )
  np.testing.assert_allclose(var, [8.0])
  # debiased from step 0: the hidden EMA starts at 0, so the first value is σ_B itself: 4² − 1
  var = renorm_lib.running_var_update(
    jnp.array([3.0]),
    jnp.array([15.0]),
    jnp.array(0, jnp.int32),
    momentum=0.5,
    debias=True,
    epsilon=1.0,
  )
  np.testing.assert_allclose(var, [15.0])
  # σ can only fall below sqrt(ε) by rounding: the stored variance is clipped at 0, never negative
  var = renorm_lib.running_var_update(
    jnp.array([0.0]),
    jnp.array([0.0]),
    jnp.array(0, jnp.int32),
    momentum=0.5,
    debias=False,
    epsilon=1e-3,
  )
  assert float(var[0]) >= 0.0 and abs(float(var[0])) < 1e-9


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_a_non_finite_batch_variance_leaves_that_features_running_statistics_alone(bad):
  """Renorm's guard tests the batch variance (its σ average is finite exactly when that is): a NaN or
  inf element, or one whose square overflows float32 (1e30), keeps feature 0's previous running
  values; the other features update as usual, and so does the count."""
  x = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32) + 2.0
  x[5, 0] = bad
  bn = normjax.batch_norm(renorm=True, momentum=0.5, epsilon=EPS)
  params, state = bn.init(jnp.asarray(x))
  state = state._replace(mean=state.mean + 0.25, var=state.var * 1.5, count=jnp.asarray(3))
  _, new = jax.jit(lambda s, x: bn.apply(params, s, x, training=True))(state, jnp.asarray(x))
  assert float(new.mean[0]) == float(state.mean[0]) and float(new.var[0]) == float(state.var[0])
  clean = x[:, 1:].astype(np.float64)
  sigma = 0.5 * np.sqrt(1.5 + EPS) + 0.5 * np.sqrt(clean.var(axis=0) + EPS)
  np.testing.assert_allclose(new.var[1:], sigma**2 - EPS, rtol=1e-5)
  np.testing.assert_allclose(new.mean[1:], 0.5 * 0.25 + 0.5 * clean.mean(axis=0), rtol=1e-5)
  assert int(new.count) == 4


def test_running_var_update_stays_finite_up_to_float32s_largest_variance():
  biggest = np.float32(np.finfo(np.float32).max)
  var = renorm_lib.running_var_update(
    jnp.array([biggest]),
    jnp.array([biggest]),
    jnp.array(0),
    momentum=0.5,
    debias=False,
    epsilon=1e-3,
  )
  assert np.isfinite(var[0]) and float(var[0]) > 0.99 * float(biggest)
