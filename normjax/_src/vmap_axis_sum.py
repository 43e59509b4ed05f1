"""Sums over `jax.vmap` axes: what `psum` over a vmap axis computes, without its two failure modes.

Synchronized statistics over a `vmap` axis (Equinox's convention: `jax.vmap(model, axis_name="batch")`)
would sum with `jax.lax.psum(x, "batch")`, which fails in two places with jax 0.8.1 – 0.11:

  * **Inside `shard_map(check_vma=True)`.** `psum` casts its input to vary over the named axes
    (`pvary`), which asserts that they are mesh axes, and its batching rule re-binds the
    variant-to-invariant `psum` with a positional axis that the type check rejects. `ppermute`,
    `all_gather` and comparisons with `axis_index` over a vmap axis fail the same way
    (`benchmarks.tpu_compile.jax_psum_over_vmap_axis_fails` reproduces it in five lines of pure JAX;
    `eqx.nn.BatchNorm` fails there too).
  * **Reverse mode of a jitted vmap**, `jax.grad(jax.jit(jax.vmap(f, axis_name=...)))`, when the sum
    is inside a custom derivative rule (normjax's closed-form BatchNorm derivative): `vmap` batches
    the rule later, outside the trace context that binds the axis, and `psum` raises "unbound axis
    name".

`vmap_axis_sum_p` is the sum itself, without the collective's typing or its check of the axis
environment: its abstract value is its input's (so the mesh axes the data varies over are kept);
`vmap`'s batching rule replaces it by a `reduce_sum` over the batched dimension (`x · size` when `x`
is not batched), which is what `psum`'s batching rule computes, so programs are unchanged; it is
linear and its own transpose (y_i = Σ_j x_j gives x̄_j = Σ_i ȳ_i), so forward and reverse mode work
at any order. `vmap_axis_index_p` is `axis_index` for the same places. `split_axes` sends every name
that is not a manual mesh axis (`shard_map`'s, and `pmap`'s, which jax ≥ 0.8.1 runs as `shard_map`)
to them; mesh axes keep `psum`.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from normjax._src import vmap_axis_sum
  >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  >>> body = lambda x: jax.vmap(lambda r: vmap_axis_sum.vmap_axis_sum(r, ("v",)), axis_name="v")(x)
  >>> f = jax.shard_map(body, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data"))
  >>> jax.jit(f)(jnp.arange(6.0).reshape(2, 3)).tolist()
  [[3.0, 5.0, 7.0], [3.0, 5.0, 7.0]]
"""

from typing import Tuple

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

vmap_axis_sum_p = Primitive("normjax_vmap_axis_sum")
vmap_axis_sum_p.def_abstract_eval(lambda aval, *, axes: aval)


def vmap_axis_sum(x, axes: Tuple[str, ...]):
  """`x` summed over the `vmap` axes `axes` (names bound by enclosing `jax.vmap`s)."""
  return vmap_axis_sum_p.bind(x, axes=tuple(axes))


def _batching_rule(axis_data, values, dims, *, axes):
  (x,), (dim,) = values, dims
  if axis_data.name not in axes:
    return vmap_axis_sum_p.bind(x, axes=axes), dim
  if dim is None:  # the same value on every member of the batch
    summed = x * np.asarray(axis_data.size, x.dtype)
  else:
    summed = jax.lax.reduce_sum(x, (dim,))
  rest = tuple(a for a in axes if a != axis_data.name)
  return (vmap_axis_sum_p.bind(summed, axes=rest) if rest else summed), None


def _lowering_error(*_, **params):
  name = params.get("axes", params.get("axis"))
  raise NameError(
    f"axis_name={name!r} is not bound: no enclosing jax.vmap, pmap or shard_map names it (a sum or "
    "index over it was left unbatched)"
  )


batching.fancy_primitive_batchers[vmap_axis_sum_p] = _batching_rule
ad.deflinear2(vmap_axis_sum_p, lambda ct, _, *, axes: [vmap_axis_sum_p.bind(ct, axes=axes)])
vmap_axis_sum_p.def_impl(_lowering_error)
mlir.register_lowering(vmap_axis_sum_p, _lowering_error)


vmap_axis_index_p = Primitive("normjax_vmap_axis_index")
vmap_axis_index_p.def_abstract_eval(lambda *, axis: jax.core.ShapedArray((), np.int32))


def vmap_axis_index(axis: str):
  """This member's index along the `vmap` axis `axis`: `jax.lax.axis_index`, typed as invariant.

  `axis_index` types its result as varying over the axis, as if it were a mesh axis; traced where
  `vmap` does not batch it at once (a custom derivative rule's jaxpr), comparing it with anything
  then fails the same `pvary` assertion as `psum`.
  """
  return vmap_axis_index_p.bind(axis=axis)


def _index_batching_rule(axis_data, values, dims, *, axis):
  del values, dims
  if axis_data.name != axis:
    return vmap_axis_index_p.bind(axis=axis), None
  return jax.lax.iota(np.int32, axis_data.size), 0


batching.fancy_primitive_batchers[vmap_axis_index_p] = _index_batching_rule
vmap_axis_index_p.def_impl(_lowering_error)
mlir.register_lowering(vmap_axis_index_p, _lowering_error)


def split_axes(axis_name) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(mesh axes to `psum` over, vmap axes for `vmap_axis_sum`) of `axis_name`.

  The manual axes of the current mesh (`shard_map`'s and `pmap`'s) are mesh axes; every other name is
  a `vmap` axis. Its binding is not checked here: `vmap` may batch a custom derivative rule after its
  axis left the trace context. A name that nothing binds reaches lowering (or eager evaluation), which
  raises `NameError` naming it.
  """
  names = axis_names(axis_name)
  manual = frozenset(jax.sharding.get_abstract_mesh().manual_axes)
  return tuple(n for n in names if n in manual), tuple(n for n in names if n not in manual)


def axis_names(axis_name) -> Tuple[str, ...]:
  """`axis_name` as a tuple of names (one name, or a tuple or list of them)."""
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
