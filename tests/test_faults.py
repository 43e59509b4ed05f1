"""Fault injection through every face: a NaN / inf element or an all-masked batch never poisons the
running statistics (the core's rule, `normjax/_src/batch_norm.py::updated_state`), whichever face calls
the core. The experiments' faults (checkpoints, caches, configs) are in test_experiments_faults.py."""

import equinox as eqx
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax
import normjax.equinox as nje
import normjax.linen as njl
import normjax.nnx as njn

B, C = 8, 3


def _batch(bad=None):
  x = np.random.default_rng(0).standard_normal((B, C)).astype(np.float32) * 2.0 + 1.0
  if bad is not None:
    x[3, 0] = bad  # one element of feature 0
  return jnp.asarray(x)


def _functional(x, mask):
  bn = normjax.batch_norm(momentum=0.5)
  params, state = bn.init(x)
  state = state._replace(mean=state.mean + 0.25, var=state.var * 1.5)
  _, new = bn.apply(params, state, x, training=True, mask=mask)
  return state, new


def _linen(x, mask):
  layer = njl.BatchNorm(momentum=0.5)
  variables = layer.init(jax.random.key(0), x, training=False)
  stats = variables["batch_stats"]
  stats = {**stats, "mean": stats["mean"] + 0.25, "var": stats["var"] * 1.5}
  _, updates = layer.apply(
    {**variables, "batch_stats": stats}, x, training=True, mask=mask, mutable=["batch_stats"]
  )
  new = updates["batch_stats"]
  return normjax.BatchNormState(**stats), normjax.BatchNormState(**new)


def _nnx(x, mask):
  layer = njn.BatchNorm(C, momentum=0.5, rngs=nnx.Rngs(0))
  layer.mean[...] = layer.mean[...] + 0.25
  layer.var[...] = layer.var[...] * 1.5
  old = normjax.BatchNormState(layer.mean[...], layer.var[...], layer.count[...])
  layer(x, training=True, mask=mask)
  return old, normjax.BatchNormState(layer.mean[...], layer.var[...], layer.count[...])


def _equinox(x, mask):
  layer, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", momentum=0.5)
  old = state.get(layer.state_index)
  old = old._replace(mean=old.mean + 0.25, var=old.var * 1.5)
  state = state.set(layer.state_index, old)
  per_example_mask = None if mask is None else jnp.broadcast_to(mask, (B, C))
  run = jax.vmap(
    lambda xi, mi: layer(xi, state, mask=mi), axis_name="batch", in_axes=(0, 0), out_axes=(0, None)
  )
  _, state = (
    run(x, per_example_mask)
    if mask is not None
    else jax.vmap(lambda xi: layer(xi, state), axis_name="batch", out_axes=(0, None))(x)
  )
  return old, state.get(layer.state_index)


FACES = {"functional": _functional, "linen": _linen, "nnx": _nnx, "equinox": _equinox}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("face", FACES)
def test_a_non_finite_element_leaves_that_features_running_statistics_alone(face, bad):
  clean_old, clean_new = FACES[face](_batch(), None)
  old, new = FACES[face](_batch(bad), None)
  np.testing.assert_array_equal(new.mean[0], old.mean[0])
  np.testing.assert_array_equal(new.var[0], old.var[0])
  x = np.asarray(_batch(), np.float64)  # the other features update as on a clean batch
  want_mean = 0.5 * np.asarray(old.mean[1:]) + 0.5 * x[:, 1:].mean(0)
  np.testing.assert_allclose(new.mean[1:], want_mean, rtol=1e-5)
  np.testing.assert_allclose(new.mean[1:], clean_new.mean[1:], rtol=1e-6)
  assert np.all(np.isfinite(new.mean)) and np.all(np.isfinite(new.var))
  assert int(new.count) == int(old.count) + 1


@pytest.mark.parametrize("face", FACES)
def test_an_all_masked_batch_changes_nothing(face):
  mask = jnp.zeros((B, 1), bool)
  old, new = FACES[face](_batch(), mask)
  for a, b in zip(old, new):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("face", FACES)
def test_check_finite_stops_at_the_first_non_finite_batch(face):
  del face  # the check is the core's; one face is enough to show it is reachable from the config
  bn = normjax.batch_norm(check_finite=True)
  x = _batch(np.nan)
  params, state = bn.init(x)
  checked = jax.experimental.checkify.checkify(lambda s, v: bn.apply(params, s, v, training=True))
  err, _ = jax.jit(checked)(state, x)
  with pytest.raises(jax.experimental.checkify.JaxRuntimeError, match="not finite"):
    err.throw()
  err, _ = jax.jit(checked)(state, _batch())
  err.throw()  # a clean batch passes
