"""BatchNorm's closed-form tangent as one linear primitive whose transpose is the Pallas backward kernel.

`fused_batch_norm` gives the training-mode derivative as a linear map of the tangents,

    dy = a·(dx − Σ dx / n − x̂·Σ(dx·x̂) / n) + dscale·x̂ + dbias,   a = scale·rstd,

and JAX's reverse mode transposes it into XLA's two-pass backward. `batch_norm_tangent_p` is that map
as a single primitive, linear in `(dx, dscale, dbias)`, so that its transpose can be a kernel:

  * **transpose** (reverse mode): the map is self-adjoint in `dx` (`1·1ᵀ` and `x̂·x̂ᵀ` are symmetric), so
    the cotangent `g` of `dy` gives `dx̄ = a·(g − Σ g / n − x̂·Σ(g·x̂) / n)`, `dscālē = Σ g·x̂` and
    `dbiās = Σ g`: exactly the Pallas backward kernel (`pallas_backward`, 3 N bytes) where it fits,
    else its two-sweep form (`pallas_streaming`) where that moves less than XLA
    (`pallas_plan.backward_kernel`); elsewhere the transpose of XLA's formula. The kernel is wrapped in a `jax.custom_jvp` whose rule
    is XLA's backward, so reverse-over-reverse and forward-over-reverse still differentiate it.
  * **evaluation** (forward mode, `jax.jvp`, `jax.jacfwd`): the XLA formula (`formula`).
  * **its own JVP** (higher orders through the tangent): `jax.jvp` of the same formula.
  * **vmap**: `jax.vmap` of the formula (XLA's program; the kernel reduces over all axes but features).

The primitive is bound only by the TPU branch of BatchNorm's training step (`fused_batch_norm`'s
`kernel="pallas"`): CPU and GPU programs never contain it.

Reference:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
  Covariate Shift", ICML 2015, arXiv:1502.03167 (§3).
"""

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from normjax._src import compat
from normjax._src import pallas_backward
from normjax._src import pallas_batch_norm
from normjax._src import pallas_plan
from normjax._src import pallas_streaming

batch_norm_tangent_p = Primitive("normjax_batch_norm_tangent")


def batch_norm_tangent(
  x, mean, rstd, scale, dx, dscale, dbias, *, dtype=None, interpret=False, budget=None
):
  """`dy` of a training step without mask, ghost groups or renorm, statistics over all axes but the
  last, for the tangents `dx` (`x`'s shape), `dscale`, `dbias` (per feature, any of them None).

  Args:
    x: the input, features last.
    mean, rstd, scale: per-feature float32 values (`x`'s rank, keepdims), `rstd = 1/sqrt(var + ε)`;
      `scale` None for none.
    dx, dscale, dbias: the tangents, or None for a zero tangent.
    dtype: `dy`'s dtype, `y`'s (default `dx`'s).
    interpret, budget: for the transpose's Pallas kernel (`pallas_backward.backward`).

  Returns:
    `dy` in `dtype`, varying like `x` under `shard_map`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from normjax._src import kernel_tangent
    >>> x = jnp.arange(32.0).reshape(16, 2)
    >>> mean, rstd = x.mean(0, keepdims=True), 1 / x.std(0, keepdims=True)
    >>> f = lambda t: kernel_tangent.batch_norm_tangent(x, mean, rstd, None, t, None, None,
    ...                                                 interpret=True)
    >>> dx, = jax.linear_transpose(f, x)(x)  # the Pallas backward kernel, interpreted
    >>> round(float(jnp.abs(dx).max()), 6)  # x itself is normalized away
    0.0
  """
  per_feature = mean.shape
  vector = lambda v, fill: jnp.full(per_feature, fill, jnp.float32) if v is None else v  # noqa: E731
  scale = vector(scale, 1.0).astype(jnp.float32)
  dscale, dbias = (vector(v, 0.0).astype(jnp.float32) for v in (dscale, dbias))
  dx = compat.vary_like(x, dx)
  operands = [x, mean, rstd, scale, dx, dscale, dbias]
  operands = [compat.vary_like(dx, v) for v in operands]  # one varying type for all (check_vma)
  dtype = jnp.dtype(dx.dtype if dtype is None else dtype)
  return batch_norm_tangent_p.bind(*operands, dtype=dtype, interpret=bool(interpret), budget=budget)


def formula(x, mean, rstd, scale, dx, dscale, dbias, *, dtype=None):
  """The tangent in XLA operations: `fused_batch_norm`'s portable closed form (float32 arithmetic,
  rounded once to `dtype`, default `dx`'s)."""
  from normjax._src import fused_batch_norm  # pylint: disable=g-import-not-at-top  (imports this)

  dtype = dx.dtype if dtype is None else dtype
  return fused_batch_norm.portable_tangent(x, mean, rstd, scale, dx, dscale, dbias, dtype=dtype)


def _abstract_eval(x, mean, rstd, scale, dx, dscale, dbias, *, dtype, **_):
  return dx.update(dtype=dtype, weak_type=False)  # `dx`'s shape and varying axes


def _transpose(ct, x, mean, rstd, scale, dx, dscale, dbias, *, dtype, interpret, budget):
  linear = (dx, dscale, dbias)
  if any(ad.is_undefined_primal(v) for v in (x, mean, rstd, scale)):
    raise NotImplementedError("batch_norm_tangent is linear only in (dx, dscale, dbias)")
  if type(ct) is ad.Zero:  # noqa: E721
    return [None] * 4 + [None] * 3
  dx_aval = dx.aval if ad.is_undefined_primal(dx) else jax.typeof(dx)
  if pallas_plan.backward_kernel(x.shape, x.dtype, ct.dtype, budget) is not None:
    run = functools.partial(_kernel_backward, interpret, budget, dx_aval.dtype)
  else:
    run = functools.partial(_xla_backward, dx_aval.dtype)
  cts = run(x, mean, rstd, scale, ct)
  return [None] * 4 + [c if ad.is_undefined_primal(v) else None for c, v in zip(cts, linear)]


def _xla_backward(dx_dtype, x, mean, rstd, scale, g):
  """`(dx̄, dscālē, dbiās)`: the transpose of `formula` by JAX (XLA's closed-form backward)."""
  zeros = (jnp.zeros(x.shape, dx_dtype), jnp.zeros_like(mean), jnp.zeros_like(mean))
  zeros = [compat.vary_like(g, z) for z in zeros]
  _, pullback = jax.vjp(lambda *t: formula(x, mean, rstd, scale, *t, dtype=g.dtype), *zeros)
  return pullback(g)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _kernel_backward(interpret, budget, dx_dtype, x, mean, rstd, scale, g):
  """`_xla_backward`'s values from the Pallas kernel; its derivatives are XLA's (below)."""
  budget = pallas_batch_norm.vmem_budget() if budget is None else budget
  resident = pallas_plan.backward_kernel(x.shape, x.dtype, g.dtype, budget) == "resident"
  run = pallas_backward if resident else pallas_streaming  # too large for VMEM: two sweeps
  dx, sum_g, sum_gx = run.backward(x, g, mean, rstd, scale, interpret=interpret, budget=budget)
  return dx.astype(dx_dtype), sum_gx.reshape(mean.shape), sum_g.reshape(mean.shape)


@_kernel_backward.defjvp
def _kernel_backward_jvp(interpret, budget, dx_dtype, primals, tangents):
  out = _kernel_backward(interpret, budget, dx_dtype, *primals)
  _, out_dot = jax.jvp(functools.partial(_xla_backward, dx_dtype), primals, tangents)
  return out, out_dot


def _jvp(primals, tangents, **params):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  out = batch_norm_tangent_p.bind(*primals, **params)
  evaluate = functools.partial(formula, dtype=params["dtype"])
  _, out_dot = jax.jvp(evaluate, tuple(primals), tuple(tangents))
  return out, out_dot


def _batch(values, dims, *, dtype, **_):
  values = [v if d is None else jnp.moveaxis(v, d, 0) for v, d in zip(values, dims)]
  in_axes = [None if d is None else 0 for d in dims]
  return jax.vmap(functools.partial(formula, dtype=dtype), in_axes=in_axes)(*values), 0


batch_norm_tangent_p.def_abstract_eval(_abstract_eval)
batch_norm_tangent_p.def_impl(lambda *args, dtype, **_: formula(*args, dtype=dtype))
mlir.register_lowering(
  batch_norm_tangent_p,
  mlir.lower_fun(lambda *args, dtype, **_: formula(*args, dtype=dtype), multiple_results=False),
)
ad.primitive_jvps[batch_norm_tangent_p] = _jvp
ad.primitive_transposes[batch_norm_tangent_p] = _transpose
batching.primitive_batchers[batch_norm_tangent_p] = _batch
