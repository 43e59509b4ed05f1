"""Constraints: projections against Keras-formula float64 references, and as optax transforms."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normjax


def _tree(seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32)  # noqa: E731
  return {
    "Dense_0": {"kernel": f(5, 4), "bias": f(4)},
    "Conv_0": {"kernel": f(3, 3, 2, 4), "bias": f(4)},
    "LayerNorm_0": {"scale": f(4)},
  }


def ref_rescale(w, axes, target):
  """Keras: w * target(‖w‖) / (1e-7 + ‖w‖), norms over `axes` (float64)."""
  w = np.asarray(w, np.float64)
  norms = np.sqrt((w**2).sum(axis=axes, keepdims=True))
  return w * target(norms) / (1e-7 + norms)


@pytest.mark.parametrize(
  "make, target",
  [
    (lambda: normjax.max_norm(3.0), lambda n: np.clip(n, 0, 3.0)),
    (lambda: normjax.unit_norm(), np.ones_like),
    (
      lambda: normjax.min_max_norm(2.0, 4.0, rate=0.5),
      lambda n: 0.5 * np.clip(n, 2.0, 4.0) + 0.5 * n,
    ),
  ],
)
def test_projection_matches_keras_reference(make, target):
  params = _tree()
  out = make().project(params)
  np.testing.assert_allclose(
    out["Dense_0"]["kernel"],
    ref_rescale(params["Dense_0"]["kernel"], 0, target),
    rtol=1e-6,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    out["Conv_0"]["kernel"],
    ref_rescale(params["Conv_0"]["kernel"], (0, 1, 2), target),
    rtol=1e-6,
    atol=1e-6,
  )
  for leaf in (("Dense_0", "bias"), ("Conv_0", "bias"), ("LayerNorm_0", "scale")):
    assert out[leaf[0]][leaf[1]] is params[leaf[0]][leaf[1]]


def test_explicit_keras_axis_and_non_neg():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)) * 5, jnp.float32)
  out = normjax.max_norm(1.0, axis=1).project({"kernel": w})["kernel"]
  np.testing.assert_allclose(
    out, ref_rescale(w, 1, lambda n: np.clip(n, 0, 1.0)), rtol=1e-6, atol=1e-6
  )
  nn_out = normjax.non_neg().project({"kernel": w, "bias": -jnp.ones(3)})
  np.testing.assert_array_equal(nn_out["kernel"], np.maximum(np.asarray(w), 0))
  np.testing.assert_array_equal(nn_out["bias"], -np.ones(3))


def test_where_predicate_and_bool_tree():
  params = _tree()
  only_dense = normjax.max_norm(
    1.0, where=lambda path, leaf: "Dense_0" in jax.tree_util.keystr(path) and leaf.ndim == 2
  )
  out = only_dense.project(params)
  assert out["Conv_0"]["kernel"] is params["Conv_0"]["kernel"]
  assert np.linalg.norm(out["Dense_0"]["kernel"], axis=0).max() <= 1.0 + 1e-6
  mask = jax.tree_util.tree_map(lambda _: False, params)
  mask["Conv_0"]["kernel"] = True
  out = normjax.max_norm(1.0, where=mask).project(params)
  assert out["Dense_0"]["kernel"] is params["Dense_0"]["kernel"]
  assert (
    np.linalg.norm(np.asarray(out["Conv_0"]["kernel"]).reshape(-1, 4), axis=0).max() <= 1.0 + 1e-6
  )


@pytest.mark.parametrize(
  "optimizer", [lambda: optax.sgd(0.5, momentum=0.9), lambda: optax.adam(0.3)]
)
def test_chained_after_optimizer_every_step_inside_constraint(optimizer):
  params = _tree(scale=1.0)
  c = 3.0
  tx = optax.chain(optimizer(), normjax.max_norm(c))
  plain = optimizer()
  state, plain_state = tx.init(params), plain.init(params)
  plain_params = params

  @jax.jit
  def step(params, state, plain_params, plain_state, grads):
    updates, state = tx.update(grads, state, params)
    plain_updates, plain_state = plain.update(grads, plain_state, plain_params)
    return (
      optax.apply_updates(params, updates),
      state,
      optax.apply_updates(plain_params, plain_updates),
      plain_state,
    )

  for i in range(6):
    grads = jax.tree_util.tree_map(lambda p: -3.0 * p, _tree(seed=10 + i))  # pushes norms up
    params, state, plain_params, plain_state = step(params, state, plain_params, plain_state, grads)
    dense = np.linalg.norm(np.asarray(params["Dense_0"]["kernel"], np.float64), axis=0)
    conv = np.linalg.norm(np.asarray(params["Conv_0"]["kernel"], np.float64).reshape(-1, 4), axis=0)
    assert dense.max() <= c + 1e-6 and conv.max() <= c + 1e-6, (i, dense, conv)
    for leaf in (("Dense_0", "bias"), ("Conv_0", "bias"), ("LayerNorm_0", "scale")):
      np.testing.assert_array_equal(params[leaf[0]][leaf[1]], plain_params[leaf[0]][leaf[1]])
  assert dense.max() > c - 1e-3  # the constraint was active


def test_min_max_and_unit_norm_optax_steps():
  params = _tree(scale=0.1)
  for constraint, lo, hi in (
    (normjax.min_max_norm(1.0, 2.0), 1.0, 2.0),
    (normjax.unit_norm(), 1.0, 1.0),
  ):
    tx = optax.chain(optax.sgd(0.1), constraint)
    p, s = params, tx.init(params)
    for i in range(3):
      updates, s = tx.update(_tree(seed=i), s, p)
      p = optax.apply_updates(p, updates)
      norms = np.linalg.norm(np.asarray(p["Dense_0"]["kernel"], np.float64), axis=0)
      assert np.all(norms >= lo - 1e-5) and np.all(norms <= hi + 1e-5)


def test_update_needs_params():
  tx = normjax.max_norm(1.0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(_tree(), tx.init(_tree()))


def test_bad_input_raises():
  with pytest.raises(ValueError, match=r"max_value=-1.0 must be a number >= 0"):
    normjax.max_norm(-1.0)
  with pytest.raises(ValueError, match=r"min_value=3.0 must not exceed max_value=2.0"):
    normjax.min_max_norm(3.0, 2.0)
  with pytest.raises(ValueError, match=r"rate=1.5 must be a number in \[0, 1\]"):
    normjax.min_max_norm(0.0, 1.0, rate=1.5)
  with pytest.raises(ValueError, match=r"rate=-0.1"):
    normjax.min_max_norm(0.0, 1.0, rate=-0.1)
  with pytest.raises(
    ValueError, match=r"axis=2 is out of range.*\['Dense_0'\]\['kernel'\].*\(5, 4\)"
  ):
    normjax.max_norm(1.0, axis=2, where=lambda p, leaf: leaf.ndim == 2).project(_tree())


_PROJECT = jax.jit(normjax.max_norm(2.0).project)


@hypothesis.given(seed=st.integers(0, 1000), scale=st.floats(1e-3, 1e3))
def test_max_norm_property_inside_ball_and_idempotent(seed, scale):
  w = {
    "kernel": jnp.asarray(np.random.default_rng(seed).standard_normal((6, 3)) * scale, jnp.float32)
  }
  once = _PROJECT(w)
  norms = np.linalg.norm(np.asarray(once["kernel"], np.float64), axis=0)
  assert norms.max() <= 2.0 + 1e-6
  np.testing.assert_allclose(_PROJECT(once)["kernel"], once["kernel"], rtol=1e-6, atol=1e-7)
  norms_in = np.linalg.norm(np.asarray(w["kernel"], np.float64), axis=0)
  inside = norms_in <= 2.0
  if inside.any():  # untouched up to Keras's 1e-7 in the denominator: relative change 1e-7 / ‖w‖
    np.testing.assert_allclose(
      np.asarray(once["kernel"])[:, inside],
      np.asarray(w["kernel"])[:, inside],
      rtol=1e-6 + 2e-7 / norms_in[inside].min(),
    )
