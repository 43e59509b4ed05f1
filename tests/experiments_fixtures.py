"""Helpers shared by the tests/test_experiments_*.py modules (the `data_cache` fixture is in conftest.py)."""

import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


def subprocess_env(num_devices: int) -> dict:
  """Environment for a child Python: `num_devices` CPU devices (the parent test process has 8)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def driver_command(config_json: str, workdir: str, out_npz: str, *extra: str) -> list:
  return [
    sys.executable,
    os.path.join(REPO, "tests", "experiments_driver.py"),
    config_json,
    workdir,
    out_npz,
    *extra,
  ]


def run_checked(cmd, env, timeout=300) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (
    f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  )
  return proc
