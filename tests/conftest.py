"""Test setup: 8 real CPU devices for the multi-device tests (must happen before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
  """One prepared-dataset cache directory per test session (per xdist worker): each dataset is
  prepared once and shared by the experiments and studies tests."""
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def cpu_kernel_always(monkeypatch):
  """normjax's CPU kernel wherever it handles the step, even on these 8 devices (`helpers.needs_cpu_kernel`)."""
  monkeypatch.setenv("NORMJAX_CPU_KERNEL", "always")
