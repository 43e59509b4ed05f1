"""Weight norm, weight standardization and spectral norm against float64 references from the papers."""

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
import normjax.linen as njl
from tests import helpers


_data = helpers.normal_data


def _fan_in(shape):
  return tuple(range(len(shape) - 1))


# ---- weight norm: Salimans & Kingma 2016, eq. (2) and (3) ----------------------------------------


def ref_weight_norm(v, g, eps=1e-12):
  v = np.asarray(v, np.float64)
  return (
    np.asarray(g, np.float64) * v / np.sqrt((v**2).sum(axis=_fan_in(v.shape), keepdims=True) + eps)
  )


def ref_weight_norm_grads(v, g, dw):
  """Eq. (3): ∇_g L = ∇_w L · v / ‖v‖,  ∇_v L = g/‖v‖ ∇_w L − g ∇_g L / ‖v‖² v (per output unit)."""
  v, g, dw = (np.asarray(a, np.float64) for a in (v, g, dw))
  axes = _fan_in(v.shape)
  norm = np.sqrt((v**2).sum(axis=axes, keepdims=True))
  dg = (dw * v).sum(axis=axes, keepdims=True) / norm
  dv = g / norm * dw - g * dg / norm**2 * v
  return dv, dg.reshape(-1)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4)])
def test_weight_norm_reference_identity_at_init_and_grads(shape):
  wn = normjax.weight_norm()
  v = _data(shape, mean=0.5)
  params, state = wn.init(v)
  w, _ = wn.apply(params, state, training=True)
  np.testing.assert_allclose(w, v, rtol=1e-6, atol=1e-7)  # unchanged at init
  g = np.linspace(0.5, 2.0, shape[-1]).astype(np.float32)
  params = {"v": jnp.asarray(v), "g": jnp.asarray(g)}
  f = jax.jit(lambda p: wn.apply(p, state, training=True)[0])
  np.testing.assert_allclose(f(params), ref_weight_norm(v, g), rtol=1e-5, atol=1e-6)
  dw = _data(shape, seed=1)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(f(p) * dw)))(params)
  want_dv, want_dg = ref_weight_norm_grads(v, g, dw)
  np.testing.assert_allclose(grads["v"], want_dv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["g"], want_dg, rtol=1e-4, atol=1e-5)
  check_grads(f, (params,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_weight_norm_dense_output_unchanged_at_init():
  x = _data((4, 3))
  layer = njl.WeightNormDense(5)
  variables = layer.init(jax.random.key(0), x)
  v, b = variables["params"]["v"], variables["params"]["bias"]
  plain = nn.Dense(5).apply({"params": {"kernel": v, "bias": b}}, x)
  np.testing.assert_allclose(layer.apply(variables, x), plain, rtol=1e-6, atol=1e-6)


def test_weight_norm_data_dependent_init():
  x = _data((256, 6), mean=1.0, std=2.0)
  layer = njl.WeightNormDense(4, data_init=True, init_scale=0.5)
  variables = layer.init(jax.random.key(0), x)
  y = np.asarray(layer.apply(variables, x), np.float64)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(0), 0.5, rtol=1e-4)


# ---- weight standardization: Qiao et al. 2019, eq. (5) -------------------------------------------


def ref_weight_standardization(w, eps=1e-5):
  w = np.asarray(w, np.float64)
  axes = _fan_in(w.shape)
  mu = w.mean(axis=axes, keepdims=True)
  return (w - mu) / np.sqrt(w.var(axis=axes, keepdims=True) + eps)


def test_weight_standardization_matches_reference_and_grads():
  ws = normjax.weight_standardization()
  w = _data((3, 3, 2, 4), mean=0.3, std=0.1)
  params, state = ws.init(w)
  f = jax.jit(lambda p: ws.apply(p, state, training=False)[0])
  np.testing.assert_allclose(f(params), ref_weight_standardization(w), rtol=1e-4, atol=1e-4)
  dw = _data(w.shape, seed=2)
  got = jax.jit(jax.grad(lambda p: jnp.sum(f(p) * dw)))(params)["kernel"]
  # float64 reference gradient of <ŵ, dw>: (dw − mean(dw) − ŵ mean(dw ŵ)) / sqrt(σ² + ε)
  w64, dw64 = np.asarray(w, np.float64), np.asarray(dw, np.float64)
  axes = _fan_in(w.shape)
  what = ref_weight_standardization(w)
  sigma = np.sqrt(w64.var(axis=axes, keepdims=True) + 1e-5)
  want = (
    dw64 - dw64.mean(axes, keepdims=True) - what * (dw64 * what).mean(axes, keepdims=True)
  ) / sigma
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
  check_grads(f, (params,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_weight_standardized_conv_equals_conv_with_standardized_kernel():
  x = _data((2, 5, 5, 3))
  layer = njl.WeightStandardizedConv(4, (3, 3))
  variables = layer.init(jax.random.key(0), x)
  conv = variables["params"]["Conv_0"]
  std_kernel = normjax.standardize_kernel(conv["kernel"])
  want = nn.Conv(4, (3, 3)).apply({"params": {"kernel": std_kernel, "bias": conv["bias"]}}, x)
  np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)


# ---- spectral norm: Miyato et al. 2018, Algorithm 1 -----------------------------------------------


@pytest.mark.parametrize("shape", [(8, 5), (3, 3, 4, 6)])
def test_spectral_norm_converges_to_svd(shape):
  kernel = _data(shape, seed=4)
  matrix = np.moveaxis(np.asarray(kernel, np.float64), -1, 0).reshape(shape[-1], -1)
  sigma_true = np.linalg.svd(matrix, compute_uv=False)[0]
  sn = normjax.spectral_norm()
  params, state = sn.init(kernel, jax.random.key(1))
  step = jax.jit(lambda s: sn.apply(params, s, training=True))
  for _ in range(200):  # one power iteration per training call, as in training
    w, state = step(state)
  assert abs(float(state.sigma) - sigma_true) / sigma_true < 1e-3
  np.testing.assert_allclose(w, np.asarray(kernel, np.float64) / sigma_true, rtol=2e-3, atol=1e-5)


def test_spectral_norm_state_updates_only_in_training_and_grads():
  kernel = _data((6, 4), seed=5)
  sn = normjax.spectral_norm(n_power_iterations=3)
  params, state = sn.init(kernel)
  _, same = sn.apply(params, state, training=False)
  assert same is state
  _, new = sn.apply(params, state, training=True)
  assert not np.allclose(new.u, state.u) and new.u.dtype == jnp.float32
  # Gradient with u, v fixed (the paper's): d(W/σ) with σ = uᵀWv, dσ/dW = u vᵀ.
  f = jax.jit(lambda p: sn.apply(p, new, training=False)[0])
  check_grads(f, (params,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
  dw = _data((6, 4), seed=6)
  got = jax.grad(lambda p: jnp.sum(f(p) * dw))(params)["kernel"]
  w = np.asarray(kernel, np.float64)
  u = np.asarray(new.u, np.float64)
  wmat = w.T  # (out, fan_in)
  v = wmat.T @ u / np.linalg.norm(wmat.T @ u)
  sigma = u @ wmat @ v
  dwmat = np.asarray(dw, np.float64).T
  want = dwmat / sigma - (dwmat * wmat).sum() / sigma**2 * np.outer(u, v)
  np.testing.assert_allclose(got, want.T, rtol=1e-3, atol=1e-4)


def test_spectral_norm_dense_linen():
  x = _data((3, 4))
  layer = njl.SpectralNormDense(5, n_power_iterations=50)
  variables = layer.init(jax.random.key(0), x, training=False)
  y_eval = layer.apply(variables, x, training=False)
  y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
  assert not np.allclose(updates["batch_stats"]["u"], variables["batch_stats"]["u"])
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  sigma = np.linalg.svd(kernel, compute_uv=False)[0]
  assert abs(float(updates["batch_stats"]["sigma"]) - sigma) / sigma < 1e-3
  assert y.shape == y_eval.shape == (3, 5)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="n_power_iterations=0"):
    normjax.spectral_norm(n_power_iterations=0)
  with pytest.raises(ValueError, match="epsilon=0"):
    normjax.weight_norm(epsilon=0)
  with pytest.raises(ValueError, match="rank >= 2"):
    normjax.weight_standardization().init(jnp.ones(4))
  with pytest.raises(ValueError, match=r"params\['g'\] has shape"):
    normjax.weight_norm().apply({"v": jnp.ones((3, 4)), "g": jnp.ones(3)}, None, training=False)
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    normjax.spectral_norm(axis=2).init(jnp.ones((3, 4)))


_WN = jax.jit(lambda p: normjax.weight_norm().apply(p, None, training=False)[0])


@hypothesis.given(seed=st.integers(0, 1000), scale=st.floats(1e-2, 1e2))
def test_weight_norm_property_unit_norm_times_g(seed, scale):
  v = _data((4, 3), seed=seed) * np.float32(scale)
  g = np.abs(_data((3,), seed=seed + 1)) + 0.1
  w = _WN({"v": jnp.asarray(v), "g": jnp.asarray(g)})
  np.testing.assert_allclose(np.linalg.norm(np.asarray(w, np.float64), axis=0), g, rtol=1e-5)
