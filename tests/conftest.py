"""Test set-up: 8 fake CPU devices, forced before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the flag above)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.local_device_count() == 8, jax.devices()
  return jax.local_device_count()
