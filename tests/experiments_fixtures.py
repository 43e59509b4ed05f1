"""Fixtures shared by the tests/test_experiments_*.py modules (import them from there)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
_CACHE = {}


@pytest.fixture
def data_cache(tmp_path_factory) -> str:
  """One prepared-dataset cache directory for the whole test session (each dataset is prepared once)."""
  if "dir" not in _CACHE:
    _CACHE["dir"] = str(tmp_path_factory.mktemp("data_cache"))
  return _CACHE["dir"]


def subprocess_env(num_devices: int) -> dict:
  """Environment for a child Python: `num_devices` CPU devices (the parent test process has 8)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def driver_command(config_json: str, workdir: str, out_npz: str, *extra: str) -> list:
  return [sys.executable, os.path.join(REPO, "tests", "experiments_driver.py"), config_json, workdir, out_npz,
          *extra]


def run_checked(cmd, env, timeout=300) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc
