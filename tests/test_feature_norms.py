"""Layer / group / instance / RMS norm against float64 NumPy references written from the papers."""

import flax.linen as nn
from flax import nnx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import normjax
import normjax.linen as njl
import normjax.nnx as njn
from tests import helpers

EPS = 1e-5


_data = helpers.normal_data


def _params(shape, seed=3, bias=True):
  rng = np.random.default_rng(seed)
  p = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)}
  if bias:
    p["bias"] = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return p


# ---- float64 references, from the papers' equations ------------------------------------------------


def ref_layer_norm(x, reduce_axes, scale, bias, eps=EPS):
  """Ba et al. 2016, eq. (4): μ, σ over the hidden units of one example; y = g ⊙ (a − μ)/σ + b."""
  x = np.asarray(x, np.float64)
  mu = x.mean(axis=reduce_axes, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=reduce_axes, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def ref_group_norm(x, groups, scale, bias, eps=EPS):
  """Wu & He 2018, Fig. 3 (NHWC): reshape C into (G, C/G), moments over (H, W, C/G)."""
  x = np.asarray(x, np.float64)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mu = xg.mean(axis=axes, keepdims=True)
  var = xg.var(axis=axes, keepdims=True)
  return ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def ref_instance_norm(x, scale, bias, eps=EPS):
  """Ulyanov et al. 2016, eq. (2): per example and channel, moments over H, W."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(1, x.ndim - 1))
  mu = x.mean(axis=axes, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps) * scale + bias


def ref_rms_norm(x, reduce_axes, scale, eps=EPS):
  """Zhang & Sennrich 2019, eq. (4): ā = a / RMS(a) ⊙ g, RMS(a) = sqrt(mean(a²)) (+ ε inside)."""
  x = np.asarray(x, np.float64)
  return x / np.sqrt((x**2).mean(axis=reduce_axes, keepdims=True) + eps) * scale


def _fd_grad(f, x, dy, h=1e-6):
  """Central finite differences in float64 of <f(x), dy> with respect to x."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = ((f(x + e) - f(x - e)) * dy).sum() / (2 * h)
  return g


CASES = {
  "layer_last": (
    lambda: normjax.layer_norm(),
    (3, 2, 6),
    lambda x, p: ref_layer_norm(x, -1, np.asarray(p["scale"]), np.asarray(p["bias"])),
    (6,),
  ),
  "layer_hwc": (
    lambda: normjax.layer_norm(reduction_axes=(1, 2, 3), feature_axes=-1),
    (2, 3, 3, 4),
    lambda x, p: ref_layer_norm(x, (1, 2, 3), np.asarray(p["scale"]), np.asarray(p["bias"])),
    (4,),
  ),
  "group2": (
    lambda: normjax.group_norm(num_groups=2),
    (2, 3, 3, 4),
    lambda x, p: ref_group_norm(x, 2, np.asarray(p["scale"]), np.asarray(p["bias"])),
    (4,),
  ),
  "group_size2": (
    lambda: normjax.group_norm(group_size=2),
    (2, 2, 3, 6),
    lambda x, p: ref_group_norm(x, 3, np.asarray(p["scale"]), np.asarray(p["bias"])),
    (6,),
  ),
  "instance": (
    lambda: normjax.instance_norm(),
    (2, 3, 3, 3),
    lambda x, p: ref_instance_norm(x, np.asarray(p["scale"]), np.asarray(p["bias"])),
    (3,),
  ),
  "rms": (
    lambda: normjax.rms_norm(),
    (3, 2, 6),
    lambda x, p: ref_rms_norm(x, -1, np.asarray(p["scale"])),
    (6,),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grads_match_float64_reference(name):
  make, shape, ref, feature_shape = CASES[name]
  t = make()
  x, dy = _data(shape, mean=3.0, std=2.0), _data(shape, seed=1)
  params = _params(feature_shape, bias=name != "rms")
  _, state = t.init(x)
  assert state == normjax.EmptyState()
  y, new_state = jax.jit(lambda p, x: t.apply(p, state, x, training=True))(params, x)
  assert new_state == normjax.EmptyState() and y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref(x, params), rtol=1e-5, atol=1e-5)
  f = jax.jit(lambda x, p: t.apply(p, state, x, training=False)[0])
  dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, params) * dy)))(x)
  np.testing.assert_allclose(dx, _fd_grad(lambda x: ref(x, params), x, dy), rtol=1e-3, atol=1e-4)
  check_grads(f, (x, params), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_channels_first_group_norm_matches_reference():
  x = _data((2, 4, 3, 3), mean=1.0)
  gn = normjax.group_norm(num_groups=2, axis=1)
  params = _params((4,))
  y, _ = gn.apply(params, gn.init(x)[1], x, training=False)
  want = ref_group_norm(
    np.moveaxis(x, 1, -1), 2, np.asarray(params["scale"]), np.asarray(params["bias"])
  )
  np.testing.assert_allclose(y, np.moveaxis(want, -1, 1), rtol=1e-5, atol=1e-5)


def test_equivalences():
  x = _data((2, 4, 4, 6), mean=-2.0, std=3.0)
  params = _params((6,))
  run = lambda t: jax.jit(lambda p, x: t.apply(p, normjax.EmptyState(), x, training=False)[0])(  # noqa: E731
    params, x
  )
  np.testing.assert_allclose(
    run(normjax.layer_norm(reduction_axes=(1, 2, 3))),
    run(normjax.group_norm(num_groups=1)),
    rtol=1e-6,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    run(normjax.instance_norm()), run(normjax.group_norm(group_size=1)), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize(
  "ours, theirs",
  [
    (lambda: njl.LayerNorm(), lambda: nn.LayerNorm(epsilon=EPS)),
    (
      lambda: njl.LayerNorm(reduction_axes=(1, 2, 3)),
      lambda: nn.LayerNorm(epsilon=EPS, reduction_axes=(1, 2, 3)),
    ),
    (lambda: njl.GroupNorm(num_groups=2), lambda: nn.GroupNorm(num_groups=2, epsilon=EPS)),
    (
      lambda: njl.GroupNorm(group_size=1),
      lambda: nn.GroupNorm(num_groups=None, group_size=1, epsilon=EPS),
    ),
    (lambda: njl.RMSNorm(), lambda: nn.RMSNorm(epsilon=EPS)),
    (lambda: njl.InstanceNorm(), lambda: nn.InstanceNorm(epsilon=EPS)),
  ],
)
def test_linen_matches_flax(ours, theirs):
  x = _data((2, 3, 3, 4), mean=2.0, std=1.5)
  theirs_vars = theirs().init(jax.random.key(0), x)
  params = jax.tree_util.tree_map(lambda v: v + jnp.linspace(0.1, 0.4, v.shape[-1]), theirs_vars)
  ours_vars = ours().init(jax.random.key(0), x, training=False)
  assert jax.tree_util.tree_structure(ours_vars) == jax.tree_util.tree_structure(params)
  np.testing.assert_allclose(
    ours().apply(params, x, training=True), theirs().apply(params, x), rtol=1e-5, atol=1e-5
  )


def test_nnx_wrappers_match_pure_transforms():
  x = _data((2, 3, 3, 4), mean=1.0)
  rngs = nnx.Rngs(0)
  for module, t in [
    (njn.LayerNorm(4, rngs=rngs), normjax.layer_norm()),
    (njn.RMSNorm(4), normjax.rms_norm()),
    (njn.GroupNorm(4, num_groups=2), normjax.group_norm(num_groups=2)),
    (njn.InstanceNorm(4), normjax.instance_norm()),
  ]:
    params, state = t.init(x)
    np.testing.assert_allclose(
      module(x, training=True), t.apply(params, state, x, training=True)[0], rtol=1e-6, atol=1e-6
    )


def test_mask_excludes_elements_from_statistics():
  x = _data((3, 8), mean=1.0)
  mask = np.ones((3, 8), bool)
  mask[:, 5:] = False
  mask[1, 2:] = False
  x_masked = np.where(mask, x, 1e6).astype(np.float32)  # garbage in masked slots must not matter
  ln = normjax.layer_norm(use_scale=False, use_bias=False)
  y, _ = jax.jit(lambda x, m: ln.apply({}, normjax.EmptyState(), x, training=False, mask=m))(
    x_masked, jnp.asarray(mask)
  )
  for i in range(3):
    valid = x[i][mask[i]]
    want = ref_layer_norm(valid, -1, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(y[i])[mask[i]], want, rtol=1e-5, atol=1e-5)
  gn = normjax.group_norm(num_groups=2, use_scale=False, use_bias=False)
  xg = _data((2, 3, 4), mean=1.0)
  mask_g = np.ones((2, 3, 1), bool)
  mask_g[:, 2] = False
  y, _ = jax.jit(lambda x, m: gn.apply({}, normjax.EmptyState(), x, training=False, mask=m))(
    xg, jnp.asarray(mask_g)
  )
  want = ref_group_norm(xg[:, :2], 2, 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(y)[:, :2], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_uses_float32_statistics(dtype):
  x = _data((4, 64), mean=100.0, std=1.0)
  for t in (normjax.layer_norm(), normjax.rms_norm(), normjax.group_norm(num_groups=4)):
    params, state = t.init(x)
    f = jax.jit(lambda p, x, t=t: t.apply(p, state, x, training=False)[0])
    y = f(params, jnp.asarray(x, dtype))
    want = f(params, jnp.asarray(x, dtype).astype(jnp.float32))
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def test_jit_matches_eager_and_does_not_retrace():
  traces = []
  gn = normjax.group_norm(num_groups=2)

  @jax.jit
  def f(params, x):
    traces.append(1)
    return gn.apply(params, normjax.EmptyState(), x, training=True)[0]

  x = _data((2, 3, 4))
  params, _ = gn.init(x)
  eager = gn.apply(params, normjax.EmptyState(), x, training=True)[0]
  np.testing.assert_allclose(f(params, x), eager, rtol=1e-6, atol=1e-6)
  f(params, x + 1.0)
  assert len(traces) == 1


def test_bad_input_raises():
  x = jnp.ones((2, 3, 3, 6))
  with pytest.raises(ValueError, match=r"num_groups=4 must divide the number of channels 6"):
    normjax.group_norm(num_groups=4).init(x)
  with pytest.raises(ValueError, match=r"group_size=4 must divide the number of channels 6"):
    normjax.group_norm(group_size=4).apply(
      {"scale": jnp.ones(6), "bias": jnp.zeros(6)}, normjax.EmptyState(), x, training=False
    )
  with pytest.raises(ValueError, match="exactly one of num_groups"):
    normjax.group_norm(num_groups=2, group_size=3)
  with pytest.raises(ValueError, match="exactly one of num_groups"):
    normjax.group_norm()
  with pytest.raises(ValueError, match="num_groups=0 must be a positive int"):
    normjax.group_norm(num_groups=0)
  with pytest.raises(ValueError, match="reduction_axes=5 is out of range"):
    normjax.layer_norm(reduction_axes=5).init(x)
  with pytest.raises(ValueError, match="epsilon=-1"):
    normjax.layer_norm(epsilon=-1.0)
  with pytest.raises(TypeError, match="floating-point"):
    normjax.rms_norm().init(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"params\['scale'\] has shape"):
    normjax.layer_norm().apply(
      {"scale": jnp.ones(5), "bias": jnp.zeros(6)}, normjax.EmptyState(), x, training=False
    )
  with pytest.raises(TypeError, match="training"):
    normjax.layer_norm().apply(
      {"scale": jnp.ones(6), "bias": jnp.zeros(6)}, normjax.EmptyState(), x, training=None
    )


_GN = {
  g: jax.jit(
    lambda x, g=g: normjax.group_norm(
      num_groups=g, use_scale=False, use_bias=False, epsilon=1e-12
    ).apply({}, normjax.EmptyState(), x, training=False)[0]
  )
  for g in (1, 2, 3, 6)
}


@hypothesis.given(
  groups=st.sampled_from([1, 2, 3, 6]),
  seed=st.integers(0, 100),
  mean=st.floats(-1e3, 1e3),
  std=st.floats(0.1, 10.0),
)
def test_group_norm_property_standardizes_every_group(groups, seed, mean, std):
  spatial = 3
  x = _data((2, spatial, 3, 6), mean=mean, std=std, seed=seed)
  y = _GN[groups](x)
  yg = np.asarray(y, np.float64).reshape(2, spatial, 3, groups, 6 // groups)
  np.testing.assert_allclose(yg.mean(axis=(1, 2, 4)), 0.0, atol=2e-3)
  np.testing.assert_allclose(yg.var(axis=(1, 2, 4)), 1.0, rtol=2e-3)


_RMS = jax.jit(
  lambda x: normjax.rms_norm(epsilon=1e-12, use_scale=False).apply(
    {}, normjax.EmptyState(), x, training=False
  )[0]
)


@hypothesis.given(seed=st.integers(0, 100), scale=st.floats(1e-2, 1e3))
def test_rms_norm_property_scale_invariant(seed, scale):
  x = _data((3, 8), seed=seed)
  y1, y2 = _RMS(x), _RMS(x * np.float32(scale))
  np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.mean(np.square(np.asarray(y1, np.float64)), -1), 1.0, rtol=1e-4)


@pytest.mark.parametrize(
  "module",
  [njl.LayerNorm, njl.GroupNorm, njl.InstanceNorm, njl.RMSNorm, njl.FrozenBatchNorm, njl.BatchNorm],
)
def test_linen_norms_share_the_factory_call_signature(module):
  import inspect  # pylint: disable=import-outside-toplevel

  params = inspect.signature(module.__call__).parameters
  assert [p for p in params if p != "use_running_average"] == ["self", "x", "training", "mask"]
  assert params["training"].kind is inspect.Parameter.KEYWORD_ONLY
  assert params["training"].default is None and params["mask"].default is None
  if "use_running_average" in params:  # flax's positional flag, between x and the keywords
    assert list(params).index("use_running_average") == 2
