"""Executes docs/migration.md: every "after" block, and every "before" block whose peer is installed.

Each framework's pair of blocks runs two training steps on the batches `x`, `x2` given here and defines
`y_train` (the output of the second step), `y_eval` (evaluation on `x` afterwards), `running_mean` and
`running_var` (the stored statistics). The tests assert:

* after == a float64 NumPy reference of the peer's documented semantics (always);
* before == after, and before == the same reference (when the peer imports), which backs every mapping
  the README's semantics table claims with the peer's own behaviour;
* "load" blocks (peer checkpoint into normjax) and "export" blocks (normjax back to the peer) reproduce
  the trained layer's `y_eval`;
* PyTorch, which is not installed here, through its published numbers (a notebook printing
  `BatchNorm1d`'s running statistics, a blog post printing `BatchNorm2d`'s) reproduced by the reference
  and by normjax's PyTorch options; and through torch itself when it imports.

Tolerance: 1e-5, absolute and relative. Everything runs in float32, where one rounding is 6e-8
relative; the quantities here are of order 1 to 10 and come from sums of at most 128 elements computed
in different orders by each library, which leaves differences of a few 1e-7 (measured: at most
9.5e-7 between before and after blocks except Haiku's running variance, 1.9e-6, and 7.4e-6 between
Haiku's mapping and the float64 reference, both from the E[x²] − E[x]² variance Haiku uses).
A wrong convention moves them by far more: the smallest is Keras' momentum 0.99 after two steps, where
the old-vs-new momentum error would move `running_mean` by ~1, an epsilon of 1e-5 instead of 1e-3 moves
`y_train` by ~3e-4, and a biased instead of unbiased running variance moves PyTorch's by ~1e-3.
"""

import os
import pathlib
import re

os.environ.setdefault("KERAS_BACKEND", "jax")  # before any import of keras

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import normjax  # noqa: E402

# Keras 3.15's variables implement __array__ without numpy 2's `copy` keyword (its own warning).
pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "migration.md"
FRAMEWORKS = ("linen", "nnx", "haiku", "equinox", "pytorch", "keras")
KINDS = ("before", "after", "load", "export")
RESULTS = ("y_train", "y_eval", "running_mean", "running_var")
# The module each framework's "before" block needs.
PEERS = {
  "linen": "flax.linen",
  "nnx": "flax.nnx",
  "haiku": "haiku",
  "equinox": "equinox",
  "pytorch": "torch",
  "keras": "keras",
}
# What the "after" block needs besides normjax (its face).
FACES = {"linen": "flax.linen", "nnx": "flax.nnx", "equinox": "equinox"}
# The peer's semantics (documented defaults and the options the blocks set) for the NumPy reference.
SEMANTICS = {
  "linen": dict(momentum=0.9, eps=1e-5),
  "nnx": dict(momentum=0.9, eps=1e-5),
  "haiku": dict(momentum=0.9, eps=1e-5, debias=True),
  "equinox": dict(momentum=0.9, eps=1e-5, equinox_batch=True, channels_first=True),
  "pytorch": dict(momentum=0.9, eps=1e-5, unbiased=True, channels_first=True),  # torch's 0.1 = new
  "keras": dict(momentum=0.99, eps=1e-3),
}
RTOL = ATOL = 1e-5
FENCE = re.compile(r"^```python (\w+)-(\w+)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def blocks():
  """{(kind, framework): code} of every tagged python block of docs/migration.md."""
  found = {}
  for match in FENCE.finditer(DOC.read_text()):
    key = (match.group(1), match.group(2))
    assert key not in found, f"docs/migration.md has two {key[0]}-{key[1]} blocks"
    found[key] = match.group(3)
  return found


def batches():
  """The two float32 NHWC batches every block starts from (3 channels of different means/scales)."""
  rng = np.random.default_rng(12)
  loc, scale = np.array([0.5, -1.0, 3.0]), np.array([1.0, 2.0, 0.5])
  x = rng.standard_normal((8, 4, 4, 3)) * scale + loc
  x2 = rng.standard_normal((8, 4, 4, 3)) * 1.5 * scale + loc - 0.7
  return x.astype(np.float32), x2.astype(np.float32)


def run(kind, framework, namespace=None):
  """Executes one block in a copy of `namespace` (default: fresh `np`, `x`, `x2`); returns it."""
  code = blocks()[(kind, framework)]
  if namespace is None:
    x, x2 = batches()
    namespace = {"np": np, "x": x, "x2": x2}
  namespace = dict(namespace)
  code = compile(code, f"docs/migration.md[{kind}-{framework}]", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def results(namespace):
  return {name: np.asarray(namespace[name], np.float64) for name in RESULTS}


def reference(
  steps,
  eval_x,
  *,
  momentum,
  eps,
  unbiased=False,
  debias=False,
  equinox_batch=False,
  channels_first=False,
):
  """float64 BatchNorm of channels-last batches, scale 1 and bias 0, running mean 0 / variance 1.

  Training normalizes with the biased batch variance (Ioffe & Szegedy 2015, Alg. 1); the running
  statistics move as `momentum · old + (1 − momentum) · batch` (`momentum` = weight of the old value)
  towards the batch mean and the biased variance, or the Bessel-corrected n/(n−1) one (`unbiased`,
  PyTorch). `debias`: Haiku's zero-debiased EMA, a hidden average started at 0 and reported divided by
  1 − momentum^t. `equinox_batch`: Equinox's mode="batch", the stored (hidden) average starts at 0 / 1
  and inference divides it by 1 − momentum^t. Outputs are transposed to NCHW for `channels_first`.
  """
  channels = steps[0].shape[-1]
  mean, var = np.zeros(channels), np.ones(channels)
  hidden_mean, hidden_var = np.zeros(channels), np.zeros(channels)
  for t, batch in enumerate(steps, start=1):
    batch = np.asarray(batch, np.float64)
    axes = tuple(range(batch.ndim - 1))
    n = batch.size // channels
    mu, sigma2 = batch.mean(axes), batch.var(axes)
    y_train = (batch - mu) / np.sqrt(sigma2 + eps)
    target = sigma2 * n / (n - 1) if unbiased else sigma2
    if debias:
      hidden_mean = momentum * hidden_mean + (1 - momentum) * mu
      hidden_var = momentum * hidden_var + (1 - momentum) * target
      mean, var = hidden_mean / (1 - momentum**t), hidden_var / (1 - momentum**t)
    else:
      mean = momentum * mean + (1 - momentum) * mu
      var = momentum * var + (1 - momentum) * target
  eval_mean, eval_var = mean, var
  if equinox_batch:
    eval_mean, eval_var = mean / (1 - momentum ** len(steps)), var / (1 - momentum ** len(steps))
  y_eval = (np.asarray(eval_x, np.float64) - eval_mean) / np.sqrt(eval_var + eps)
  if channels_first:
    y_train, y_eval = (np.moveaxis(y, -1, 1) for y in (y_train, y_eval))
  return {"y_train": y_train, "y_eval": y_eval, "running_mean": mean, "running_var": var}


def expected(framework):
  x, x2 = batches()
  return reference([x, x2], x, **SEMANTICS[framework])


def import_peer(framework):
  module = pytest.importorskip(PEERS[framework])
  if framework == "keras" and module.backend.backend() != "jax":
    pytest.skip(f"keras runs on the {module.backend.backend()} backend, not jax")
  return module


def assert_close(actual, wanted, what):
  for name in wanted:
    np.testing.assert_allclose(
      actual[name], wanted[name], rtol=RTOL, atol=ATOL, err_msg=f"{what}: {name}"
    )


def test_every_framework_has_before_after_and_load_blocks():
  found = blocks()
  assert {kind for kind, _ in found} <= set(KINDS)
  assert {framework for _, framework in found} == set(FRAMEWORKS)
  for framework in FRAMEWORKS:
    for kind in ("before", "after", "load"):
      assert (kind, framework) in found, f"docs/migration.md lacks a {kind}-{framework} block"
  assert {fw for kind, fw in found if kind == "export"} == {"linen", "nnx"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_blocks_define_the_compared_names(framework):
  for kind in ("before", "after"):
    code = blocks()[(kind, framework)]
    for name in RESULTS:
      assert re.search(rf"\b{name}\b[^=\n]*=|\b{name}\s*=", code), f"{kind}-{framework}: no {name}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_after_block_matches_the_peers_semantics(framework):
  if framework in FACES:
    pytest.importorskip(FACES[framework])
  assert_close(results(run("after", framework)), expected(framework), f"after-{framework}")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_before_block_matches_after_block(framework):
  import_peer(framework)
  before = results(run("before", framework))
  assert_close(before, expected(framework), f"before-{framework} vs the NumPy reference")
  assert_close(before, results(run("after", framework)), f"before-{framework} vs after-{framework}")


def test_the_reference_tells_the_conventions_apart():
  """The tolerance is far below the effect of each convention the blocks map (the tests can fail)."""
  x, x2 = batches()
  base = dict(momentum=0.99, eps=1e-3)
  keras = reference([x, x2], x, **base)
  swapped = reference(
    [x, x2], x, **{**base, "momentum": 0.01}
  )  # momentum as the new value's weight
  assert np.abs(keras["running_mean"] - swapped["running_mean"]).max() > 0.5
  other_eps = reference([x, x2], x, **{**base, "eps": 1e-5})
  assert np.abs(keras["y_train"] - other_eps["y_train"]).max() > 100 * ATOL
  torch_like = reference([x, x2], x, momentum=0.9, eps=1e-5, unbiased=True)
  biased = reference([x, x2], x, momentum=0.9, eps=1e-5)
  assert np.abs(torch_like["running_var"] - biased["running_var"]).max() > 100 * ATOL
  haiku = reference([x, x2], x, momentum=0.9, eps=1e-5, debias=True)
  plain = reference([x, x2], x, momentum=0.9, eps=1e-5)
  assert np.abs(haiku["running_mean"] - plain["running_mean"]).max() > 0.1
  equinox = reference([x, x2], x, momentum=0.9, eps=1e-5, equinox_batch=True)
  assert np.abs(equinox["y_eval"] - plain["y_eval"]).max() > 0.1


def pytorch_state_dict_from_reference():
  """What `bn.state_dict()` holds after the before-pytorch block, from the NumPy reference."""
  ref = expected("pytorch")
  return {
    "weight": np.ones(3, np.float32),
    "bias": np.zeros(3, np.float32),
    "running_mean": ref["running_mean"].astype(np.float32),
    "running_var": ref["running_var"].astype(np.float32),
    "num_batches_tracked": np.asarray(2, np.int64),
  }


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_load_block_reproduces_the_trained_peer(framework):
  if framework == "pytorch" and importlib_util_missing("torch"):
    x, x2 = batches()
    namespace = {"np": np, "x": x, "x2": x2, "state_dict": pytorch_state_dict_from_reference()}
    wanted = expected("pytorch")["y_eval"]
  else:
    import_peer(framework)
    namespace = run("before", framework)
    wanted = np.asarray(namespace["y_eval"], np.float64)
  if framework in FACES:
    pytest.importorskip(FACES[framework])
  loaded = run("load", framework, namespace)
  np.testing.assert_allclose(
    np.asarray(loaded["y_eval_loaded"], np.float64), wanted, rtol=RTOL, atol=ATOL
  )


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_export_block_reproduces_the_trained_normjax_layer(framework):
  import_peer(framework)
  namespace = run("after", framework)
  exported = run("export", framework, namespace)
  np.testing.assert_allclose(
    np.asarray(exported["y_eval_loaded"], np.float64),
    np.asarray(namespace["y_eval"], np.float64),
    rtol=RTOL,
    atol=ATOL,
  )


def importlib_util_missing(name):
  import importlib.util  # pylint: disable=import-outside-toplevel

  return importlib.util.find_spec(name) is None


# PyTorch's published numbers. torch.nn.BatchNorm1d(3) trained on x1 then x2 (printed in the notebook
# "bn_train_eval.ipynb", git.blackhao.com/bilibili_vlogs_from_zch.git, learn_torch/tutorials): outputs
# and running statistics after each step, 4 decimals.
TORCH_1D_STEPS = [
  np.array([[2.0, 3.0, 1.0], [1.0, 3.0, 4.0]]),
  np.array([[0.0, 3.0, 0.0], [3.0, 2.0, 2.0]]),
]
TORCH_1D_RUNNING = [
  ([0.15, 0.30, 0.25], [0.95, 0.90, 1.35]),
  ([0.285, 0.52, 0.325], [1.305, 0.86, 1.415]),
]
TORCH_1D_OUTPUTS = [[[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]], [[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]]
# torch.nn.BatchNorm2d(1) trained on (1, 1, 1, 2) then (1, 1, 1, 3) batches (geekdaxue.co, "bn层,
# track机制实验"): running (mean, var) after each step.
TORCH_2D_STEPS = [np.array([[[[1.0, 2.0]]]]), np.array([[[[3.0, 4.0, 5.0]]]])]
TORCH_2D_RUNNING = [([0.15], [0.95]), ([0.535], [0.955])]
PUBLISHED_ATOL = 5e-5  # printed with 4 decimals: ±5e-5


def torch_mapping(momentum=0.1):
  """normjax's options for `torch.nn.BatchNorm*d(momentum=momentum)` (channels on axis 1)."""
  return normjax.batch_norm(
    axis=1,
    momentum=None if momentum is None else 1 - momentum,
    epsilon=1e-5,
    unbiased_running_var=True,
  )


def run_core(bn, steps):
  """[(y, mean, var)] after each training step of the functional core on float32 `steps`."""
  steps = [np.asarray(s, np.float32) for s in steps]
  params, state = bn.init(steps[0])
  out = []
  for batch in steps:
    y, state = bn.apply(params, state, batch, training=True)
    out.append((np.asarray(y), np.asarray(state.mean), np.asarray(state.var)))
  return out


def test_pytorch_published_numbers_batchnorm1d():
  ref = [
    reference(TORCH_1D_STEPS[:t], TORCH_1D_STEPS[0], momentum=0.9, eps=1e-5, unbiased=True)
    for t in (1, 2)
  ]
  ours = run_core(torch_mapping(), TORCH_1D_STEPS)
  for t in range(2):
    mean, var = TORCH_1D_RUNNING[t]
    np.testing.assert_allclose(ref[t]["running_mean"], mean, atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(ref[t]["running_var"], var, atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(ref[t]["y_train"], TORCH_1D_OUTPUTS[t], atol=PUBLISHED_ATOL)
    y, m, v = ours[t]
    np.testing.assert_allclose(m, mean, atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(v, var, atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(y, TORCH_1D_OUTPUTS[t], atol=PUBLISHED_ATOL)
  # The biased running variance (normjax's default) misses PyTorch's published numbers by 0.05.
  biased = run_core(normjax.batch_norm(axis=1, momentum=0.9), TORCH_1D_STEPS)
  assert np.abs(biased[0][2] - TORCH_1D_RUNNING[0][1]).max() > 0.04


def test_pytorch_published_numbers_batchnorm2d_unequal_batches():
  ours = run_core(torch_mapping(), TORCH_2D_STEPS)
  for (_, m, v), (mean, var) in zip(ours, TORCH_2D_RUNNING):
    np.testing.assert_allclose(m, mean, atol=PUBLISHED_ATOL)
    np.testing.assert_allclose(v, var, atol=PUBLISHED_ATOL)


def test_pytorch_cumulative_average_mapping():
  """PyTorch's momentum=None (documented: "cumulative moving average (i.e. simple average)") with its
  unbiased running variance: the running values are the plain averages of the steps' statistics."""
  steps = [np.moveaxis(s, 1, -1) for s in TORCH_2D_STEPS] + [np.array([[[[-1.0], [7.0]]]])]
  ours = run_core(torch_mapping(momentum=None), [np.moveaxis(s, -1, 1) for s in steps])
  means = [s.mean() for s in steps]
  variances = [s.var(ddof=1) for s in steps]
  for t, (_, m, v) in enumerate(ours, start=1):
    np.testing.assert_allclose(m, [np.mean(means[:t])], rtol=1e-6)
    np.testing.assert_allclose(v, [np.mean(variances[:t])], rtol=1e-6)
  np.testing.assert_allclose(ours[-1][1:], [[8.5 / 3], [(0.5 + 1.0 + 32.0) / 3]], rtol=1e-6)


def test_pytorch_itself_when_installed():
  torch = pytest.importorskip("torch")
  for momentum in (0.1, 0.3, None):
    bn_torch = torch.nn.BatchNorm2d(3, momentum=momentum)
    x, x2 = batches()
    steps = [s.transpose(0, 3, 1, 2).copy() for s in (x, x2)]
    ours = run_core(torch_mapping(momentum), steps)
    for batch, (y, m, v) in zip(steps, ours):
      y_torch = bn_torch(torch.from_numpy(batch)).detach().numpy()
      np.testing.assert_allclose(y, y_torch, rtol=RTOL, atol=ATOL)
      np.testing.assert_allclose(m, bn_torch.running_mean.numpy(), rtol=RTOL, atol=ATOL)
      np.testing.assert_allclose(v, bn_torch.running_var.numpy(), rtol=RTOL, atol=ATOL)


def initial_statistics(framework):
  """(mean, var) a freshly built peer layer would use in evaluation before any update."""
  x, _ = batches()
  if framework == "linen":
    import flax.linen as nn  # pylint: disable=import-outside-toplevel

    stats = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)["batch_stats"]
    return stats["mean"], stats["var"]
  if framework == "nnx":
    from flax import nnx  # pylint: disable=import-outside-toplevel

    layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    return layer.mean[...], layer.var[...]
  if framework == "haiku":  # init must see is_training=True: evaluation needs an existing average
    import haiku as hk  # pylint: disable=import-outside-toplevel

    model = hk.transform_with_state(
      lambda b: hk.BatchNorm(True, True, decay_rate=0.9)(b, is_training=True)
    )
    _, state = model.init(jax.random.key(0), x)
    return state["batch_norm/~/mean_ema"]["average"], state["batch_norm/~/var_ema"]["average"]
  if framework == "equinox":
    import equinox as eqx  # pylint: disable=import-outside-toplevel

    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    return state.get(model.batch_state_index)
  if framework == "keras":
    import keras  # pylint: disable=import-outside-toplevel

    layer = keras.layers.BatchNormalization()
    layer.build(x.shape)
    return layer.moving_mean.numpy(), layer.moving_variance.numpy()
  raise AssertionError(framework)


# The README's row "initial running mean / var" (Equinox: its hidden EMA; PyTorch: documented 0 / 1,
# torch not installed; Haiku: the statistics of the batch given to `init`, its counter at 0).
X_MEAN = batches()[0].astype(np.float64).mean((0, 1, 2))
X_VAR = batches()[0].astype(np.float64).var((0, 1, 2))
INITIAL = {
  "linen": (0.0, 1.0),
  "nnx": (0.0, 1.0),
  "haiku": (X_MEAN, X_VAR),
  "equinox": (0.0, 1.0),
  "keras": (0.0, 1.0),
}


@pytest.mark.parametrize("framework", sorted(INITIAL))
def test_initial_running_statistics(framework):
  import_peer(framework)
  mean, var = (np.asarray(v, np.float64).reshape(-1) for v in initial_statistics(framework))
  np.testing.assert_allclose(mean, np.broadcast_to(INITIAL[framework][0], (3,)), rtol=1e-5, atol=0)
  # Haiku's float32 E[x²] − E[x]² loses ~mean²/var · 6e-8 relative (channel 2: mean 3, std 0.5)
  np.testing.assert_allclose(var, np.broadcast_to(INITIAL[framework][1], (3,)), rtol=1e-4, atol=0)
  _, state = normjax.batch_norm().init(batches()[0])
  np.testing.assert_array_equal(np.asarray(state.mean), 0.0)
  np.testing.assert_array_equal(np.asarray(state.var), 1.0)


def test_haiku_before_the_first_update():
  """Haiku's `init(..., is_training=True)` stores the init batch's statistics as the averages, with
  counter 0 and hidden EMAs 0; evaluation before any update uses them, normjax's fresh state uses 0 / 1.
  Loaded into normjax (count 0), Haiku's state gives Haiku's numbers before and after updates: the
  debiased update ignores the stored value at count 0, as Haiku's ignores `average`."""
  hk = pytest.importorskip("haiku")
  x, x2 = batches()
  model = hk.transform_with_state(
    lambda b, training: hk.BatchNorm(True, True, decay_rate=0.9)(b, training)
  )
  params, hk_state = model.init(jax.random.key(0), x, True)
  bn = normjax.batch_norm(momentum=0.9, debias=True, stats_method="fast")
  nj_params, fresh = bn.init(x)

  def loaded(state):
    return normjax.BatchNormState(
      state["batch_norm/~/mean_ema"]["average"].reshape(-1),
      state["batch_norm/~/var_ema"]["average"].reshape(-1),
      state["batch_norm/~/mean_ema"]["counter"],
    )

  y_hk, _ = model.apply(params, hk_state, None, x2, False)
  np.testing.assert_allclose(y_hk, (x2 - X_MEAN) / np.sqrt(X_VAR + 1e-5), rtol=RTOL, atol=ATOL)
  y_fresh, _ = bn.apply(nj_params, fresh, x2, training=False)
  np.testing.assert_allclose(y_fresh, x2 / np.sqrt(1.0 + 1e-5), rtol=1e-6)
  assert np.abs(y_fresh - y_hk).max() > 1.0
  nj_state = loaded(hk_state)
  y_nj, _ = bn.apply(nj_params, nj_state, x2, training=False)
  np.testing.assert_allclose(y_nj, y_hk, rtol=RTOL, atol=ATOL)
  for batch in (x2, x):
    _, hk_state = model.apply(params, hk_state, None, batch, True)
    _, nj_state = bn.apply(nj_params, nj_state, batch, training=True)
    _, fresh = bn.apply(nj_params, fresh, batch, training=True)
    y_hk, _ = model.apply(params, hk_state, None, x2, False)
    for state in (nj_state, fresh):
      y_nj, _ = bn.apply(nj_params, state, x2, training=False)
      np.testing.assert_allclose(y_nj, y_hk, rtol=RTOL, atol=ATOL)


def test_cross_device_counts_flax_averages_device_means():
  """The README's row "cross-device counts": with 5 and 1 valid rows on two devices (a vmapped axis),
  flax's synchronized statistics are the mean of the two per-device means (flax#2417); normjax's are
  the statistics of the 6 valid rows. momentum=0 makes the running mean the batch mean."""
  nn = pytest.importorskip("flax.linen")
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((2, 6, 3)) + np.array([0.0, 4.0])[:, None, None]).astype(np.float32)
  mask = np.zeros((2, 6, 1), bool)
  mask[0, :5] = mask[1, :1] = True
  exact = x[np.broadcast_to(mask, x.shape)].reshape(-1, 3).astype(np.float64).mean(0)
  device_means = (x[0, :5].astype(np.float64).mean(0) + x[1, :1].astype(np.float64).mean(0)) / 2
  assert np.abs(exact - device_means).max() > 1.0
  layer = nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)
  variables = layer.init(jax.random.key(0), x[0])

  def flax_mean(xb, mb):
    return layer.apply(variables, xb, mask=mb, mutable=["batch_stats"])[1]["batch_stats"]["mean"]

  bn = normjax.batch_norm(axis_name="d", momentum=0.0)
  params, state = bn.init(x[0])

  def normjax_mean(xb, mb):
    return bn.apply(params, state, xb, training=True, mask=mb)[1].mean

  for step, wanted in ((flax_mean, device_means), (normjax_mean, exact)):
    means = np.asarray(jax.vmap(step, axis_name="d")(x, mask), np.float64)
    np.testing.assert_allclose(means, np.broadcast_to(wanted, means.shape), rtol=RTOL, atol=ATOL)
