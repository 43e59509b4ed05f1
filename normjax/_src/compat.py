"""The JAX APIs whose spelling differs across the supported versions, in one place.

normjax supports every jax from the floor declared in `pyproject.toml` (pinned, with the other minimum
versions, in `constraints/minimum.txt`, which CI installs and tests) to the newest. Code outside this
module calls these names and never tests a version itself:

  * `vary(value, axes)`: mark `value` device-varying over the `shard_map` mesh `axes`.
    jax ≥ 0.8.2 spells it `jax.lax.pcast(value, axes, to="varying")`; jax 0.7.0 – 0.8.1 `jax.lax.pvary`.
  * `vma(value)`: the mesh axes `value` varies over inside `shard_map` (its varying-manual-axes type).
    The aval's `vma` field; some versions kept it in `manual_axis_type.varying`; empty outside shard_map.
  * `vary_like(x, value)`: `value` made varying over the axes `x` varies over (a custom JVP's tangent
    must have its primal's type under `shard_map(check_vma=True)`).
  * `shape_like(x, shape, dtype)`: a `jax.ShapeDtypeStruct` (e.g. a Pallas kernel's output) that varies
    over the `shard_map` axes `x` varies over. jax ≥ 0.9 takes its `manual_axis_type`, earlier ones its
    `vma`.
  * `is_batched(value)`: whether `jax.vmap` is tracing `value` (its batching tracer lives in
    `jax._src.interpreters.batching` in every supported version; False if that module moves).
  * `OLD_CPU_REDUCTIONS`: True for jaxlib < 0.10.2, whose XLA CPU float32 reductions round more (measured
    on one reduction of 16,384 values near 1e4: variance error 1.3e-5 with jaxlib 0.7.0 and 0.8.1, 1.0e-6
    with 0.10.2). Tests whose float32 tolerance depends on the summation order read it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from normjax._src import compat
  >>> compat.vma(jnp.ones(3))  # outside shard_map nothing varies
  frozenset()
  >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("d",))
  >>> def per_device(x):  # x varies over "d"; a fresh constant does not until vary_like marks it
  ...   zeros = jnp.zeros(2)
  ...   print(sorted(compat.vma(zeros)), sorted(compat.vma(compat.vary_like(x, zeros))))
  ...   return x
  >>> _ = jax.shard_map(per_device, mesh=mesh, in_specs=jax.P("d"), out_specs=jax.P("d"))(jnp.ones(2))
  [] ['d']
"""

import inspect
from typing import FrozenSet, Sequence

import jax
import jaxlib.version

JAXLIB_VERSION = tuple(jaxlib.version.__version_info__[:3])  # e.g. (0, 8, 1)
OLD_CPU_REDUCTIONS = JAXLIB_VERSION < (0, 10, 2)

if hasattr(jax.lax, "pcast"):

  def vary(value, axes: Sequence[str]):
    """`value` made device-varying over the mesh `axes`, axes it does not vary over yet."""
    return jax.lax.pcast(value, tuple(axes), to="varying")
else:  # jax < 0.8.2

  def vary(value, axes: Sequence[str]):
    """`value` made device-varying over the mesh `axes`, axes it does not vary over yet."""
    return jax.lax.pvary(value, tuple(axes))


def vma(value) -> FrozenSet[str]:
  """The mesh axes over which `value` varies inside shard_map (empty outside)."""
  aval = jax.typeof(value)
  axes = getattr(aval, "vma", None)
  if axes is None:
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(axes or ())


def vary_like(x, value):
  """`value` made device-varying over the mesh axes `x` varies over (shard_map's varying-axis types)."""
  missing = tuple(a for a in vma(x) if a not in vma(value))
  return vary(value, missing) if missing else value


_SHAPE_TYPE_FIELD = next(
  (
    f
    for f in ("manual_axis_type", "vma")
    if f in inspect.signature(jax.ShapeDtypeStruct.__init__).parameters
  ),
  None,
)


def shape_like(x, shape, dtype) -> jax.ShapeDtypeStruct:
  """`jax.ShapeDtypeStruct(shape, dtype)` varying over the shard_map axes `x` varies over."""
  aval = jax.typeof(x)
  value = getattr(aval, _SHAPE_TYPE_FIELD, None) if _SHAPE_TYPE_FIELD else None
  if value is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, **{_SHAPE_TYPE_FIELD: value})


def is_batched(value) -> bool:
  """Whether `value` is being traced by `jax.vmap` (a batching tracer) at this point of tracing."""
  try:
    from jax._src.interpreters import batching  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover (a JAX without this module: assume not batched)
    return False
  return isinstance(value, batching.BatchTracer)
