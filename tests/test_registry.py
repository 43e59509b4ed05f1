"""Generic checks over every registry entry (`tests/registry.py`): every public constructor and face.

For each entry, in training and in evaluation:
  * jit equals eager, and a second jitted call (new input, the state the first returned) does not
    retrace (`chex.assert_max_traces`): the state's types, shapes and dtypes do not drift; one
    compiled function per entry serves both modes and the vmap check;
  * evaluation returns the state unchanged;
  * gradients are finite and equal float64 central finite differences (`jax.test_util.check_grads`,
    reverse mode, random directions) on a tiny input, in `entry.fd_modes` (the others: finite);
  * `jax.vmap` over a stack of inputs equals a loop over them;
  * bfloat16 input keeps float32 state and parameters (the parameters' declared dtype), through two
    applies;
  * the tree of parameters and state (names, shapes, dtypes; nnx variable types) and the outputs' dtype
    and shape match `tests/golden/state_trees.json`, so a change to a checkpoint format is a visible,
    deliberate diff. Regenerate it with `python tests/test_registry.py --update-golden` and review the
    diff.
A public name of `normjax`, `normjax.linen`, `normjax.nnx` or `normjax.equinox` that is neither covered
by an entry nor excluded with a reason in `registry.EXCLUDED` fails `test_every_public_name_is_covered`.
"""

import difflib
import functools
import json
import os
import pathlib
import sys

if __name__ == "__main__":  # `python tests/test_registry.py --update-golden`, from any directory
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chex  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
from jax.experimental import checkify  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import normjax  # noqa: E402
from tests import registry  # noqa: E402

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "state_trees.json"
NAMES = [e.name for e in registry.entries()]
MODES = {True: "training", False: "evaluation"}
# float64 central differences: the step and the tolerance on the directional derivatives.
FD_EPS, FD_TOL = 1e-6, 1e-6


def _setup(entry, dtype=jnp.float32, param_dtype=None):
  driver = entry.driver(param_dtype)
  x = entry.input(dtype)
  params, state = driver.init(x)
  return driver, x, params, state


def _both_modes(driver):
  """`{"training": (y, state), "evaluation": (y, state)}`: both modes from one state and input."""

  def run(params, state, x):
    return {mode: driver.apply(params, state, x, training=t) for t, mode in MODES.items()}

  return run


def _staged(entry, fn):
  """`fn` under `jax.jit`, failing on a second trace; through `checkify` where the entry needs it."""
  chex.clear_trace_counter()
  traced_once = chex.assert_max_traces(fn, n=1)
  if not entry.checkify:
    return jax.jit(traced_once)
  jitted = jax.jit(checkify.checkify(traced_once))

  def run(*args):
    error, out = jitted(*args)
    error.throw()
    return out

  return run


@functools.lru_cache(maxsize=None)
def _staged_results(name):
  """One compiled function per entry: both modes on `x`, and both modes vmapped over `[x, x2]`.

  Called twice (the second time with a new input and the state the first training call returned, so
  a drifted state type would retrace); the eager results of the same calls come with it.
  """
  entry = registry.by_name(name)
  driver, x, params, state = _setup(entry)
  x2 = entry.input(offset_shift=0.5)
  both = _both_modes(driver)

  def bundle(params, state, x, xs):
    return both(params, state, x), jax.vmap(lambda xi: both(params, state, xi))(xs)

  staged = _staged(entry, bundle)
  xs = jnp.stack([x, x2])
  first, mapped = staged(params, state, x, xs)
  trained = first["training"][1]
  second, _ = staged(params, trained, x2, xs)  # retraces, and fails, if the state's types drifted
  eager = {
    "first": both(params, state, x),
    "second": both(params, trained, x2),
    "x2": both(params, state, x2),
  }
  return dict(state=state, first=first, second=second, mapped=mapped, trained=trained, eager=eager)


def _is_float(leaf):
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _same_layout(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager_and_a_second_call_does_not_retrace(name):
  run = _staged_results(name)
  chex.assert_trees_all_close(run["first"], run["eager"]["first"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(run["second"], run["eager"]["second"], rtol=1e-5, atol=1e-5)
  for mode in MODES.values():
    _same_layout(run["second"][mode][1], run["state"])  # every dtype and shape kept by two applies
    _same_layout(run["second"][mode][0], run["first"][mode][0])
  chex.assert_tree_all_finite(run["second"])
  chex.assert_trees_all_equal(run["second"]["evaluation"][1], run["trained"])  # eval: state kept


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_a_loop(name):
  run = _staged_results(name)
  looped = jax.tree.map(lambda *v: jnp.stack(v), run["first"], run["eager"]["x2"])
  chex.assert_trees_all_close(run["mapped"], looped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_and_equal_float64_finite_differences(name):
  """Finite gradients in both modes; in `entry.fd_modes`, equal to central differences (random
  directions, `jax.test_util.check_grads`), all in float64 on the entry's small input."""
  entry = registry.by_name(name)
  with jax.enable_x64(True):
    driver, x, params, state = _setup(entry, jnp.float64, jnp.float64)
    for leaf in jax.tree.leaves((params, x)):
      assert jnp.result_type(leaf) == jnp.float64, "finite differences need float64 parameters"

    def outputs(params, x, modes):
      return [driver.apply(params, state, x, training=t)[0] for t in modes]

    # check_grads fails on a non-finite gradient; the modes it does not check are checked here.
    unchecked = tuple(t for t in MODES if t not in entry.fd_modes or entry.frozen_params)
    if unchecked:
      loss = lambda p, x: sum(jnp.sum(jnp.sin(y)) for y in outputs(p, x, unchecked))  # noqa: E731
      grads = jax.grad(loss, argnums=(0, 1))(params, x)
      chex.assert_tree_all_finite(grads)
      _same_layout(grads[0], params)
    if entry.frozen_params:  # no gradient reaches the parameters by design: exactly zero
      chex.assert_trees_all_equal(grads[0], jax.tree.map(jnp.zeros_like, params))
      check_grads(
        lambda x: outputs(params, x, entry.fd_modes),
        (x,),
        order=1,
        modes=("rev",),
        eps=FD_EPS,
        atol=FD_TOL,
        rtol=FD_TOL,
      )
    elif entry.fd_modes:
      check_grads(
        lambda p, x: outputs(p, x, entry.fd_modes),
        (params, x),
        order=1,
        modes=("rev",),
        eps=FD_EPS,
        atol=FD_TOL,
        rtol=FD_TOL,
      )


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_input_keeps_float32_state_and_params(name):
  entry = registry.by_name(name)
  driver, x, params, state = _setup(entry, jnp.bfloat16)
  _, _, params32, state32 = _setup(entry, jnp.float32)
  _same_layout((params, state), (params32, state32))
  for leaf in jax.tree.leaves(params):
    assert jnp.result_type(leaf) == entry.param_dtype, f"a parameter is {jnp.result_type(leaf)}"
  for leaf in jax.tree.leaves(state):
    expected = jnp.float32 if _is_float(leaf) else jnp.int32
    assert jnp.result_type(leaf) == expected, f"a state leaf is {jnp.result_type(leaf)}"
  _, s1 = driver.apply(params, state, x, training=True)
  y, s2 = driver.apply(params, s1, x, training=True)
  y_eval, s3 = driver.apply(params, s2, x, training=False)
  for s in (s1, s2, s3):
    _same_layout(s, state)
  chex.assert_tree_all_finite((y, y_eval))


# --------------------------------------------------------------------------------- golden trees


def _key_name(key):
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf(leaf):
  return f"{jnp.result_type(leaf)}[{','.join(map(str, np.shape(leaf)))}]"


def describe(tree, prefix):
  """`{path: "dtype[shape]"}` of a tree's leaves; nnx variables also name their type."""
  if isinstance(tree, nnx.State):
    return {
      "/".join((prefix,) + tuple(map(str, path))): f"{type(v).__name__} {_leaf(v[...])}"
      for path, v in nnx.to_flat_state(tree)
    }
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join((prefix,) + tuple(_key_name(k) for k in path)): _leaf(v) for path, v in leaves}


def state_tree(entry, dtype):
  """The golden record of one entry for one input dtype."""
  driver, x, params, state = _setup(entry, dtype)
  y_train, _ = driver.apply(params, state, x, training=True)
  y_eval, _ = driver.apply(params, state, x, training=False)
  record = {
    "input": _leaf(x),
    "state type": type(state).__name__,
    "output/training": _leaf(y_train),
    "output/evaluation": _leaf(y_eval),
  }
  return {**record, **describe(params, "params"), **describe(state, "state")}


def current_trees(names=NAMES):
  return {
    n: {str(jnp.dtype(d)): state_tree(registry.by_name(n), d) for d in (jnp.float32, jnp.bfloat16)}
    for n in names
  }


def golden_diff(expected, actual, label):
  """A unified diff of two records (empty when equal)."""
  dump = lambda tree: json.dumps(tree, indent=1, sort_keys=True).splitlines()  # noqa: E731
  return "\n".join(
    difflib.unified_diff(
      dump(expected), dump(actual), f"golden {label}", f"current {label}", lineterm=""
    )
  )


def _golden():
  return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_state_tree_matches_golden(name):
  expected = _golden().get(name)
  assert expected is not None, (
    f"{name} has no golden state tree; run `python "
    "tests/test_registry.py --update-golden` and review the diff"
  )
  diff = golden_diff(expected, current_trees([name])[name], name)
  assert not diff, (
    f"the state tree of {name} changed (a checkpoint format change?). If deliberate, "
    f"run `python tests/test_registry.py --update-golden`.\n{diff}"
  )


def test_golden_file_lists_exactly_the_registry():
  golden = set(_golden())
  optional = {n for n in golden if n.startswith("equinox.")} if registry.nje is None else set()
  assert sorted(golden - set(NAMES) - optional) == [], "golden entries no longer in the registry"
  assert sorted(set(NAMES) - golden) == [], "registry entries without a golden state tree"


def test_golden_diff_names_the_changed_leaf():
  record = {"params/scale": "float32[3]", "state/count": "int32[]"}
  changed = {**record, "state/count": "float32[]"}
  diff = golden_diff(record, changed, "x")
  assert '- "state/count": "int32[]"' in diff.splitlines(), diff
  assert '+ "state/count": "float32[]"' in diff.splitlines(), diff
  assert golden_diff(record, dict(record), "x") == ""


# --------------------------------------------------------------------------------- public names


def uncovered_public_names():
  """(public names neither covered nor excluded, stale exclusions, names covered and excluded)."""
  public = registry.public_names()
  covered = {c for e in registry.entries() for c in e.covers}
  covered_objects = [registry.resolve(c) for c in covered]
  is_covered = lambda n: n in covered or any(registry.resolve(n) is o for o in covered_objects)  # noqa: E731
  missing = [n for n in public if not is_covered(n) and n not in registry.EXCLUDED]
  stale = sorted(n for n in registry.EXCLUDED if n not in public)
  both = sorted(n for n in registry.EXCLUDED if n in covered)
  return missing, stale, both


def test_every_public_name_is_covered():
  missing, stale, both = uncovered_public_names()
  assert missing == [], (
    f"public names with no registry entry: {missing}. Add an Entry to "
    "tests/registry.py (or, for a non-layer utility, an EXCLUDED reason)"
  )
  assert stale == [], f"EXCLUDED names that are not public any more: {stale}"
  assert both == [], f"names both covered and EXCLUDED: {both}"
  for entry in registry.entries():
    for name in entry.covers:
      assert name in registry.public_names(), f"{entry.name} covers {name}, which is not public"
    if set(entry.fd_modes) != {True, False}:
      assert entry.fd_note, (
        f"{entry.name} leaves a mode out of the finite differences without a note"
      )


def test_a_new_public_name_fails_the_coverage_test(monkeypatch):
  monkeypatch.setattr(normjax, "brand_new_norm", lambda: None, raising=False)
  missing, _, _ = uncovered_public_names()
  assert missing == ["normjax.brand_new_norm"]


def update_golden():
  GOLDEN.parent.mkdir(parents=True, exist_ok=True)
  GOLDEN.write_text(json.dumps(current_trees(), indent=1, sort_keys=True) + "\n")
  print(f"wrote {GOLDEN} ({len(NAMES)} entries); review it with `git diff {GOLDEN.name}`")


if __name__ == "__main__":
  if sys.argv[1:] != ["--update-golden"]:
    sys.exit("usage: python tests/test_registry.py --update-golden")
  update_golden()
