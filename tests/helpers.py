"""Plain helper functions shared by the test modules (import as `from tests import helpers`).

Fixtures live in `conftest.py`; these are ordinary functions so a test module can call them at import time
(e.g. inside `pytest.mark.parametrize`).
"""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normal_data(shape, mean=0.0, std=1.0, seed=0, dtype=np.float32) -> np.ndarray:
  """`mean + std * N(0, 1)` samples of `shape` from `np.random.default_rng(seed)`, cast to `dtype`.

  The draw is made in float64 and cast once, so the same seed gives the same numbers in every dtype.
  """
  return (mean + std * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


PROGRAMS = ("cpu_kernel", "cpu_xla", "portable")


def use_program(monkeypatch, program: str) -> None:
  """Makes BatchNorm's training step trace as one of its CPU-compilable programs: "cpu_kernel" (the
  default on a CPU: the custom call `normjax._src.cpu_kernel` where it handles the step), "cpu_xla"
  (the kernel off: the CPU lowering of `lowering.py`) or "portable" (the GPU / TPU program)."""
  from normjax._src import lowering  # pylint: disable=import-outside-toplevel

  if program not in PROGRAMS:
    raise ValueError(f"program={program!r} must be one of {PROGRAMS}")
  # the tests run with 8 CPU devices, where the default keeps plain `jit` on the XLA program
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "always" if program == "cpu_kernel" else "0")
  if program == "portable":
    monkeypatch.setattr(lowering, "cpu_or_portable", lambda *a, cpu, portable: portable(*a))


def needs_cpu_kernel():
  """The marks of a test module that runs normjax's CPU kernel: skipped where it cannot be built, and
  with `NORMJAX_CPU_KERNEL=always` (the `cpu_kernel_always` fixture): the tests run on 8 CPU devices,
  where plain `jit` keeps the XLA program by default (`cpu_kernel.runs_whole_on_each_device`)."""
  from normjax._src import cpu_kernel  # pylint: disable=import-outside-toplevel

  skip = pytest.mark.skipif(
    cpu_kernel._library() is None,  # pylint: disable=protected-access
    reason="no C++ compiler: BatchNorm uses the XLA program on this host",
  )
  return [skip, pytest.mark.usefixtures("cpu_kernel_always")]


def run_python(*args, check=False, env=None):
  """`python *args` in the repository root with it on the path (and `env` added to the environment);
  the completed process, its output captured as text."""
  env = dict(os.environ, **(env or {}))
  env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=check,
  )


needs_glibc = pytest.mark.skipif(
  not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
  reason="glibc only (the benchmarks' host-memory modes call its mallopt)",
)
