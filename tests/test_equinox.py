"""normjax.equinox: Equinox's interface on the normjax core.

BatchNorm runs the Equinox way (one example per call under `jax.vmap(..., axis_name="batch")`) and is
checked against `normjax.batch_norm` on the stacked batch, against Equinox's own `mode="batch"` layer,
and against float64 NumPy references of the statistics and running-statistics formulas. The feature norms
are checked against Equinox's own layers.
"""

import dataclasses
import inspect
import warnings

import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import normjax  # noqa: E402
from normjax._src import batch_norm as bn_lib  # noqa: E402
from normjax._src import modes  # noqa: E402
import normjax.equinox as nje  # noqa: E402
from normjax.equinox import _batch_norm as eqx_bn  # noqa: E402

N, C, H, W = 8, 3, 4, 4


def batched(model, axis_name="batch"):
  return jax.vmap(model, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def batches(steps=3, shape=(N, C, H, W), seed=0):
  keys = jax.random.split(jax.random.key(seed), steps)
  scale = jnp.array([1.0, 3.0, 0.5]).reshape(1, C, *([1] * (len(shape) - 2)))
  return [jax.random.normal(k, shape) * scale * (t + 1) + 2.0 * t - 1.0 for t, k in enumerate(keys)]


def with_random_affine(model, seed=7):
  k1, k2 = jax.random.split(jax.random.key(seed))
  model = eqx.tree_at(lambda m: m.weight, model, 1.0 + 0.3 * jax.random.normal(k1, (C,)))
  return eqx.tree_at(lambda m: m.bias, model, 0.2 * jax.random.normal(k2, (C,)))


def core_params(model):
  return {k: v for k, v in (("scale", model.weight), ("bias", model.bias)) if v is not None}


def np_moments(x, mask=None):
  """float64 per-channel mean and biased variance of NCHW `x` over the valid elements."""
  x = np.asarray(x, np.float64)
  valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  mean, var, count = [], [], []
  for c in range(x.shape[1]):
    v = x[:, c][valid[:, c]]
    count.append(v.size)
    mean.append(v.mean() if v.size else 0.0)
    var.append(v.var() if v.size else 0.0)
  return np.array(mean), np.array(var), np.array(count)


def np_normalize(x, mean, var, weight, bias, eps=1e-5):
  shape = (1, -1) + (1,) * (np.ndim(x) - 2)
  x = np.asarray(x, np.float64)
  normalized = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
  return normalized * np.asarray(weight).reshape(shape) + np.asarray(bias).reshape(shape)


def get(state, model):
  return state.get(model.state_index)


def equinox_batch_norm(*args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(*args, **kwargs)


# --- Equinox's mode="batch" -----------------------------------------------------------------------


@pytest.mark.parametrize("channelwise_affine", [True, False])
def test_batch_mode_reproduces_equinox_batch_mode(channelwise_affine):
  ours, s_ours = eqx.nn.make_with_state(nje.BatchNorm)(
    C, "batch", momentum=0.9, mode="batch", channelwise_affine=channelwise_affine
  )
  ref, s_ref = equinox_batch_norm(
    C, "batch", momentum=0.9, mode="batch", channelwise_affine=channelwise_affine
  )
  if channelwise_affine:
    ours, ref = with_random_affine(ours), with_random_affine(ref)
  for t, x in enumerate(batches()):
    y_ours, s_ours = batched(ours)(x, s_ours)
    y_ref, s_ref = batched(ref)(x, s_ref)
    np.testing.assert_allclose(y_ours, y_ref, atol=2e-6, rtol=1e-5)
    hidden = get(s_ours, ours)
    ref_mean, ref_var = s_ref.get(ref.batch_state_index)
    np.testing.assert_allclose(hidden.mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hidden.var, ref_var, rtol=1e-6)
    assert int(hidden.count) == int(s_ref.get(ref.batch_counter)) == t + 1
    x_eval = x[:3] + 0.5
    evaluate = lambda m, s: jax.vmap(
      eqx.nn.inference_mode(m),
      in_axes=(0, None),  # noqa: E731
      out_axes=(0, None),
    )(x_eval, s)[0]
    y_eval, y_ref_eval = evaluate(ours, s_ours), evaluate(ref, s_ref)
    np.testing.assert_allclose(y_eval, y_ref_eval, atol=2e-6, rtol=1e-5)


def test_batch_mode_running_formulas_float64():
  """Equinox's mode="batch": hidden EMA from (0, 1) of the biased batch statistics; inference divides
  by 1 − m^t (the variance keeps the m^t of its start at 1)."""
  m = 0.8
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", momentum=m, mode="batch")
  xs = batches(2)
  hidden_mean, hidden_var = np.zeros(C), np.ones(C)
  for x in xs:
    _, state = batched(model)(x, state)
    mean, var, _ = np_moments(x)
    hidden_mean, hidden_var = m * hidden_mean + (1 - m) * mean, m * hidden_var + (1 - m) * var
  np.testing.assert_allclose(get(state, model).mean, hidden_mean, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(get(state, model).var, hidden_var, rtol=1e-5)
  debias = 1 - m**2
  x_eval = xs[0]
  y, _ = jax.vmap(
    lambda xi, s: model(xi, s, inference=True), in_axes=(0, None), out_axes=(0, None)
  )(x_eval, state)
  expected = np_normalize(
    x_eval, hidden_mean / debias, hidden_var / debias, np.ones(C), np.zeros(C)
  )
  np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
  # Measured: the inference variance of channel 0 is 1.2 larger than Haiku's zero-start debiasing would
  # give, i.e. m^2 / (1 - m^2) = 0.64 / 0.36.
  haiku_var = (hidden_var - m**2) / debias
  np.testing.assert_allclose(hidden_var / debias - haiku_var, m**2 / debias, rtol=1e-12)
  # Before any training step Equinox divides by 1: running mean 0, variance 1.
  fresh, fresh_state = eqx.nn.make_with_state(nje.BatchNorm)(
    C, "batch", mode="batch", inference=True
  )
  y0, _ = jax.vmap(fresh, in_axes=(0, None), out_axes=(0, None))(x_eval, fresh_state)
  np.testing.assert_allclose(y0, x_eval / np.sqrt(1 + 1e-5), rtol=1e-6)


# --- normjax's semantics under vmap vs the core on the stacked batch ------------------------------


def run_both(steps=3, shape=(N, C, H, W), masks=None, **options):
  """Trains the Equinox face under vmap and `normjax.batch_norm(axis=1)` on the stacked batch."""
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", momentum=0.9, **options)
  model = with_random_affine(model)
  core = normjax.batch_norm(axis=1, momentum=0.9, **options)
  _, core_state = core.init(jnp.zeros(shape))
  params = core_params(model)
  out = []
  for t, x in enumerate(batches(steps, shape)):
    if masks is None:
      y, state = batched(model)(x, state)
      y_core, core_state = core.apply(params, core_state, x, training=True)
    else:
      mask = masks[t]
      y, state = jax.vmap(
        lambda xi, mi: model(xi, state, mask=mi), axis_name="batch", out_axes=(0, None)
      )(x, mask)
      y_core, core_state = core.apply(params, core_state, x, training=True, mask=mask)
    out.append((x, y, get(state, model), y_core, core_state))
  return model, state, core, params, out


def assert_state_close(a, b, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(a.mean, b.mean, rtol=rtol, atol=atol)
  np.testing.assert_allclose(a.var, b.var, rtol=rtol, atol=atol)
  assert int(a.count) == int(b.count)


def test_default_semantics_equal_the_core_on_the_stacked_batch_and_float64():
  model, state, core, params, out = run_both()
  ref_mean, ref_var = np.zeros(C), np.ones(C)
  for x, y, s, y_core, s_core in out:
    np.testing.assert_allclose(y, y_core, atol=2e-6, rtol=1e-5)
    assert_state_close(s, s_core)
    mean, var, _ = np_moments(x)
    np.testing.assert_allclose(y, np_normalize(x, mean, var, model.weight, model.bias), atol=2e-5)
    ref_mean, ref_var = 0.9 * ref_mean + 0.1 * mean, 0.9 * ref_var + 0.1 * var
  np.testing.assert_allclose(out[-1][2].mean, ref_mean, rtol=1e-5)
  np.testing.assert_allclose(out[-1][2].var, ref_var, rtol=1e-5)
  x = out[0][0]
  y_eval, same = jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None))(
    x, state
  )
  np.testing.assert_allclose(
    y_eval, np_normalize(x, ref_mean, ref_var, model.weight, model.bias), atol=2e-5
  )
  assert same is not None and int(get(same, model).count) == 3


@pytest.mark.parametrize(
  "options",
  [
    dict(ghost_batch_size=4),
    dict(ghost_batch_size=2, ghost_grouping="strided"),
    dict(ghost_batch_size=4, ghost_grouping="strided", unbiased_running_var=True),
    dict(ghost_batch_size=4, renorm=True, r_max=1.5, d_max=0.5),
    dict(renorm=True, r_max=1.5, d_max=0.5),
    dict(debias=True),
    dict(momentum=None, unbiased_running_var=True),
  ],
  ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_equal_the_core_on_the_stacked_batch(options):
  options = dict(options)
  momentum = options.pop("momentum", 0.9)
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", momentum=momentum, **options)
  model = with_random_affine(model)
  core = normjax.batch_norm(axis=1, momentum=momentum, **options)
  params = core_params(model)
  _, core_state = core.init(jnp.zeros((N, C, H, W)))
  for x in batches(3):
    y, state = batched(model)(x, state)
    y_core, core_state = core.apply(params, core_state, x, training=True)
    np.testing.assert_allclose(y, y_core, atol=3e-6, rtol=1e-5)
    assert_state_close(get(state, model), core_state)


def test_ghost_batches_normalize_each_group_by_its_own_statistics_float64():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(
    C, "batch", ghost_batch_size=2, ghost_grouping="strided"
  )
  x = batches(1)[0]
  y, state = batched(model)(x, state)
  x, y = np.asarray(x), np.asarray(y)
  for j in range(4):  # strided: group j holds rows j and j + 4
    rows = [j, j + 4]
    mean, var, _ = np_moments(x[rows])
    np.testing.assert_allclose(
      y[rows], np_normalize(x[rows], mean, var, np.ones(C), np.zeros(C)), atol=3e-5
    )
  means = np.stack([np_moments(x[[j, j + 4]])[0] for j in range(4)])
  np.testing.assert_allclose(get(state, model).mean, 0.01 * means.mean(0), rtol=1e-5)


def test_axis_index_groups_equal_ghost_batches_on_the_stacked_batch():
  groups = [[0, 2, 4, 6], [1, 3, 5, 7]]  # = strided ghost batches of 4
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", axis_index_groups=groups)
  core = normjax.batch_norm(axis=1, ghost_batch_size=4, ghost_grouping="strided")
  params, core_state = core.init(jnp.zeros((N, C, H, W)))
  for x in batches(2):
    y, state = batched(model)(x, state)
    y_core, core_state = core.apply(params, core_state, x, training=True)
    np.testing.assert_allclose(y, y_core, atol=3e-6, rtol=1e-5)
    assert_state_close(get(state, model), core_state)


def masks_for(steps=3, seed=3):
  """Per-example masks of shape (N, 1, H, W): unequal valid counts, example 1 dropped entirely."""
  out = []
  for k in jax.random.split(jax.random.key(seed), steps):
    mask = jax.random.bernoulli(k, 0.6, (N, 1, H, W))
    out.append(mask.at[1].set(False).at[0].set(True))
  return out


@pytest.mark.parametrize(
  "options",
  [{}, dict(ghost_batch_size=4), dict(unbiased_running_var=True)],
  ids=["plain", "ghost", "unbiased"],
)
def test_masks_give_exact_statistics_for_unequal_counts(options):
  masks = masks_for()
  model, state, core, params, out = run_both(masks=masks, **options)
  for _, y, s, y_core, s_core in out:
    np.testing.assert_allclose(y, y_core, atol=3e-6, rtol=1e-5)
    assert_state_close(s, s_core)
  if not options:  # float64 reference over the valid elements only
    x, y = out[0][0], out[0][1]
    mask = np.asarray(masks[0])
    mean, var, count = np_moments(x, mask)
    assert count.tolist() == [int(mask.sum())] * C
    np.testing.assert_allclose(y, np_normalize(x, mean, var, model.weight, model.bias), atol=3e-5)


def test_a_fully_masked_batch_changes_nothing_the_core_would_not():
  masks = [jnp.zeros((N, 1, H, W), bool)]
  _, _, _, _, out = run_both(steps=1, masks=masks, ghost_batch_size=2)
  assert_state_close(out[0][2], out[0][4])
  assert np.isfinite(np.asarray(out[0][1])).all()


def test_tuple_axis_names_pool_every_named_axis():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, ("outer", "batch"), momentum=0.9)
  x = batches(1)[0]
  inner = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  y, state = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))(
    x.reshape(2, 4, C, H, W), state
  )
  core = normjax.batch_norm(axis=1, momentum=0.9)
  params, core_state = core.init(x)
  y_core, core_state = core.apply(params, core_state, x, training=True)
  np.testing.assert_allclose(y.reshape(x.shape), y_core, atol=2e-6)
  assert_state_close(get(state, model), core_state)


def test_gradients_equal_the_core_on_the_stacked_batch():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", ghost_batch_size=4)
  model = with_random_affine(model)
  core = normjax.batch_norm(axis=1, ghost_batch_size=4)
  x = batches(1)[0]
  target = jax.random.normal(jax.random.key(5), x.shape)
  _, core_state = core.init(x)

  def loss_face(m, x):
    y, _ = batched(m)(x, state)
    return jnp.sum(y * target)

  def loss_core(params, x):
    y, _ = core.apply(params, core_state, x, training=True)
    return jnp.sum(y * target)

  g_model = eqx.filter_jit(eqx.filter_grad(loss_face))(model, x)
  g_params, g_x_core = jax.grad(loss_core, argnums=(0, 1))(core_params(model), x)
  g_x = jax.grad(loss_face, argnums=1)(model, x)
  np.testing.assert_allclose(g_model.weight, g_params["scale"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_model.bias, g_params["bias"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_x, g_x_core, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g_x).max()) > 0.1


def test_in_a_sequential_model_under_filter_jit_with_inference_mode():
  key1, key2 = jax.random.split(jax.random.key(0))
  model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    [
      eqx.nn.Conv2d(C, 4, 3, padding=1, key=key1),
      nje.BatchNorm(4, "batch"),
      eqx.nn.Lambda(jax.nn.relu),
      nje.GroupNorm(2, 4),
      eqx.nn.Conv2d(4, 2, 1, key=key2),
    ]
  )
  x = batches(1)[0]

  @eqx.filter_jit
  def step(model, state, x):
    return batched(model)(x, state)

  y, state = step(model, state, x)
  assert y.shape == (N, 2, H, W) and int(state.get(model.layers[1].state_index).count) == 1
  evaluation = eqx.nn.inference_mode(model)
  assert evaluation.layers[1].inference is True
  y_eval, state_eval = step(evaluation, state, x)
  assert int(state_eval.get(model.layers[1].state_index).count) == 1
  assert not np.allclose(y_eval, y)


# --- mode flags -----------------------------------------------------------------------------------


def test_inference_flag_attribute_argument_and_refusals():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch")
  x = batches(1)[0]
  single = model(x[0], state, inference=True)[0]  # inference needs no bound axis
  np.testing.assert_allclose(single, x[0] / np.sqrt(1 + 1e-5), rtol=1e-6)
  y_eval, same = batched(eqx.nn.inference_mode(model))(x, state)
  assert int(get(same, model).count) == 0
  y_train, trained = jax.vmap(
    lambda xi, s: eqx.nn.inference_mode(model)(xi, s, inference=False),
    axis_name="batch",
    in_axes=(0, None),
    out_axes=(0, None),
  )(x, state)
  assert int(get(trained, model).count) == 1
  for bad in ("yes", 1, jnp.array(True)):
    with pytest.raises(TypeError) as excinfo:
      model(x[0], state, inference=bad)
    with pytest.raises(TypeError) as expected:
      modes.check_flag(bad, "inference")
    assert str(excinfo.value) == str(expected.value)
    with pytest.raises(TypeError, match="inference="):
      nje.BatchNorm(C, "batch", inference=bad)
  assert model(x[0], state, inference=np.bool_(True))[0].shape == (C, H, W)
  undecided = nje.BatchNorm(C, "batch", inference=None)
  with pytest.raises(ValueError, match="no mode given"):
    undecided(x[0], eqx.nn.State(undecided))


# --- options, signature and errors ----------------------------------------------------------------

NON_DEFAULT = dict(
  debias=True,
  unbiased_running_var=True,
  use_scale=False,
  use_bias=False,
  stats_method="two_pass",
  axis_index_groups=[[0, 1], [2, 3]],
  ghost_batch_size=2,
  ghost_grouping="strided",
  renorm=True,
  r_max=2.0,
  d_max=1.0,
  check_finite=True,
)


def test_every_core_option_is_reachable():
  """Each BatchNormConfig field is a normjax keyword, an Equinox argument, or fixed by the layout: a new
  core option the face cannot take fails here."""
  fields = {f.name: f for f in dataclasses.fields(bn_lib.BatchNormConfig)}
  renamed = {
    "epsilon": ("eps", 1e-3),
    "param_dtype": ("dtype", jnp.bfloat16),
    "dtype": ("output_dtype", jnp.float16),
    "momentum": ("momentum", 0.5),
    "axis_name": ("axis_name", "devices"),
  }
  assert set(eqx_bn.RENAMED_OPTIONS) | set(eqx_bn.NAMED_OPTIONS) == set(renamed)
  assert set(eqx_bn.FIXED_OPTIONS) == {"axis"}
  for name, field in fields.items():
    if name in eqx_bn.FIXED_OPTIONS:
      assert nje.BatchNorm(4, "b").config.axis == 1  # channels first, batch of one
      continue
    if name in renamed:
      argument, value = renamed[name]
      kwargs = {argument: value}
      kwargs.setdefault("axis_name", "b")
      layer = nje.BatchNorm(4, **kwargs)
      assert getattr(layer.config, name) == (jnp.dtype(value) if "dtype" in name else value), name
      continue
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    value = NON_DEFAULT.get(name, default)
    if name == "axis_index_groups":
      value_config = tuple(tuple(g) for g in value)
      layer = nje.BatchNorm(4, "b", **{name: value})
      assert layer.config.axis_index_groups == value_config
      continue
    kwargs = {name: value}
    if name == "ghost_grouping":
      kwargs["ghost_batch_size"] = 2
    layer = nje.BatchNorm(4, "b", **kwargs)
    assert getattr(layer.config, name) == value, name
  assert set(eqx_bn.passthrough_options()) | set(renamed) | {"axis"} == set(fields)


def test_signature_starts_with_equinox_batch_norm_arguments():
  ours = list(inspect.signature(nje.BatchNorm.__init__).parameters)
  theirs = list(inspect.signature(eqx.nn.BatchNorm.__init__).parameters)
  assert ours[: len(theirs)] == theirs
  call = list(inspect.signature(nje.BatchNorm.__call__).parameters)
  assert call[:5] == list(inspect.signature(eqx.nn.BatchNorm.__call__).parameters)


def test_dtype_is_the_parameter_dtype_and_state_stays_float32():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", dtype=jnp.bfloat16)
  assert model.weight.dtype == jnp.bfloat16 and model.bias.dtype == jnp.bfloat16
  assert get(state, model).mean.dtype == jnp.float32
  x = batches(1)[0].astype(jnp.bfloat16)
  y, state = batched(model)(x, state)
  assert y.dtype == jnp.bfloat16 and get(state, model).var.dtype == jnp.float32
  mean, var, _ = np_moments(np.asarray(x, np.float32))
  np.testing.assert_allclose(get(state, model).mean, 0.01 * mean, rtol=1e-3)
  wide, wide_state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", output_dtype=jnp.float32)
  assert batched(wide)(x, wide_state)[0].dtype == jnp.float32
  assert nje.BatchNorm(C, "batch").weight.dtype == jnp.float32  # Equinox's default (no x64)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(mode="ema"), ValueError, "mode='ema' is not supported.*mode='batch'"),
    (dict(mode="legacy"), ValueError, "mode='legacy' is not supported.*mode='batch'"),
    (dict(mode="bach"), ValueError, "mode='bach' must be 'batch'"),
    (dict(mode="batch", renorm=True), ValueError, "renorm=True.*mode=None"),
    (dict(mode="batch", debias=True), ValueError, "debias=True"),
    (dict(mode="batch", momentum=None), ValueError, "momentum=None"),
    (dict(epsilon=1e-3), TypeError, "epsilon= is spelt eps="),
    (dict(param_dtype=jnp.float16), TypeError, "param_dtype= is spelt dtype="),
    (dict(axis=-1), TypeError, "axis=-1 cannot be set: the channel axis is axis 0"),
    (dict(ghost_size=2), TypeError, "unknown option ghost_size=2"),
    (dict(ghost_batch_size=2, axis_index_groups=[[0, 1]]), ValueError, "give one"),
    (dict(channelwise_affine=1), TypeError, "channelwise_affine=1 must be a bool"),
    (dict(momentum=1.5), ValueError, "momentum=1.5"),
    (dict(eps=0.0), ValueError, "epsilon=0.0"),
  ],
)
def test_bad_construction_raises_clearly(kwargs, error, match):
  kwargs = {"axis_name": "batch", **kwargs}
  with pytest.raises(error, match=match):
    nje.BatchNorm(C, **kwargs)


def test_bad_construction_arguments():
  with pytest.raises(ValueError, match="input_size=0 must be a positive int"):
    nje.BatchNorm(0, "batch")
  with pytest.raises(ValueError, match="axis_name=None"):
    nje.BatchNorm(C, None)


def test_bad_calls_raise_clearly():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", ghost_batch_size=3)
  x = batches(1)[0]
  with pytest.raises(ValueError, match=r"ghost_batch_size=3 must divide the batch size 8"):
    batched(model)(x, state)
  plain, plain_state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch")
  with pytest.raises(NameError, match="axis_name='batch' is not bound.*jax.vmap"):
    plain(x[0], plain_state)
  with pytest.raises(
    ValueError,
    match=r"x has shape \(8, 3, 4, 4\); expected one example of shape "
    r"\(3, ",
  ):
    plain(x, plain_state, inference=True)
  with pytest.raises(TypeError, match="x has dtype int32"):
    plain(jnp.ones((C, 2), jnp.int32), plain_state, inference=True)
  with pytest.raises(ValueError, match="mask of shape"):
    plain(x[0], plain_state, inference=True, mask=jnp.ones((5,), bool))
  with pytest.raises(ValueError, match="mask of shape"):
    plain(x[0], plain_state, inference=True, mask=jnp.ones((H, W), bool))  # not right-aligned


def test_a_scalar_mask_drops_whole_examples():
  model, state = eqx.nn.make_with_state(nje.BatchNorm)(C, "batch", momentum=0.5)
  x = batches(1)[0]
  keep = jnp.arange(N) % 3 != 0
  _, state = jax.vmap(
    lambda xi, ki: model(xi, state, mask=ki), axis_name="batch", out_axes=(0, None)
  )(x, keep)
  mean, var, count = np_moments(np.asarray(x)[np.asarray(keep)])
  assert count.tolist() == [5 * H * W] * C
  np.testing.assert_allclose(get(state, model).mean, 0.5 * mean, rtol=1e-5)
  np.testing.assert_allclose(get(state, model).var, 0.5 + 0.5 * var, rtol=1e-5)


# --- feature norms against Equinox's own layers ---------------------------------------------------


def randomize(layer, seed=11):
  for name in ("weight", "bias"):
    value = getattr(layer, name)
    if value is not None:
      noise = 0.3 * jax.random.normal(
        jax.random.fold_in(jax.random.key(seed), len(name)), value.shape
      )
      layer = eqx.tree_at(lambda m, n=name: getattr(m, n), layer, value + noise)
  return layer


def same_params(ours, theirs):
  for name in ("weight", "bias"):
    if getattr(theirs, name) is not None:
      ours = eqx.tree_at(lambda m, n=name: getattr(m, n), ours, getattr(theirs, name))
  return ours


@pytest.mark.parametrize(
  "make",
  [
    lambda m: m.LayerNorm((4, 5)),
    lambda m: m.LayerNorm(5, use_bias=False, eps=1e-3),
    lambda m: m.RMSNorm((4, 5)),
    lambda m: m.RMSNorm(5, use_bias=False),
    lambda m: m.GroupNorm(2, 6),
    lambda m: m.GroupNorm(3, None, channelwise_affine=False),
  ],
  ids=["layer", "layer-nobias", "rms", "rms-nobias", "group", "group-noaffine"],
)
def test_feature_norms_match_equinox(make):
  theirs = randomize(make(eqx.nn))
  ours = same_params(make(nje), theirs)
  shape = getattr(theirs, "shape", None) or (6, 4, 4)
  x = jax.random.normal(jax.random.key(1), (3,) + tuple(shape)) * 2.0 + 3.0
  np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), atol=2e-6, rtol=1e-5)
  state = object()
  y, passed = ours(x[0], state)
  assert passed is state and y.shape == x[0].shape


def test_instance_norm_equals_equinox_group_norm_with_one_channel_per_group():
  theirs = randomize(eqx.nn.GroupNorm(4, 4))
  ours = same_params(nje.InstanceNorm(4), theirs)
  x = jax.random.normal(jax.random.key(2), (2, 4, 5, 5)) * 3.0 - 1.0
  np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), atol=2e-6, rtol=1e-5)


def test_layer_norm_mask_and_float64_reference():
  layer = nje.LayerNorm((4, 5))
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 5))) * 2 + 1e3
  mask = np.arange(20).reshape(4, 5) % 3 != 0
  y = layer(jnp.asarray(x, jnp.float32), mask=jnp.asarray(mask))
  valid = x[mask].astype(np.float64)
  expected = (x - valid.mean()) / np.sqrt(valid.var() + 1e-5)
  np.testing.assert_allclose(y, expected, atol=5e-4)


def test_feature_norm_errors_and_dtypes():
  with pytest.raises(ValueError, match=r"x has shape \(3, 4\); expected shape=\(4,\)"):
    nje.LayerNorm(4)(jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="groups=4 must divide channels=6"):
    nje.GroupNorm(4, 6)
  with pytest.raises(ValueError, match="channels=None with channelwise_affine=True"):
    nje.GroupNorm(2)
  with pytest.raises(ValueError, match=r"expected one example of shape \(6, \.\.\.\)"):
    nje.GroupNorm(2, 6)(jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="num_groups=0 must be a positive int"):
    nje.GroupNorm(0, None, channelwise_affine=False)
  layer = nje.RMSNorm(4, dtype=jnp.bfloat16)
  assert layer.weight.dtype == jnp.bfloat16 and layer.bias.dtype == jnp.bfloat16
  assert layer(jnp.ones(4, jnp.bfloat16)).dtype == jnp.bfloat16
  assert nje.LayerNorm(4, output_dtype=jnp.float32)(jnp.ones(4, jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize(
  "make",
  [
    lambda m: m.LayerNorm((4, 5)),
    lambda m: m.RMSNorm((4, 5)),
    lambda m: m.GroupNorm(2, 6),
    lambda m: m.InstanceNorm(6),
  ],
  ids=["layer", "rms", "group", "instance"],
)
def test_feature_norms_under_vmap_inside_shard_map_with_varying_axis_checks(make):
  """`vmap` over examples inside `shard_map(check_vma=True)` on 8 CPU devices: compiles (it raised
  "requires varying manual axes to match" when the CPU lowering's conditional was traced under vmap)
  and equals Equinox's own layer, also at mean 1e3."""
  from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  theirs = randomize(make(eqx.nn)) if not isinstance(make(nje), nje.InstanceNorm) else None
  ours = make(nje) if theirs is None else same_params(make(nje), theirs)
  shape = getattr(ours, "shape", None) or (6, 3, 3)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  x = jax.random.normal(jax.random.key(4), (16,) + tuple(shape)) * 2.0 + 1e3
  run = jax.jit(jax.shard_map(jax.vmap(ours), mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  got = np.asarray(run(x), np.float64)
  x64 = np.asarray(x, np.float64)
  if theirs is not None:
    np.testing.assert_allclose(got, jax.vmap(theirs)(x), atol=1e-3, rtol=1e-3)
  if isinstance(ours, nje.InstanceNorm):  # float64: each channel of each example
    mean, var = x64.mean((2, 3), keepdims=True), x64.var((2, 3), keepdims=True)
    np.testing.assert_allclose(got, (x64 - mean) / np.sqrt(var + 1e-5), atol=2e-3)


def test_statistics_under_vmap_skip_the_cpu_conditional():
  """Under `vmap` a conditional computes both branches (a select), so `moments` takes the portable
  one-pass program there: no `cond` in the jaxpr, and the same statistics as without vmap."""
  from normjax._src import compat  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(5), (3, 32, 8)) + 1e3
  seen = []

  def moments(v):
    seen.append(compat.is_batched(v))
    return normjax.moments(v, (0, 1))

  jaxpr = str(jax.make_jaxpr(jax.vmap(moments))(x[:, None]))
  assert seen == [True] and "cond[" not in jaxpr, jaxpr
  assert not compat.is_batched(x)
  batched = jax.vmap(moments)(x[:, None])
  for i in range(3):
    one = normjax.moments(x[i][None], (0, 1))
    np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-6)
    np.testing.assert_allclose(batched[1][i], one[1], rtol=2e-4)
