"""normjax._src.collectives: `cross_device_sum` over a named axis, with and without device groups, on 8
real CPU devices under `jax.shard_map`, `pmap` and `vmap`, against float64 sums computed in NumPy."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

from normjax._src import collectives
from tests import helpers

N = 8
GROUPINGS = {
  "pairs": [[0, 1], [2, 3], [4, 5], [6, 7]],
  "halves_interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]],
  "uneven": [[3], [0, 7, 1], [2, 4, 5, 6]],
  "triples": [[0, 1, 2], [5, 4, 3], [6, 7]],
  "one_group": [list(range(N))],
}


def _per_device():
  """A pytree with one row per device: a (N, 3) leaf and a (N, 2, 2) leaf."""
  return {
    "a": helpers.normal_data((N, 3), mean=1.0, seed=1),
    "b": helpers.normal_data((N, 2, 2), std=3.0, seed=2),
  }


def _want(tree, groups):
  """float64: each device's row replaced by the sum over the devices of its group."""
  out = {}
  for key, leaf in tree.items():
    leaf = np.asarray(leaf, np.float64)
    groups_ = groups if groups is not None else [list(range(N))]
    summed = np.empty_like(leaf)
    for group in groups_:
      summed[group] = leaf[group].sum(0)
    out[key] = summed
  return out


def _check(got, want):
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key], np.float64), want[key], rtol=1e-6, atol=1e-6)


def _shard_map(groups):
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))

  def local(tree):  # each device sees its (1, ...) row
    return collectives.cross_device_sum(tree, "d", groups)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))


def test_there_are_eight_devices():
  assert len(jax.devices()) >= N


@pytest.mark.parametrize("groups", [None, *GROUPINGS.values()], ids=["all", *GROUPINGS])
def test_shard_map(groups):
  tree = _per_device()
  got = _shard_map(groups)({k: jnp.asarray(v) for k, v in tree.items()})
  _check(got, _want(tree, groups))


@pytest.mark.parametrize(
  "groups", [None, GROUPINGS["pairs"], GROUPINGS["uneven"]], ids=["all", "pairs", "uneven"]
)
def test_pmap(groups):
  tree = _per_device()
  got = jax.pmap(lambda t: collectives.cross_device_sum(t, "d", groups), axis_name="d")(tree)
  _check(got, _want(tree, groups))


@pytest.mark.parametrize(
  "groups", [None, GROUPINGS["halves_interleaved"]], ids=["all", "interleaved"]
)
def test_vmap_with_an_axis_name(groups):
  tree = _per_device()
  got = jax.vmap(lambda t: collectives.cross_device_sum(t, "d", groups), axis_name="d")(tree)
  _check(got, _want(tree, groups))


def test_the_portable_groups_agree_with_psum_axis_index_groups_under_pmap():
  x = helpers.normal_data((N, 4), seed=5)
  groups = GROUPINGS["halves_interleaved"]
  ours = jax.pmap(lambda v: collectives.cross_device_sum(v, "d", groups), axis_name="d")(x)
  native = jax.pmap(lambda v: jax.lax.psum(v, "d", axis_index_groups=groups), axis_name="d")(x)
  np.testing.assert_allclose(ours, native, rtol=1e-6)


def test_no_axis_name_returns_the_tree_unchanged():
  tree = _per_device()
  assert collectives.cross_device_sum(tree, None) is tree
  assert collectives.cross_device_sum(tree, None, [[0, 1]]) is tree


def test_scalars_and_integer_leaves_keep_their_dtype():
  counts = np.arange(N, dtype=np.int32)
  got = jax.vmap(
    lambda c: collectives.cross_device_sum((c, c.astype(jnp.float32)), "d", GROUPINGS["pairs"]),
    axis_name="d",
  )(counts)
  assert got[0].dtype == jnp.int32 and got[1].dtype == jnp.float32
  np.testing.assert_array_equal(got[0], [1, 1, 5, 5, 9, 9, 13, 13])
  np.testing.assert_array_equal(got[1], [1, 1, 5, 5, 9, 9, 13, 13])


@pytest.mark.parametrize("groups", [None, GROUPINGS["uneven"]], ids=["all", "uneven"])
def test_reverse_mode_under_shard_map(groups):
  """The cotangent of a group sum is the group sum of the cotangents: d/dx_i Σ_j w_j s_j(x) with
  s_j = Σ_{k ∈ group(j)} x_k is Σ_{j ∈ group(i)} w_j."""
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  x = jnp.asarray(helpers.normal_data((N, 3), seed=6))
  w = helpers.normal_data((N, 3), seed=7)

  def loss(x):
    summed = jax.shard_map(
      lambda v: collectives.cross_device_sum({"v": v, "n": jnp.ones(())}, "d", groups)["v"],
      mesh=mesh,
      in_specs=P("d"),
      out_specs=P("d"),
    )(x)
    return (summed * w).sum()

  grad = jax.jit(jax.grad(loss))(x)
  np.testing.assert_allclose(grad, _want({"w": w}, groups)["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "groups, axis_size, match",
  [
    ([], None, r"axis_index_groups=\[\] must be a non-empty list of non-empty groups"),
    ([[0, 1], []], None, r"axis_index_groups=\[\[0, 1\], \[\]\] must be a non-empty list"),
    (
      [[0, 1], [1, 2]],
      None,
      r"axis_index_groups=\[\[0, 1\], \[1, 2\]\] lists a device index twice",
    ),
    ([[0, 1], [2, 3]], 8, r"must cover each of the 8 device indices 0\.\.7 exactly once"),
    ([[0, 1], [2, 9]], 4, r"must cover each of the 4 device indices 0\.\.3 exactly once"),
  ],
)
def test_check_axis_index_groups_errors(groups, axis_size, match):
  with pytest.raises(ValueError, match=match):
    collectives.check_axis_index_groups(groups, axis_size)


@pytest.mark.parametrize(
  "groups, axis_size",
  [(None, None), (None, 8), ([[0, 1], [2, 3]], None), ([[3, 1], [0, 2]], 4), ([[0]], 1)],
)
def test_check_axis_index_groups_accepts_partitions(groups, axis_size):
  assert collectives.check_axis_index_groups(groups, axis_size) is None


def test_groups_that_do_not_cover_the_axis_raise_at_trace_time():
  with pytest.raises(ValueError, match="must cover each of the 8 device indices"):
    _shard_map([[0, 1, 2, 3]])({k: jnp.asarray(v) for k, v in _per_device().items()})


def _psums(fn, *args):
  """Number of psum equations in the jaxpr of `fn(*args)` (nested jaxprs included)."""
  return str(jax.make_jaxpr(fn)(*args)).count("psum")


@pytest.mark.parametrize("check_vma", [True, False])
def test_common_value_is_free_when_the_types_prove_it_and_a_mean_otherwise(check_vma):
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  x = jnp.asarray(helpers.normal_data((N, 3)))
  replicated = jnp.arange(3.0)

  def local(x, value):
    return collectives.common_value(value, x, "d")[None]

  fn = jax.shard_map(
    local, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"), check_vma=check_vma
  )
  got = jax.jit(fn)(x, replicated)
  np.testing.assert_allclose(got, np.broadcast_to(np.arange(3.0), (N, 3)), rtol=1e-6)
  # with varying-axis types a replicated value is returned as is; without them it is averaged
  assert (_psums(fn, x, replicated) == 0) == check_vma


@pytest.mark.parametrize("name", ["halves", "pairs", "triples"])
def test_common_value_averages_a_value_that_varies(name):
  """Each way of summing groups (one all-reduce, butterfly, gather), with a count that does not vary."""
  groups = {"halves": [[0, 1, 2, 3], [4, 5, 6, 7]]}.get(name) or GROUPINGS[name]
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  per_device = jnp.arange(N * 2.0).reshape(N, 2)

  def local(x):
    return collectives.common_value(x[0], x, "d", groups)[None]

  got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(per_device)
  want = np.empty((N, 2))
  for group in groups:
    want[group] = np.asarray(per_device)[group].mean(0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


SUMS = {  # the ways of summing within groups; cross_device_sum picks one (see collectives' doc)
  "butterfly": collectives._sum_by_butterfly,  # pylint: disable=protected-access
  "gather": collectives._sum_by_permutes,  # pylint: disable=protected-access
  "one all-reduce": collectives._sum_by_one_all_reduce,  # pylint: disable=protected-access
}
POWER_OF_TWO = ("pairs", "halves_interleaved", "one_group")  # the butterfly's groupings
CASES = [(m, g) for m in SUMS for g in GROUPINGS if m != "butterfly" or g in POWER_OF_TWO]


@pytest.mark.parametrize("method, name", CASES)
def test_each_way_of_summing_groups_under_shard_map_pmap_and_vmap(method, name):
  groups, sum_ = GROUPINGS[name], SUMS[method]
  tree = _per_device()
  want = _want(tree, groups)
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  local = lambda t: sum_(t, "d", groups)  # noqa: E731
  as_arrays = {k: jnp.asarray(v) for k, v in tree.items()}
  _check(
    jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(as_arrays), want
  )
  _check(jax.pmap(local, axis_name="d")(tree), want)
  _check(jax.vmap(local, axis_name="d")(tree), want)


@pytest.mark.parametrize(
  "method, name", [(m, g) for m, g in CASES if m != "one all-reduce" and g != "one_group"]
)
def test_permutes_give_every_member_of_a_group_the_same_bits(method, name):
  """The butterfly's partners add the same two numbers, and the gather adds in the group's order, so
  the members agree exactly (a BatchNorm's branch choices and running statistics must not differ)."""
  groups = GROUPINGS[name]
  x = jnp.asarray(helpers.normal_data((N, 64), mean=1e3, seed=11))
  got = np.asarray(jax.pmap(lambda v: SUMS[method](v, "d", groups), axis_name="d")(x))
  for group in groups:
    for member in group:
      np.testing.assert_array_equal(got[member], got[group[0]])
  _check({"x": got}, _want({"x": x}, groups))


@pytest.mark.parametrize("method", SUMS)
def test_reverse_mode_of_each_way(method):
  groups = GROUPINGS["pairs" if method == "butterfly" else "uneven"]
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  x = jnp.asarray(helpers.normal_data((N, 3), seed=6))
  w = helpers.normal_data((N, 3), seed=7)

  def loss(x):
    local = lambda v: SUMS[method]({"v": v, "n": np.ones((1,), np.float32)}, "d", groups)["v"]  # noqa: E731
    return (jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(x) * w).sum()

  grad = jax.jit(jax.grad(loss))(x)
  np.testing.assert_allclose(grad, _want({"w": w}, groups)["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "name, permutes, all_reduces",
  [
    ("pairs", 1, 0),  # butterfly: 1 round < 4 groups
    ("triples", 2, 0),  # gather: 2 rounds < 3 groups
    ("uneven", 0, 1),  # gather would take 3 rounds for 3 groups
    ("halves_interleaved", 0, 1),  # butterfly would take 2 rounds for 2 groups
    ("one_group", 0, 1),
  ],
)
def test_cross_device_sum_picks_the_way_that_moves_less(name, permutes, all_reduces):
  """Permutes where their rounds are fewer than the groups (an all-reduce carries one value per
  group), one all-reduce elsewhere."""
  groups = GROUPINGS[name]
  mesh = Mesh(np.array(jax.devices()[:N]), ("d",))
  fn = jax.jit(
    jax.shard_map(
      lambda v: collectives.cross_device_sum(v, "d", groups),
      mesh=mesh,
      in_specs=P("d"),
      out_specs=P("d"),
    )
  )
  x = jnp.asarray(helpers.normal_data((N, 16), seed=3))
  hlo = fn.lower(x).compile().as_text()
  assert len(re.findall(r"collective-permute(?:-start)?\(", hlo)) == permutes, hlo
  assert len(re.findall(r"all-reduce(?:-start)?\(", hlo)) == all_reduces, hlo
  assert (collectives.permute_rounds(groups) < len(groups)) == bool(permutes)
  _check({"x": fn(x)}, _want({"x": x}, groups))
