"""Backend-specific lowerings: one place that chooses between the portable XLA program and a CPU one.

XLA:CPU (jaxlib ≥ 0.10) runs reductions through YNNPACK ("ynn fusions"). Measured on a 2-core AMD EPYC
with jax 0.10.2 (`benchmarks/cpu_reductions.py` reproduces the reduction facts as minimal programs,
`benchmarks/cpu_kernels.py` the kernel-count threshold):

  * a reduction fuses the elementwise ops that produce its operand, but only those that no other
    instruction uses: two reductions of the same `x - shift`, or of the same `x.astype(float32)`,
    make XLA write that intermediate to memory in float32 and read it back twice;
  * a reduction whose operand subtracts a broadcast per-feature vector is slower than one over `x` or
    `x * x` when `x` is in cache (22.8 against 27.9 GB/s on a 25.7 MB float32 activation) and no
    slower when it is not (17.5 against 15.0 GB/s with caches flushed: both memory-bound);
  * `select` (`jnp.where`) is not fused when its condition has another user (e.g. a reduction);
  * the runtime runs a program's kernels ("thunks") one after the other when there are at most 8 of
    them, and as a concurrent dataflow graph on its thread pool when there are more (XLA's
    `ThunkExecutor`: `execute_sequential_num_thunks_threshold = 8`, not configurable). On this
    2-core machine the concurrent mode costs 13-21 % of a BatchNorm training forward whose two big
    reductions and normalize pass are otherwise the same (measured with caches flushed,
    `benchmarks/cpu_kernels.py`): flax's forward is 6 kernels, and normjax's was 18 before its
    per-feature work moved into the precision check's branches (`stats.moments_and_count`'s
    `epilogue`), where a conditional's branch runs as a nested program with its own count.

A BatchNorm training step without mask, `axis_name` or renorm (consecutive ghost batches included;
features last) does not use this XLA program on a CPU where normjax's C++ kernel is built (`cpu_kernel.py`): one custom call
reads `x` twice (shifted sums, then `y`) and decides the second pass inside. What follows is the XLA
program of every other step, and of every step where the kernel is off.

GPU and TPU compilers have none of these limits, so their programs stay the portable ones: every
CPU-specific choice goes through `cpu_or_portable`, which stages both and lets XLA keep the branch of
the platform it compiles for (`jax.lax.platform_dependent`: the choice is made when lowering, so an
ahead-of-time compilation for a TPU on a CPU host gets the TPU program).
"""

import functools
from typing import Callable, Tuple

import jax
import jax.numpy as jnp


def cpu_or_portable(*args, cpu: Callable, portable: Callable):
  """`cpu(*args)` when the computation is compiled for a CPU, `portable(*args)` for any other platform.

  Both functions must return values of the same shapes and dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import lowering
    >>> float(lowering.cpu_or_portable(jnp.ones(2), cpu=jnp.sum, portable=jnp.sum))
    2.0
  """
  return jax.lax.platform_dependent(*args, cpu=cpu, default=portable)


def any_true(flags) -> jax.Array:
  """`jnp.any(flags)`, in a form that XLA:CPU computes in one kernel on a CPU.

  XLA:CPU splits a boolean `reduce` into a `reduce-window` and a `reduce` and materializes the flags
  for them (three kernels with the op producing the flags). The position of the first True behind a
  False sentinel is one fused reduction (with the flags computed inside it), and it is True exactly
  when that position is not 0. Other platforms get `jnp.any`.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import lowering
    >>> bool(lowering.any_true(jnp.array([False, True]))), bool(lowering.any_true(jnp.zeros(3, bool)))
    (True, False)
  """
  return cpu_or_portable(
    jnp.asarray(flags, bool), cpu=_first_true_is_not_sentinel, portable=jnp.any
  )


def _first_true_is_not_sentinel(flags):
  return jnp.argmax(jnp.concatenate([jnp.zeros((1,), bool), flags.ravel()])) != 0


def sum_leading(values) -> jax.Array:
  """`jnp.sum(values, axis=0)` for a few per-feature rows (e.g. ghost groups' statistics).

  XLA:CPU hands even a 2 × C reduction to YNNPACK, whose call costs about 65 µs with cold caches; on
  a CPU the rows (at most 32) are added one by one instead, which fuses with their neighbours. Other
  platforms get `jnp.sum`.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import lowering
    >>> lowering.sum_leading(jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
    [4.0, 6.0]
  """
  values = jnp.asarray(values)
  if values.shape[0] == 1:
    return values[0]
  if values.shape[0] > 32:
    return jnp.sum(values, axis=0)
  rows = lambda v: functools.reduce(jnp.add, [v[i] for i in range(v.shape[0])])
  return cpu_or_portable(values, cpu=rows, portable=lambda v: jnp.sum(v, axis=0))


def cond_with_1d_results(pred, true_fun, false_fun, *operands):
  """`jax.lax.cond(pred, true_fun, false_fun, *operands)`, its array results leaving the branches 1-D.

  XLA may give a conditional's multi-dimensional results a transposed layout (it did for ghost
  groups' `(G, 1, 1, 1, C)` statistics on XLA:CPU), which a consumer such as the normalize pass then
  reads through a per-element index transposition. A 1-D array has one layout, and the reshape back to
  the branches' shapes is free.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import lowering
    >>> double, same = (lambda v: {"a": v * 2}), (lambda v: {"a": v})
    >>> out = lowering.cond_with_1d_results(True, double, same, jnp.ones((2, 3)))
    >>> out["a"].shape, float(out["a"][0, 0])
    ((2, 3), 2.0)
  """
  structure = []  # the branches' result tree and leaf shapes (the same for both)

  def flat(fun):
    def branch(*args):
      leaves, treedef = jax.tree_util.tree_flatten(fun(*args))
      structure[:] = [treedef, [leaf.shape for leaf in leaves]]
      return [leaf.reshape(-1) for leaf in leaves]

    return branch

  leaves = jax.lax.cond(pred, flat(true_fun), flat(false_fun), *operands)
  treedef, shapes = structure
  return jax.tree_util.tree_unflatten(treedef, [v.reshape(s) for v, s in zip(leaves, shapes)])


def nested_program(fun, operand):
  """`fun(operand)` run as a conditional's branch: its own thunk sequence on XLA:CPU.

  XLA:CPU runs a program of at most 8 kernels in order and a larger one as a slower concurrent graph
  (module docstring); a conditional's branch is a nested program with its own count. Both branches
  are `fun`, so the predicate (the first element of `operand`'s first leaf equals itself: XLA cannot
  fold it, NaN ≠ NaN) never changes the result; it is a function of `operand`, so it is the same on
  every device when `operand` is. `fun`'s array results leave 1-D (`cond_with_1d_results`).

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import lowering
    >>> float(lowering.nested_program(lambda v: v * 2, jnp.array([jnp.nan, 1.0]))[1])
    2.0
  """
  first = jax.tree_util.tree_leaves(operand)[0].ravel()[0]
  return cond_with_1d_results(first == first, fun, fun, operand)


def private_copies(value, count: int, *, grouped: bool = False) -> Tuple:
  """`count` aliases of `value` (an array or a tuple of arrays) that XLA may not merge.

  Each consumer of one alias then fuses its own `convert` or `x - shift` into itself instead of sharing
  a materialized float32 intermediate (see the module docstring). The barrier costs nothing at run time
  and is differentiable (its JVP and transpose are barriers too). Use it in CPU lowerings only: on a
  TPU it would also stop a reduction from fusing into the op that produces `value`. `grouped`: see
  `as_operand`; a narrow-float ghost-group view with more than one group goes through the barrier
  as it is (`_keeps_group_view`).
  """
  operand = jax.tree_util.tree_map(
    lambda v: v if _keeps_group_view(v, grouped) else as_operand(v, grouped), value
  )
  copies = jax.lax.optimization_barrier((operand,) * count)
  return tuple(from_operand(c, value) for c in copies)


def _keeps_group_view(v, grouped: bool) -> bool:
  """Whether a barrier should see the `(G, g, ...)` view itself rather than the ungrouped array.

  Measured (jax 0.10.2, 2-core AMD EPYC, `benchmarks/op_batch_norm.py`): XLA:CPU's YNN reduction of a
  bfloat16 array that is converted to float32 and then viewed as `(G, g, ...)` runs about 3× slower
  than one whose operand is already the grouped view, so ghost BatchNorm's bfloat16 training forward
  took 1.7× flax's time at 128×14×14×128 with 2 groups. Handing the barrier the grouped view costs
  XLA one bfloat16 copy of x but brings that row to 0.64×. With one group, or in float32, the
  ungrouped array is as fast and copies nothing.
  """
  return grouped and v.ndim >= 2 and v.shape[0] > 1 and jnp.dtype(v.dtype).itemsize < 4


def fence(values: Tuple, *, grouped: bool = False) -> Tuple:
  """`values` through one optimization barrier.

  In reverse mode the barrier's transpose is a barrier on the cotangents: terms `a`, `b`, `c` that are
  fenced and then added each receive their own alias of the incoming cotangent, so XLA:CPU converts a
  bfloat16 cotangent inside each consumer instead of writing one float32 copy for all of them.
  """
  values = tuple(values)
  return from_operand(jax.lax.optimization_barrier(as_operand(values, grouped)), values)


def as_operand(tree, grouped: bool = False):
  """Arrays reshaped to the shape they were viewed from, for a barrier or a `cond` operand.

  XLA materializes what it hands to a barrier or a conditional, and XLA:CPU lowers a bfloat16 reshape
  as convert-bitcast-convert, so a reshaped bfloat16 input would be copied; the reshape of a reshape
  back to the original shape folds away. `grouped=True`: the arrays are BatchNorm's ghost-group views
  `(G, g, ...)` of `(G·g, ...)`, whose first two axes are merged; otherwise leading size-1 axes are
  dropped. `from_operand` reshapes back.
  """
  return jax.tree_util.tree_map(lambda v: v.reshape(_source_shape(v.shape, grouped)), tree)


def from_operand(tree, like):
  """`tree` reshaped to the shapes of `like` (the inverse of `as_operand`)."""
  return jax.tree_util.tree_map(lambda v, w: v.reshape(w.shape), tree, like)


def _source_shape(shape, grouped):
  shape = tuple(shape)
  if grouped and len(shape) >= 2:
    return (shape[0] * shape[1],) + shape[2:]
  while shape and shape[0] == 1:
    shape = shape[1:]
  return shape
