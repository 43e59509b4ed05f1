"""BatchNorm's training statistics and normalization on XLA:CPU as one custom call (`cpu_batch_norm.cc`).

XLA:CPU runs each of a training forward's sums as its own pass over `x` and the normalization as a
third (flax.linen's E[x²]−E[x]² too: 3 reads of `x` and a write of `y`, in 6 kernels), and an accurate
one-pass variance costs it a conditional (see `lowering.py`). This XLA FFI kernel (for a step without mask,
`axis_name` or renorm; consecutive ghost batches each get their own statistics) reads `x` twice:
once for shifted sums (a second, two-pass read only for features whose mean lies more than 3 standard
deviations from the shift, decided inside the kernel) and once to write `y`. It splits the rows over
XLA's intra-op thread pool.

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
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_batch_norm.cc")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


_SWITCHED = []  # set only inside `switched`


@contextlib.contextmanager
def switched(on: bool):
  """Within it, functions traced use the kernel (`on`) or the XLA program, whatever
  `NORMJAX_CPU_KERNEL` says (the benchmarks compare both in one process).

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
  """The innermost `switched`, else False when `NORMJAX_CPU_KERNEL` is 0 (read at each trace)."""
  if _SWITCHED:
    return _SWITCHED[-1]
  return os.environ.get("NORMJAX_CPU_KERNEL", "1") != "0"


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
    jax.ffi.register_ffi_target(
      TARGET, jax.ffi.pycapsule(library.NormjaxBatchNormForward), platform="cpu"
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


def statistics_and_normalize(x, scale, bias, *, epsilon: float, dtype=None, grouped: bool = False):
  """`(y, mean, var)` of a BatchNorm training step over every axis of `x` but the last, on a CPU.

  Args:
    x: float32 or bfloat16, features last (`handles(x.shape, x.dtype, dtype, grouped)`).
    scale, bias: float32 `(C,)` vectors (ones / zeros for none).
    epsilon: added to the variance.
    dtype: `y`'s dtype (default `x.dtype`).
    grouped: axis 0 indexes groups (BatchNorm's ghost batches), each normalized by its own
      statistics over the other axes but the last.

  Returns:
    `y` of `x`'s shape in `dtype` (`(x − mean)·(scale·rsqrt(var + epsilon)) + bias`, rounded once) and
    the float32 mean and biased variance, `(C,)` (`(G, C)` when `grouped`), accumulated in float64
    from float32 blocks.

  Raises:
    ValueError: the kernel does not handle `x` (see `handles`), naming its shape and dtypes.
  """
  dtype = jnp.dtype(dtype if dtype is not None else x.dtype)
  if not handles(x.shape, x.dtype, dtype, grouped):
    raise ValueError(
      f"x of shape {x.shape} and dtype {x.dtype} (output {dtype}, grouped={grouped}) is not handled "
      f"by the CPU BatchNorm kernel: expected float32 or bfloat16, at least one feature and row, and "
      f"the kernel built (available() = {available()})"
    )
  features = x.shape[-1]
  groups = x.shape[0] if grouped else 1
  vector = jax.ShapeDtypeStruct((groups, features) if grouped else (features,), jnp.float32)
  call = jax.ffi.ffi_call(
    TARGET, (jax.ShapeDtypeStruct(x.shape, dtype), vector, vector), vmap_method="sequential"
  )
  as_vector = lambda v: compat.vary_like(x, jnp.asarray(v, jnp.float32).reshape(features))  # noqa: E731
  results = call(
    x, as_vector(scale), as_vector(bias), epsilon=np.float32(epsilon), groups=np.int64(groups)
  )
  # under shard_map, typed as varying like x (as they are: each device computes its own)
  return tuple(compat.vary_like(x, r) for r in results)
