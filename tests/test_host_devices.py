"""On a CPU host the main command makes one XLA device per core, as many as divide every global batch."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from vqddm_jax import parallel


@pytest.mark.parametrize("batches, cores, expected", [
    ([16, 16, 256, 32], 2, 2), ([16, 24], 8, 8), ([12, 36], 8, 6), ([7, 14], 4, 1), ([64], 64, 8),
    ([16], 1, 1)])
def test_auto_cpu_devices_divides_every_batch_and_uses_at_most_the_cores(batches, cores, expected):
  assert parallel.auto_cpu_devices(batches, cores) == expected


_PROBE = ("from vqddm_jax import parallel; n = parallel.use_host_cores({requested}, [16, 32]); "
          "import jax; print(n, jax.local_device_count())")


def _probe(requested: int, xla_flags: str) -> str:
  env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags, "TF_CPP_MIN_LOG_LEVEL": "2"}
  out = subprocess.run([sys.executable, "-c", _PROBE.format(requested=requested)], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.strip()


def test_use_host_cores_sets_the_device_count_unless_xla_flags_already_do():
  cores = len(os.sched_getaffinity(0))
  auto = parallel.auto_cpu_devices([16, 32], cores)
  assert _probe(0, "") == f"{auto} {auto}"
  assert _probe(4, "") == "4 4"
  assert _probe(0, "--xla_force_host_platform_device_count=3") == "None 3"
