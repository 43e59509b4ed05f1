"""Cross-device sums over a named axis, with optional device groups.

`jax.lax.psum(..., axis_index_groups=...)` works under `pmap` but not under `jax.shard_map`, so groups are
implemented here portably, in one of three ways (`cross_device_sum` picks the one that moves least):

  * **butterfly** (groups of one power-of-two size `g`): `log2 g` rounds of `jax.lax.ppermute`
    inside each group; in round `k` each device adds the value of the member whose place differs in
    bit `k` (recursive doubling). Both partners add the same two numbers, so every member ends with the
    same bits.
  * **gather** (other small groups): `g − 1` rounds of `ppermute` inside each group, round `s`
    handing each device the value of the member `s` places after it (`g` the largest group's size);
    each device then adds its group's values in one fixed order (by their place in the group), so
    every member gets the same bits.
  * **one all-reduce** (few groups): each device scatters its value into the row of its group, one
    `psum` over the whole axis sums every group at once, and each device reads back its own group's
    row: one round whose payload is `number of groups` values.

With the permutes nothing crosses a group boundary and each round carries one copy of the value; they
are chosen when their rounds are fewer than the groups (`permute_rounds`). E.g. pairs of devices on a
256-device slice send one vector per device instead of an all-reduce of 128 of them, and groups of 8
(one host's devices) take 3 rounds. Over a `vmap` axis groups always take the one all-reduce, which
there is an in-memory sum over the batch (`ppermute` over a vmap axis fails where `psum` does: see
`vmap_axis_sum`).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from normjax._src import compat, vmap_axis_sum

AxisIndexGroups = Optional[Sequence[Sequence[int]]]


def check_axis_index_groups(groups: AxisIndexGroups, axis_size: Optional[int] = None) -> None:
  """Raises ValueError unless `groups` partitions range(axis_size) into non-empty groups."""
  if groups is None:
    return
  flat = [int(i) for g in groups for i in g]
  if not groups or any(len(g) == 0 for g in groups):
    raise ValueError(f"axis_index_groups={groups!r} must be a non-empty list of non-empty groups")
  if len(set(flat)) != len(flat):
    raise ValueError(f"axis_index_groups={groups!r} lists a device index twice")
  if axis_size is not None and sorted(flat) != list(range(axis_size)):
    raise ValueError(
      f"axis_index_groups={groups!r} must cover each of the {axis_size} device indices "
      f"0..{axis_size - 1} exactly once"
    )


def _static_axis_size(axis_name) -> Optional[int]:
  try:
    return int(jax.lax.axis_size(axis_name))
  except Exception:  # pylint: disable=broad-except  (not statically known in this context)
    return None


def cross_device_sum(tree, axis_name, axis_index_groups: AxisIndexGroups = None):
  """Sums every leaf of `tree` over the devices of `axis_name` (within each device's group)."""
  if axis_name is None:
    return tree
  if axis_index_groups is None:
    return _psum_leaves(tree, axis_name)
  check_axis_index_groups(axis_index_groups, _static_axis_size(axis_name))
  groups = [[int(i) for i in group] for group in axis_index_groups]
  if permute_rounds(groups) >= len(groups) or vmap_axis_sum.split_axes(axis_name)[1]:
    return _sum_by_one_all_reduce(tree, axis_name, groups)
  if _butterfly_size(groups):
    return _sum_by_butterfly(tree, axis_name, groups)
  return _sum_by_permutes(tree, axis_name, groups)


def _butterfly_size(groups) -> int:
  """The groups' common size when it is a power of two (the butterfly applies), else 0."""
  size = len(groups[0])
  same = all(len(g) == size for g in groups)
  return size if same and size & (size - 1) == 0 else 0


def permute_rounds(groups) -> int:
  """Rounds of `ppermute` that sum within `groups`: log2 g for the butterfly, else g − 1 (`g` the
  largest group). Permutes are used when these are fewer than the groups (see module doc)."""
  size = _butterfly_size(groups)
  return size.bit_length() - 1 if size else max(len(g) for g in groups) - 1


def _same_on_every_device(leaf) -> bool:
  """A value known at trace time (e.g. a count without a mask): its group sum is the value times the
  group's size, with no collective."""
  return isinstance(leaf, (np.ndarray, np.generic, int, float))


def _sum_by_butterfly(tree, axis_name, groups):
  """Each leaf summed within groups of one power-of-two size by recursive doubling (see module doc)."""
  size = len(groups[0])
  perms = [
    [(g[p ^ (1 << k)], g[p]) for g in groups for p in range(size)]
    for k in range(size.bit_length() - 1)
  ]

  def summed(leaf):
    if _same_on_every_device(leaf):
      return np.asarray(leaf) * np.asarray(size, np.result_type(leaf))
    for perm in perms:
      leaf = leaf + jax.lax.ppermute(leaf, axis_name, perm)
    return leaf

  return jax.tree_util.tree_map(summed, tree)


def _member_tables(groups):
  """Per device index: its place in its group and its group's size (NumPy, int32)."""
  size = 1 + max(i for g in groups for i in g)
  place, group_size = np.zeros(size, np.int32), np.ones(size, np.int32)
  for group in groups:
    place[group] = np.arange(len(group))
    group_size[group] = len(group)
  return place, group_size


def _sum_by_permutes(tree, axis_name, groups):
  """Each leaf summed within each group by `ppermute` rounds, added in group order (see module doc)."""
  rounds = max(len(g) for g in groups)
  place_of, size_of = _member_tables(groups)
  me = jax.lax.axis_index(axis_name)
  place, size = jnp.asarray(place_of)[me], jnp.asarray(size_of)[me]
  # round s: the member at place p receives from place (p + s) mod g; a device whose group is too
  # small for round s keeps its own value there (never read: `vmap` needs whole permutations)
  perms = [
    [(g[(p + s) % len(g)] if len(g) > s else g[p], g[p]) for g in groups for p in range(len(g))]
    for s in range(1, rounds)
  ]

  def summed(leaf):
    if _same_on_every_device(leaf):
      return jnp.asarray(leaf) * size.astype(np.result_type(leaf))
    leaf = jnp.asarray(leaf)
    received = jnp.stack([leaf] + [jax.lax.ppermute(leaf, axis_name, perm) for perm in perms])
    total = jnp.zeros_like(leaf)
    # the value of the member at place q arrived in round (q − place) mod size
    for q in range(rounds):
      value = received[jnp.mod(q - place, size)]
      total = total + jnp.where(q < size, value, jnp.zeros_like(value))
    return total

  return jax.tree_util.tree_map(summed, tree)


def _axis_index(axis_name):
  """`jax.lax.axis_index` (row-major over a tuple of names), with `vmap_axis_sum.vmap_axis_index`
  for the names that are vmap axes."""
  vmap_axes = vmap_axis_sum.split_axes(axis_name)[1]
  if not vmap_axes:
    return jax.lax.axis_index(axis_name)
  index = None
  for name in vmap_axis_sum.axis_names(axis_name):
    one = vmap_axis_sum.vmap_axis_index(name) if name in vmap_axes else jax.lax.axis_index(name)
    index = one if index is None else index * jax.lax.axis_size(name) + one
  return index


def _sum_by_one_all_reduce(tree, axis_name, groups):
  """Each leaf summed within each group by one `psum` of a (groups, ...) array (see module doc)."""
  group_of = np.zeros(max(i for g in groups for i in g) + 1, np.int32)
  for gid, group in enumerate(groups):
    group_of[np.asarray(group, np.int32)] = gid
  my_group = jnp.asarray(group_of)[_axis_index(axis_name)]
  onehot = jnp.arange(len(groups)) == my_group

  def scatter(leaf):
    leaf = jnp.asarray(leaf)
    return jnp.where(onehot.reshape((-1,) + (1,) * leaf.ndim), leaf[None], 0)

  summed = _psum_leaves(jax.tree_util.tree_map(scatter, tree), axis_name)
  return jax.tree_util.tree_map(lambda s: s[my_group], summed)


def common_value(value, like, axis_name, axis_index_groups: AxisIndexGroups = None):
  """`value` made the same on every device of each group of `axis_name`.

  Returned unchanged where the types prove it already is: inside `shard_map` with varying-axis checks,
  `like` (the data) varies over the axes and `value` does not. Elsewhere (`pmap`, `vmap`, shard_map
  without checks) nothing proves it, and its mean over the devices is returned: one small collective
  that does not depend on the data, so XLA can issue it before the data exists.
  """
  names = vmap_axis_sum.axis_names(axis_name)
  data_axes, value_axes = compat.vma(like), compat.vma(value)
  if all(a in data_axes for a in names) and not any(a in value_axes for a in names):
    return value
  total, n = cross_device_sum((value, jnp.ones((), value.dtype)), axis_name, axis_index_groups)
  return total / n


def _psum_leaves(tree, axis_name):
  """One `psum` per leaf, never one over several leaves.

  A multi-operand `psum` whose operands mix a constant (a valid count) with a differentiated value
  cannot be transposed by jax < 0.8.2 under `shard_map` (an assertion in its psum transpose rule), so
  reverse mode through synchronized statistics crashed there. Per-leaf sums are the same numbers; XLA's
  all-reduce combiner merges the small collectives again where that pays.
  """
  mesh_axes, vmap_axes = vmap_axis_sum.split_axes(axis_name)

  def summed(leaf):
    if vmap_axes:  # where psum over them fails (vmap_axis_sum's doc); the same program elsewhere
      leaf = vmap_axis_sum.vmap_axis_sum(leaf, vmap_axes)
    return jax.lax.psum(leaf, mesh_axes) if mesh_axes else leaf

  return jax.tree_util.tree_map(summed, tree)
