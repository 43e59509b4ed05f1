"""Backend-specific lowerings: one place that chooses between the portable XLA program and a CPU one.

XLA:CPU (jaxlib ≥ 0.10) runs reductions through YNNPACK ("ynn fusions"). Measured on a 2-core AMD EPYC
with jax 0.10.2 (`benchmarks/cpu_reductions.py` reproduces every figure):

  * a reduction fuses the elementwise ops that produce its operand, but only those that no other
    instruction uses: two reductions of the same `x - shift`, or of the same `x.astype(float32)`,
    make XLA write that intermediate to memory in float32 and read it back twice;
  * a reduction whose operand subtracts (or multiplies by) a broadcast per-feature vector runs at about
    0.6× the speed of one over `x` or `x * x` (21 vs 35 GB/s on a 26 MB float32 activation);
  * `select` (`jnp.where`) is not fused at all.

GPU and TPU compilers have none of these limits, so their programs stay the portable ones: every
CPU-specific choice goes through `cpu_or_portable`, which stages both and lets XLA keep the branch of
the platform it compiles for (`jax.lax.platform_dependent`: the choice is made when lowering, so an
ahead-of-time compilation for a TPU on a CPU host gets the TPU program).
"""

from typing import Callable, Tuple

import jax


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


def private_copies(value, count: int) -> Tuple:
  """`count` aliases of `value` that XLA may not merge (common-subexpression elimination).

  Each consumer of one alias then fuses its own `convert` or `x - shift` into itself instead of sharing
  a materialized float32 intermediate (see the module docstring). The barrier costs nothing at run time
  and is differentiable (its JVP and transpose are barriers too). Use it in CPU lowerings only: on a
  TPU it would also stop a reduction from fusing into the op that produces `value`.
  """
  return tuple(
    _restore_unit_axes(v, value)
    for v in jax.lax.optimization_barrier((_drop_unit_axes(value),) * count)
  )


def fence(values: Tuple):
  """`values` through one optimization barrier (leading size-1 axes dropped around it).

  In reverse mode the barrier's transpose is a barrier on the cotangents: terms `a`, `b`, `c` that are
  fenced and then added each receive their own alias of the incoming cotangent, so XLA:CPU converts a
  bfloat16 cotangent inside each consumer instead of writing one float32 copy for all of them.
  """
  return _restore_unit_axes(jax.lax.optimization_barrier(_drop_unit_axes(tuple(values))), values)


def drop_unit_axes(tree):
  """Every array of `tree` without its leading size-1 axes (`restore_unit_axes` puts them back).

  Pass arrays to a CPU `cond` this way: XLA materializes a conditional's operands, and a bfloat16
  reshape materialized on XLA:CPU is a convert-bitcast-convert pass over the data; the reshape of a
  reshape folds away.
  """
  return _drop_unit_axes(tree)


def restore_unit_axes(tree, like):
  """`tree` reshaped to the shapes of `like` (the inverse of `drop_unit_axes`)."""
  return _restore_unit_axes(tree, like)


def _drop_unit_axes(tree):
  """Leading size-1 axes removed: a barrier on a reshaped bfloat16 array makes XLA:CPU write the
  reshape to memory (it lowers bfloat16 reshapes as convert-bitcast-convert), one on the array the
  reshape came from does not."""
  return jax.tree_util.tree_map(lambda v: v.reshape(_core_shape(v.shape)), tree)


def _restore_unit_axes(tree, like):
  return jax.tree_util.tree_map(lambda v, w: v.reshape(w.shape), tree, like)


def _core_shape(shape):
  shape = tuple(shape)
  while shape and shape[0] == 1:
    shape = shape[1:]
  return shape
