"""Bad input raises a clear exception at trace time (under jax.eval_shape), never a silent NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normjax

X = jax.ShapeDtypeStruct((8, 4, 3), jnp.float32)


@pytest.mark.parametrize(
  "options, match",
  [
    (dict(momentum=1.0), r"momentum=1.0 must be a number in \[0, 1\)"),
    (dict(momentum=-0.1), r"momentum=-0.1"),
    (dict(ghost_batch_size=1), r"ghost_batch_size=1 must be an int >= 2"),
    (dict(renorm=True, r_max=0.5), r"r_max=0.5 .* must be >= 1"),
    (dict(renorm=True, d_max=-1.0), r"d_max=-1.0 .* must be >= 0"),
    (dict(epsilon=0.0), r"epsilon=0.0 must be a positive number"),
    (dict(stats_method="naive"), r"stats_method='naive' must be one of"),
    (dict(axis_index_groups=[[0, 1]]), r"axis_index_groups needs axis_name"),
    (dict(axis_name="b", axis_index_groups=[[0, 1], [1, 2]]), r"lists a device index twice"),
  ],
)
def test_bad_options_raise_at_construction(options, match):
  with pytest.raises(ValueError, match=match):
    normjax.batch_norm(**options)


def _trace(bn, x=X, mask=None, training=True, params=None, state=None):
  if params is None:
    params, state = bn.init(x)
  return jax.eval_shape(
    lambda p, s, x: bn.apply(p, s, x, training=training, mask=mask), params, state, x
  )


@pytest.mark.parametrize(
  "options, x, match",
  [
    (dict(axis=3), X, r"axis=3 is out of range for an input of rank 3"),
    (dict(axis=(0, -4)), X, r"axis=\(0, -4\) is out of range"),
    (dict(ghost_batch_size=3), X, r"ghost_batch_size=3 must divide the batch size 8 along axis 0"),
  ],
)
def test_bad_shapes_raise_at_trace_time(options, x, match):
  bn = normjax.batch_norm(**options)
  with pytest.raises(ValueError, match=match):
    _trace(bn, x, params={}, state=None) if "axis" in options else _trace(bn, x)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_or_boolean_input(dtype):
  bn = normjax.batch_norm()
  with pytest.raises(
    TypeError, match=f"x has dtype {jnp.dtype(dtype)}; normalization needs a floating"
  ):
    bn.init(jax.ShapeDtypeStruct((4, 3), dtype))
  params, state = bn.init(jnp.ones((4, 3)))
  with pytest.raises(TypeError, match="floating-point"):
    bn.apply(params, state, jnp.ones((4, 3), dtype), training=True)


def test_mask_that_does_not_broadcast():
  with pytest.raises(ValueError, match=r"mask of shape \(8, 2\) does not broadcast to x of shape"):
    _trace(normjax.batch_norm(), mask=jnp.ones((8, 2), bool))


def test_params_or_state_that_do_not_match_x():
  bn = normjax.batch_norm()
  params, state = bn.init(X)
  bad_scale = {**params, "scale": jnp.ones(4)}
  with pytest.raises(
    ValueError, match=r"params\['scale'\] has shape \(4,\) .* expected shape \(3,\)"
  ):
    _trace(bn, params=bad_scale, state=state)
  with pytest.raises(ValueError, match=r"state.var has shape \(3,\) and dtype bfloat16"):
    _trace(bn, params=params, state=state._replace(var=state.var.astype(jnp.bfloat16)))
  with pytest.raises(ValueError, match=r"params has keys \['scale'\]"):
    _trace(bn, params={"scale": params["scale"]}, state=state)
  with pytest.raises(TypeError, match="state is a tuple"):
    _trace(bn, params=params, state=tuple(state))


@pytest.mark.parametrize("options, shape", [(dict(), (1, 3)), (dict(axis=(0, 1)), (4, 3))])
def test_a_single_element_per_statistics_group_when_training(options, shape):
  bn = normjax.batch_norm(**options)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  with pytest.raises(
    ValueError, match=r"training with 1 element\(s\) per feature .* variance is undefined"
  ):
    _trace(bn, x)
  _trace(bn, x, training=False)  # evaluation with one example is fine


def test_training_flag_must_be_a_python_bool():
  bn = normjax.batch_norm()
  params, state = bn.init(X)
  with pytest.raises(TypeError, match="training=.* must be a Python or NumPy bool"):
    jax.jit(lambda t: bn.apply(params, state, jnp.ones((8, 4, 3)), training=t))(True)


def test_renorm_schedule_below_one_at_step_zero():
  with pytest.raises(ValueError, match="r_max=0.5"):
    normjax.batch_renorm(r_max=lambda step: 0.5 + 0 * step)


def test_virtual_batch_norm_feature_axis_cannot_be_the_batch_axis():
  with pytest.raises(ValueError, match="includes the batch axis 0"):
    normjax.virtual_batch_norm(axis=0).init(jnp.ones((4, 3)))


def test_a_masked_out_feature_gives_finite_outputs():
  bn = normjax.batch_norm()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
  params, state = bn.init(x)
  y, new_state = bn.apply(params, state, x, training=True, mask=jnp.array([[True, False]]))
  assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(new_state.var)).all()
