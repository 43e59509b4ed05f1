"""normjax.linen: parity with flax.linen, drop-in use in flax-style models, checkpoints both ways,
mode flags, init semantics, variants."""

import dataclasses
import functools
import subprocess
import sys
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import optax
import pytest

import normjax
import normjax.linen as njl
from normjax._src import batch_norm as bn_lib
from normjax._src import feature_norms as fn_lib
from normjax._src import frozen_batch_norm as fbn_lib
from normjax._src import virtual_batch_norm as vbn_lib
from tests import helpers


_data = helpers.normal_data


@pytest.mark.parametrize(
  "options",
  [
    dict(momentum=0.9, axis=-1),
    dict(momentum=0.5, axis=1, epsilon=1e-3),
    dict(momentum=0.99, use_scale=False),
    dict(momentum=0.8, axis=(1, 3)),
  ],
)
def test_linen_matches_flax_linen_with_fast_statistics(options):
  flax_options = dict(options)
  ours = njl.BatchNorm(stats_method="fast", **options)
  theirs = nn.BatchNorm(**flax_options)
  x0 = _data((8, 3, 4, 5))
  v_ours = ours.init(jax.random.key(0), x0, training=True)
  v_theirs = theirs.init(jax.random.key(0), x0, use_running_average=False)
  np.testing.assert_allclose(v_ours["params"]["bias"], v_theirs["params"]["bias"])
  for step in range(3):
    x = _data((8, 3, 4, 5), mean=step, std=1 + step, seed=step)
    y1, u1 = ours.apply(v_ours, x, training=True, mutable=["batch_stats"])
    y2, u2 = theirs.apply(v_theirs, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
      np.testing.assert_allclose(u1["batch_stats"][k], u2["batch_stats"][k], rtol=1e-6, atol=1e-7)
    v_ours = {**v_ours, **u1}
    v_theirs = {**v_theirs, **u2}
  assert int(v_ours["batch_stats"]["count"]) == 3
  y1 = ours.apply(v_ours, x0, training=False)
  y2 = theirs.apply(v_theirs, x0, use_running_average=True)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)


def test_init_neither_updates_statistics_nor_needs_a_bound_axis_name():
  layer = njl.BatchNorm(axis_name="batch")
  x = _data((1, 3), mean=7.0)  # one example: training statistics would be undefined
  variables = layer.init(jax.random.key(0), x, training=True)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
  assert int(variables["batch_stats"]["count"]) == 0
  assert jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), variables["batch_stats"]) == {
    "count": ((), jnp.int32),
    "mean": ((3,), jnp.float32),
    "var": ((3,), jnp.float32),
  }


def test_linen_synchronized_under_shard_map_equals_global():
  x = _data((32, 4), mean=3.0, std=2.0)
  layer = njl.BatchNorm(axis_name="batch", momentum=0.5)
  variables = layer.init(jax.random.key(0), x, training=True)
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))

  def local(variables, x):
    y, updates = layer.apply(variables, x, training=True, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  y, stats = jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
  )(variables, jnp.asarray(x))
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(
    y, (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(stats["mean"], 0.5 * x64.mean(0), rtol=1e-5)


def test_linen_variants_match_the_functional_transforms():
  x = _data((16, 3), mean=1.0, std=2.0)
  cases = [
    (njl.GhostBatchNorm(ghost_batch_size=4), normjax.ghost_batch_norm(4)),
    (njl.BatchRenorm(r_max=2.0, d_max=1.0), normjax.batch_renorm(r_max=2.0, d_max=1.0)),
  ]
  for module, transform in cases:
    variables = module.init(jax.random.key(0), x, training=True)
    params, state = transform.init(x)
    state = state._replace(mean=state.mean + 1.5)
    variables = {"params": variables["params"], "batch_stats": state._asdict()}
    y1, u1 = module.apply(variables, x, training=True, mutable=["batch_stats"])
    y2, s2 = transform.apply(params, state, x, training=True)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u1["batch_stats"]["var"], s2.var, rtol=1e-5, atol=1e-6)


def test_linen_renorm_with_a_schedule_initializes_and_trains_under_jit():
  """Schedules are checked at step 0 when the config is built, also when that happens inside jit."""
  clip = normjax.batch_renorm_paper_schedule(warmup_steps=2, r_max_steps=4, d_max_steps=3)
  module = njl.BatchRenorm(r_max=clip.r_max, d_max=clip.d_max, ghost_batch_size=4)
  x = _data((16, 3), mean=1.0, std=2.0)
  variables = jax.jit(lambda k: module.init(k, x, training=False))(jax.random.key(0))
  y, updates = jax.jit(lambda v: module.apply(v, x, training=True, mutable=["batch_stats"]))(
    variables
  )
  # Step 0 of the schedule: r_max = 1, d_max = 0, i.e. plain ghost BatchNorm.
  y_ghost, _ = normjax.ghost_batch_norm(4).apply(
    *normjax.ghost_batch_norm(4).init(x), x, training=True
  )
  np.testing.assert_allclose(y, y_ghost, rtol=1e-5, atol=1e-5)
  assert int(updates["batch_stats"]["count"]) == 1
  with pytest.raises(ValueError, match="r_max"):
    jax.jit(
      lambda k: njl.BatchRenorm(r_max=lambda step: 0.5 + 0 * step).init(k, x, training=False)
    )(jax.random.key(0))


def test_linen_virtual_batch_norm_uses_the_init_batch_as_reference():
  reference, x = _data((64, 3), mean=2.0), _data((4, 3), seed=3)
  module = njl.VirtualBatchNorm()
  variables = module.init(jax.random.key(0), reference, training=False)
  vbn = normjax.virtual_batch_norm()
  params, state = vbn.init(reference)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], state.mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    module.apply(variables, x, training=True),
    vbn.apply(params, state, x, training=True)[0],
    rtol=1e-5,
    atol=1e-6,
  )


# --- drop-in: flax's ImageNet ResNet written with functools.partial(nn.BatchNorm, ...) -------------


class _Block(nn.Module):
  """flax examples/imagenet's ResNetBlock (smaller): the last BN of the block starts at scale 0."""

  filters: int
  norm: Any
  strides: Tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj")(
        residual
      )
      residual = self.norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class _ResNet(nn.Module):
  batch_norm: Any  # nn.BatchNorm or njl.BatchNorm: the only difference between the two models
  options: Tuple[Tuple[str, Any], ...] = ()

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(
      self.batch_norm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=jnp.float32,
      axis_name="batch",
      **dict(self.options),
    )
    x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = _Block(8, norm)(x)
    x = _Block(16, norm, strides=(2, 2))(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _images(n=32, seed=0, mean=10.0):
  rng = np.random.default_rng(seed)
  x = (mean + rng.standard_normal((n, 8, 8, 3))).astype(np.float32)  # |mean| = 10 std
  return jnp.asarray(x), jnp.asarray(rng.integers(0, 10, n))


def _train_step(model, variables, x, labels, n_devices):
  def loss_fn(params):
    logits, updates = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() / n_devices
    return loss, (logits, updates["batch_stats"])

  grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(variables["params"])
  return logits, batch_stats, grads


def _train_shard_map(model, variables, steps=3, lr=0.1):
  mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))

  def local(variables, x, labels):  # replicated params: their gradients arrive summed over devices
    logits, batch_stats, grads = _train_step(model, variables, x, labels, 8)
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, variables["params"], grads)
    return logits, {"params": params, "batch_stats": batch_stats}

  step = jax.jit(
    jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=(P("batch"), P())
    )
  )
  for i in range(steps):
    logits, variables = step(variables, *_images(seed=i))
  return logits, variables


def _train_pmap(model, variables, steps=3, lr=0.1):
  def local(variables, x, labels):
    logits, batch_stats, grads = _train_step(model, variables, x, labels, 1)
    grads = jax.lax.pmean(grads, "batch")
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, variables["params"], grads)
    return logits, {"params": params, "batch_stats": batch_stats}

  step = jax.pmap(local, axis_name="batch")
  replicated = jax.tree_util.tree_map(lambda v: jnp.stack([v] * 8), variables)
  for i in range(steps):
    x, labels = _images(seed=i)
    logits, replicated = step(replicated, x.reshape(8, 4, 8, 8, 3), labels.reshape(8, 4))
  return logits.reshape(32, 10), jax.tree_util.tree_map(lambda v: v[0], replicated)


def _assert_same(ours, theirs, rtol, atol):
  """Equal predictions, parameters and running mean/var; normjax's extra `count` is 3 (3 steps)."""
  (logits_a, va), (logits_b, vb) = ours, theirs
  np.testing.assert_allclose(logits_a, logits_b, rtol=rtol, atol=atol)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(va["params"]), jax.tree_util.tree_leaves(vb["params"])
  ):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
  stats_a = njl.to_flax_variables({"batch_stats": va["batch_stats"]})["batch_stats"]
  assert jax.tree_util.tree_structure(stats_a) == jax.tree_util.tree_structure(vb["batch_stats"])
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(stats_a), jax.tree_util.tree_leaves(vb["batch_stats"])
  ):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
  counts = [
    v for p, v in jax.tree_util.tree_leaves_with_path(va["batch_stats"]) if "count" in str(p)
  ]
  assert counts and all(int(c) == 3 for c in counts)


def _eval(model, variables):
  x, _ = _images(seed=9)
  return model.apply(variables, x, train=False)


# (normjax options, flax options, tolerance): normjax's default statistics against flax's default E[x²]−
# E[x]² (which is itself off by ~2e-5 at |mean| = 10 std), against flax's two-pass variance, and
# normjax's "fast" statistics against flax's own to float32 rounding.
_DROP_IN_CASES = [
  ((), (), 1e-4),
  ((), (("use_fast_variance", False),), 1e-5),
  ((("stats_method", "fast"),), (), 2e-6),
]


@pytest.mark.parametrize("ours_options, flax_options, tol", _DROP_IN_CASES)
@pytest.mark.parametrize("train", [_train_shard_map, _train_pmap], ids=["shard_map", "pmap"])
def test_drop_in_resnet_trains_like_flax(train, ours_options, flax_options, tol):
  ours, theirs = _ResNet(njl.BatchNorm, ours_options), _ResNet(nn.BatchNorm, flax_options)
  x, _ = _images()
  v_ours = ours.init(jax.random.key(0), x, train=False)
  v_theirs = theirs.init(jax.random.key(0), x, train=False)
  _assert_tree_close(njl.to_flax_variables(v_ours), v_theirs, 0.0)  # same init, same layout
  result_ours, result_theirs = train(ours, v_ours), train(theirs, v_theirs)
  _assert_same(result_ours, result_theirs, rtol=tol, atol=tol)
  np.testing.assert_allclose(
    _eval(ours, result_ours[1]), _eval(theirs, result_theirs[1]), rtol=tol, atol=tol
  )


def _assert_tree_close(a, b, tol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_flax_checkpoint_trains_and_evaluates_in_normjax_and_converts_back():
  """flax's variables (no `count`) apply unchanged in both modes; normjax's convert with one call."""
  ours, theirs = _ResNet(njl.BatchNorm), _ResNet(nn.BatchNorm, (("use_fast_variance", False),))
  flax_variables = theirs.init(jax.random.key(1), _images()[0], train=False)
  logits_ours, v_ours = _train_shard_map(ours, flax_variables)
  logits_theirs, v_theirs = _train_shard_map(theirs, flax_variables)
  assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(v_theirs)  # no count
  _assert_tree_close(v_ours, v_theirs, 1e-5)
  np.testing.assert_allclose(_eval(ours, v_theirs), _eval(theirs, v_theirs), rtol=1e-5, atol=1e-5)
  normjax_variables = ours.init(jax.random.key(1), _images()[0], train=False)
  _, v_ours = _train_shard_map(ours, normjax_variables)
  np.testing.assert_allclose(
    _eval(theirs, njl.to_flax_variables(v_ours)), _eval(ours, v_ours), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "options",
  [dict(debias=True), dict(momentum=None), dict(renorm=True, r_max=lambda step: 1.0 + step)],
)
def test_count_free_variables_refuse_options_that_need_the_count(options):
  x = jnp.ones((4, 3))
  flax_variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="batch_stats has no 'count'"):
    njl.BatchNorm(**options).apply(flax_variables, x, training=True, mutable=["batch_stats"])


def test_mode_flags_follow_flax_merge_param():
  x = _data((8, 3), mean=2.0)
  variables = njl.BatchNorm().init(jax.random.key(0), x, training=False)
  batch = njl.BatchNorm().apply(variables, x, training=True, mutable=["batch_stats"])[0]
  running = njl.BatchNorm().apply(variables, x, training=False)
  for layer, kwargs, want in [
    (njl.BatchNorm(use_running_average=False), {}, batch),
    (njl.BatchNorm(use_running_average=np.bool_(True)), {}, running),
    (njl.BatchNorm(), dict(use_running_average=False), batch),
    (njl.BatchNorm(), dict(use_running_average=True), running),
  ]:
    y = layer.apply(variables, x, mutable=["batch_stats"], **kwargs)[0]
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    njl.BatchNorm().apply(variables, x, True), running, rtol=1e-6, atol=1e-6
  )
  for layer, kwargs in [
    (njl.BatchNorm(use_running_average=True), dict(use_running_average=True)),
    (njl.BatchNorm(use_running_average=True), dict(training=False)),
    (njl.BatchNorm(), dict(use_running_average=False, training=True)),
    (njl.BatchNorm(), {}),
  ]:
    with pytest.raises(ValueError, match="exactly one of use_running_average"):
      layer.apply(variables, x, mutable=["batch_stats"], **kwargs)


@pytest.mark.parametrize("flag", ["no", "False", 1, 0.0, jnp.bool_(True)])
@pytest.mark.parametrize(
  "module",
  [
    njl.BatchNorm,
    njl.GhostBatchNorm,
    njl.BatchRenorm,
    njl.FrozenBatchNorm,
    njl.VirtualBatchNorm,
    njl.LayerNorm,
  ],
)
def test_non_bool_mode_flags_are_refused(module, flag):
  x = _data((8, 3))
  variables = module().init(jax.random.key(0), x, training=False)
  names = ["training"] if module is njl.LayerNorm else ["training", "use_running_average"]
  for name in names:
    with pytest.raises(TypeError, match=f"{name}=.* must be a Python or NumPy bool"):
      module().apply(variables, x, mutable=["batch_stats"], **{name: flag})


def test_scale_and_bias_init_are_flax_initializers():
  x = _data((4, 2, 2, 6))
  for module in (
    njl.BatchNorm,
    njl.LayerNorm,
    njl.FrozenBatchNorm,
    njl.VirtualBatchNorm,
    lambda **kw: njl.GroupNorm(num_groups=2, **kw),
  ):
    variables = module(
      scale_init=nn.initializers.constant(2.0), bias_init=nn.initializers.constant(-1.0)
    ).init(jax.random.key(0), x, training=False)
    np.testing.assert_array_equal(variables["params"]["scale"], np.full(6, 2.0, np.float32))
    np.testing.assert_array_equal(variables["params"]["bias"], np.full(6, -1.0, np.float32))


def test_lazy_faces_import_no_framework():
  code = (
    "import sys, normjax; assert not any(m.split('.')[0] in ('flax', 'equinox') for m in "
    "sys.modules), 'import normjax imported a framework'; normjax.linen.BatchNorm; "
    "assert 'flax' in sys.modules; normjax.nnx.BatchNorm; print('ok')"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
  with pytest.raises(AttributeError, match="no attribute 'lineen'"):
    _ = normjax.lineen


def _field_names(module_cls):
  return {f.name for f in dataclasses.fields(module_cls)}


@pytest.mark.parametrize(
  "module, config, fixed",
  [
    (njl.BatchNorm, bn_lib.BatchNormConfig, ()),
    (njl.GhostBatchNorm, bn_lib.BatchNormConfig, ()),
    (njl.BatchRenorm, bn_lib.BatchNormConfig, ()),
    (njl.FrozenBatchNorm, fbn_lib.FrozenBatchNormConfig, ()),
    (njl.VirtualBatchNorm, vbn_lib.VirtualBatchNormConfig, ()),
    (njl.LayerNorm, fn_lib.FeatureNormConfig, ("kind", "num_groups", "group_size")),
    (njl.RMSNorm, fn_lib.FeatureNormConfig, ("kind", "num_groups", "group_size", "use_bias")),
    (
      njl.InstanceNorm,
      fn_lib.FeatureNormConfig,
      ("kind", "num_groups", "group_size", "feature_axes"),
    ),
    (njl.GroupNorm, fn_lib.FeatureNormConfig, ("kind", "feature_axes")),
  ],
)
def test_every_core_option_is_a_linen_field(module, config, fixed):
  """An option added to a core config fails here until the linen face has it (`fixed`: set by the
  layer itself, e.g. `kind`; GroupNorm / InstanceNorm spell `feature_axes` as `axis`)."""
  missing = {f.name for f in dataclasses.fields(config)} - set(fixed) - _field_names(module)
  assert not missing, f"{module.__name__} lacks the core options {sorted(missing)}"


def test_linen_batch_norm_fields_follow_flax_order():
  """flax's fields come first and in flax's order, so positional use (`BatchNorm(True)`) matches."""
  flax_fields = [f for f in nn.BatchNorm.__dataclass_fields__ if f not in ("parent", "name")]
  ours = [f for f in njl.BatchNorm.__dataclass_fields__ if f not in ("parent", "name")]
  shared = [f for f in flax_fields if f in ours]
  assert ours[: len(shared)] == shared == flax_fields
  with pytest.raises(ValueError, match="force_float32_reductions=False"):
    njl.BatchNorm(False, force_float32_reductions=False).init(jax.random.key(0), jnp.ones((4, 3)))
