"""BatchNorm's training statistics and normalization on XLA:CPU as custom calls (`cpu_batch_norm.cc`).

XLA:CPU runs each of a training forward's sums as its own pass over `x` and the normalization as a
third (flax.linen's E[x²]−E[x]² too: 3 reads of `x` and a write of `y`, in 6 kernels), and an accurate
one-pass variance costs it a conditional (see `lowering.py`). Two XLA FFI kernels replace that:

  * `statistics_and_normalize` (a step without mask or `axis_name`; consecutive ghost batches each
    get their own statistics; Batch Renormalization's corrections folded in) reads `x` twice: once
    for shifted sums (a second, two-pass read only for features whose mean lies more than 3
    standard deviations from the shift, decided inside the kernel) and once to write `y`.
  * `moments` computes the same statistics only, over the rows a mask keeps: `stats.moments_and_count`
    calls it on a CPU for every features-last reduction it handles (masks, `axis_name`, where
    the devices' moments are combined exactly by Chan's formula), and XLA normalizes.

Both split the rows over XLA's intra-op thread pool; results are bitwise reproducible on one machine
(the split follows its thread count).

The C++ source ships with normjax and is compiled on first use with the host's C++ compiler
(`$CXX`, else `g++`, `-O3 -march=native`) against the XLA FFI headers of the installed jaxlib; the
library is cached under `$NORMJAX_CACHE_DIR` (default `~/.cache/normjax`), keyed by the source, the
jaxlib version and the CPU. Without a compiler, when the build fails, or with `NORMJAX_CPU_KERNEL=0`,
`available()` is False and BatchNorm keeps the portable XLA program: the kernel is an optimization,
never a requirement.

Example:
  >>> import jax.numpy as jnp
  >>> from normjax._src import cpu_kernel
  >>> if cpu_kernel.available():
  ...   y, mean, var = cpu_kernel.statistics_and_normalize(
  ...       jnp.arange(8.0).reshape(4, 2), jnp.ones(2), jnp.zeros(2), epsilon=0.0)
  ...   print(mean.tolist(), var.tolist())
  ... else:
  ...   print([3.0, 4.0], [5.0, 5.0])
  [3.0, 4.0] [5.0, 5.0]
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np

from normjax._src import compat

TARGET = "normjax_batch_norm_forward"
MOMENTS_TARGET = "normjax_batch_norm_moments"
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_batch_norm.cc")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


_SWITCHED = []  # set only inside `switched`


@contextlib.contextmanager
def switched(on: bool):
  """Within it, functions traced use the kernel (`on`, even where XLA would gather its operand) or
  the XLA program, whatever `NORMJAX_CPU_KERNEL` says (the benchmarks compare both in one process).

  Example:
    >>> from normjax._src import cpu_kernel
    >>> with cpu_kernel.switched(False):
    ...   cpu_kernel.enabled()
    False
  """
  _SWITCHED.append(bool(on))
  try:
    yield
  finally:
    _SWITCHED.pop()


def enabled() -> bool:
  """Whether functions traced now use the kernel (read at each trace).

  The innermost `switched` decides; else `NORMJAX_CPU_KERNEL`: "0" never, "always" always, anything
  else (the default) only where the program runs whole on each device (`runs_whole_on_each_device`).
  XLA's SPMD partitioner cannot split a custom call: under automatic sharding (`jit` of sharded
  inputs) it would gather `x` onto every device, where the XLA program's reductions become partial
  sums and an all-reduce.
  """
  if _SWITCHED:
    return _SWITCHED[-1]
  mode = os.environ.get("NORMJAX_CPU_KERNEL", "1")
  if mode == "0":
    return False
  return mode == "always" or runs_whole_on_each_device()


def runs_whole_on_each_device() -> bool:
  """True inside `shard_map` with every mesh axis manual, or, outside any mesh, when the process has
  one CPU device (`pmap` and `jit` of sharded inputs on several devices then keep the XLA program)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.axis_names:
    return all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
  return len(jax.devices("cpu")) == 1


def handles(shape, dtype, out_dtype, grouped: bool = False) -> bool:
  """Whether the kernel computes a training step of `x` with this shape and dtype, `y` in
  `out_dtype`: float32 or bfloat16 each, at least one feature and one row (per group: `grouped`
  counts axis 0 as groups), and the kernel built."""
  ok = len(shape) >= (2 if grouped else 1) and np.prod(shape) > 0
  ok = ok and jnp.dtype(dtype) in _DTYPES and jnp.dtype(out_dtype) in _DTYPES
  return bool(ok) and available()


def available() -> bool:
  """Whether the kernel is enabled, built (building it on the first call) and registered."""
  return enabled() and _library() is not None


@functools.lru_cache(maxsize=None)
def _library() -> Optional[str]:
  """The path of the registered library, or None (with a warning) when it cannot be built."""
  try:
    path = _build()
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in (
      (TARGET, "NormjaxBatchNormForward"),
      (MOMENTS_TARGET, "NormjaxBatchNormMoments"),
    ):
      jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
      )
    return path
  except (OSError, subprocess.SubprocessError, AttributeError) as error:
    warnings.warn(
      f"normjax: the CPU BatchNorm kernel could not be built ({error}); "
      "BatchNorm uses the portable XLA program on this machine",
      RuntimeWarning,
      stacklevel=2,
    )
    return None


def _build() -> str:
  """Compiles `cpu_batch_norm.cc` into the cache (atomically) unless it is there; returns its path."""
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise OSError("no C++ compiler found (set CXX)")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(
    b"\0".join(
      [source, jaxlib.version.__version__.encode(), compiler.encode(), " ".join(_FLAGS).encode()]
      + [_cpu_signature().encode(), platform.machine().encode()]
    )
  ).hexdigest()[:16]
  cache = os.environ.get("NORMJAX_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "normjax"
  )
  path = os.path.join(cache, f"cpu_batch_norm-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as scratch:
    built = os.path.join(scratch, "lib.so")
    command = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", built]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      raise OSError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    os.replace(built, path)  # atomic: concurrent builders each install a complete library
  return path


def _cpu_signature() -> str:
  """The CPU's model and flags (`-march=native` code must not run on another CPU)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def statistics_and_normalize(
  x, scale, bias, *, epsilon: float, dtype=None, grouped: bool = False, renorm=None
):
  """`(y, mean, var)` of a BatchNorm training step over every axis of `x` but the last, on a CPU.

  Args:
    x: float32 or bfloat16, features last (`handles(x.shape, x.dtype, dtype, grouped)`).
    scale, bias: float32 `(C,)` vectors (ones / zeros for none).
    epsilon: added to the variance.
    dtype: `y`'s dtype (default `x.dtype`).
    grouped: axis 0 indexes groups (BatchNorm's ghost batches), each normalized by its own
      statistics over the other axes but the last.
    renorm: None, or Batch Renormalization's `(running_mean, running_var, r_max, d_max)` (float32
      `(C,)`, `(C,)` and scalars): each group's corrections `r = clip(sqrt((var + ε)/(running_var +
      ε)), 1/r_max, r_max)` and `d = clip((mean − running_mean)·rsqrt(running_var + ε), −d_max,
      d_max)` (`renorm.clipped_corrections`) fold into the affine: scale·r and bias + scale·d.

  Returns:
    `y` of `x`'s shape in `dtype` (`(x − mean)·(scale·rsqrt(var + epsilon)) + bias`, rounded once) and
    the float32 mean and biased variance, `(C,)` (`(G, C)` when `grouped`), accumulated in float64
    from float32 blocks.

  Raises:
    ValueError: the kernel does not handle `x` (see `handles`), naming its shape and dtypes.
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  _check_handled(x, dtype, grouped)
  features, groups, vector = _per_feature_result(x, grouped)
  call = jax.ffi.ffi_call(
    TARGET, (jax.ShapeDtypeStruct(x.shape, dtype), vector, vector), vmap_method="sequential"
  )
  as_vector = lambda v: compat.vary_like(x, jnp.asarray(v, jnp.float32).reshape(features))  # noqa: E731
  if renorm is None:
    reference = (compat.vary_like(x, jnp.zeros((0,), jnp.float32)),) * 3
  else:
    running_mean, running_var, r_max, d_max = renorm
    limits = jnp.stack([jnp.asarray(r_max, jnp.float32), jnp.asarray(d_max, jnp.float32)])
    reference = (as_vector(running_mean), as_vector(running_var), compat.vary_like(x, limits))
  results = call(
    x,
    as_vector(scale),
    as_vector(bias),
    *reference,
    epsilon=np.float32(epsilon),
    groups=np.int64(groups),
  )
  # under shard_map, typed as varying like x (as they are: each device computes its own)
  return tuple(compat.vary_like(x, r) for r in results)


def moments(x, valid=None, *, groups: Optional[int] = None):
  """`(mean, var)` of `x` over every axis but the last, on a CPU (per group of rows with `groups`).

  The statistics of `statistics_and_normalize`, without `y`: one read of `x` (two where a feature's
  mean lies far from the shift). Differentiable (`jax.custom_jvp`, any order): the tangents are
  `Σ dx / n` and `2 Σ (x − mean)·dx / n` over the valid rows, computed by XLA.

  Args:
    x: float32 or bfloat16, features last (`handles(x.shape, x.dtype, x.dtype)`).
    valid: None (every element counts) or a boolean mask of `x.shape[:-1]` (or broadcastable to it):
      a row (all features of one position) counts where it is True; the values of the others are never
      read into the statistics (NaN there is harmless). A group without a valid row gets mean 0 and
      variance 0.
    groups: None, or the number of consecutive equal slices of axis 0 (BatchNorm's ghost batches)
      that each get their own statistics. `x` keeps its own shape (XLA:CPU would copy a reshaped
      bfloat16 operand).

  Returns:
    The float32 mean and biased variance, `(C,)` (`(groups, C)` with `groups`).

  Raises:
    ValueError: the kernel does not handle `x` (see `handles`), or `groups` does not divide axis 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import cpu_kernel
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> mean, var = cpu_kernel.moments(x) if cpu_kernel.available() else (x.mean(0), x.var(0))
    >>> print(mean.tolist(), var.tolist())
    [3.0, 4.0] [5.0, 5.0]
  """
  _check_handled(x, x.dtype, False)
  if groups is not None and (groups < 1 or x.ndim < 2 or x.shape[0] % groups):
    raise ValueError(f"groups={groups} must divide axis 0 of x (shape {x.shape})")
  if valid is None:
    flags = jnp.zeros((0,), jnp.uint8)
  else:
    flags = jnp.broadcast_to(jnp.asarray(valid, bool), x.shape[:-1]).astype(jnp.uint8)
  return _moments(groups, x, flags)


def _run_moments(groups, x, flags):
  features = x.shape[-1]
  vector = jax.ShapeDtypeStruct((features,) if groups is None else (groups, features), jnp.float32)
  call = jax.ffi.ffi_call(MOMENTS_TARGET, (vector, vector), vmap_method="sequential")
  flags = compat.vary_like(x, flags)
  results = call(x, flags, groups=np.int64(1 if groups is None else groups))
  return tuple(compat.vary_like(x, r) for r in results)


_moments = jax.custom_jvp(_run_moments, nondiff_argnums=(0,))


@_moments.defjvp
def _moments_jvp(groups, primals, tangents):
  (x, flags), (dx, _) = primals, tangents
  mean, var = _moments(groups, x, flags)  # itself: higher orders work
  grouped = (1 if groups is None else groups, -1, x.shape[-1])  # (groups, rows, C), float32 views
  valid = flags.astype(bool).reshape(grouped[:2] + (1,)) if flags.size else None
  dmean, dvar = moments_tangents(
    x.reshape(grouped), mean.reshape(grouped[0], 1, -1), dx.reshape(grouped), (1,), valid
  )
  return (mean, var), (dmean.reshape(mean.shape), dvar.reshape(var.shape))


def moments_tangents(x, mean, dx, axes, valid=None):
  """The tangents of the mean and biased variance of `x` over `axes`: `Σ dx / n` and
  `2 Σ (x − mean)·dx / n` over the valid elements (`n` of them; both 0 where there is none), in
  float32. Used by this module's and `fused_batch_norm`'s custom JVPs.

  Args:
    x, dx: the input and its tangent.
    mean: the statistics' mean, broadcastable against `x` (keepdims over `axes`).
    axes: the reduced axes.
    valid: None (every element counts) or a boolean mask of `x`'s rank, broadcastable against it;
      elements where it is False contribute nothing (a NaN there is harmless).

  Returns:
    `(dmean, dvar)`, reduced over `axes`.

  Example:
    >>> import jax.numpy as jnp
    >>> from normjax._src import cpu_kernel
    >>> x = jnp.array([[1.0], [3.0]])
    >>> dmean, dvar = cpu_kernel.moments_tangents(x, x.mean(0), jnp.array([[1.0], [0.0]]), (0,))
    >>> float(dmean[0]), float(dvar[0])  # moving x[0] by t: mean by t/2, var by 2·(1−2)·t/2
    (0.5, -1.0)
  """
  u = dx.astype(jnp.float32)
  deviation = (x.astype(jnp.float32) - mean) * u
  if valid is None:
    scale = 1.0 / float(np.prod([x.shape[a] for a in axes]))
  else:
    u, deviation = jnp.where(valid, u, 0.0), jnp.where(valid, deviation, 0.0)
    n = jnp.sum(valid.astype(jnp.float32), axes)
    scale = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)
  return jnp.sum(u, axes) * scale, 2.0 * jnp.sum(deviation, axes) * scale


def _check_handled(x, dtype, grouped):
  if not handles(x.shape, x.dtype, dtype, grouped):
    raise ValueError(
      f"x of shape {x.shape} and dtype {x.dtype} (output {dtype}, grouped={grouped}) is not handled "
      f"by the CPU BatchNorm kernel: expected float32 or bfloat16, at least one feature and row, and "
      f"the kernel built (available() = {available()})"
    )


def _per_feature_result(x, grouped):
  """`(features, groups, the ShapeDtypeStruct of a per-feature float32 result)`."""
  features = x.shape[-1]
  groups = x.shape[0] if grouped else 1
  vector = jax.ShapeDtypeStruct((groups, features) if grouped else (features,), jnp.float32)
  return features, groups, vector
