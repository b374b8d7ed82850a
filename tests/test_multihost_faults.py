"""Faults in a real two-process job on this machine (gloo over 127.0.0.1, one CPU device per process), each
ending every process promptly with a clear message: a process killed with SIGKILL, a user error on one
process, hosts that see different image files, a training step that hangs (the watchdog). The processes run
tests/multihost_faults_child.py, each in a folder of its own (its "host"), with an explicit environment, and are
ended by process id, with a timeout, whatever happens."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import multihost_faults_child as child
from conftest import ROOT
from test_multihost import _free_port, _wait
from vqddm_jax import agreement, parallel
from vqddm_jax.training import watchdog

sys.path.insert(0, str(ROOT / "launch"))
import tpu_vm  # noqa: E402

TIMEOUT = 90


def _start(mode: str, tmp_path) -> tuple[list[subprocess.Popen], list]:
  env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_collective_timeout_seconds=60"}
  port, workdir, procs, logs = _free_port(), tmp_path / "work", [], []
  for i in range(2):
    host = tmp_path / f"host{i}"
    host.mkdir(exist_ok=True)
    logs.append(host / "log.txt")
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, str(ROOT / "tests" / "multihost_faults_child.py"), mode, str(i), str(port),
           str(workdir)], cwd=host, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
  return procs, logs


def _texts(logs) -> list[str]:
  return [log.read_text(errors="replace") for log in logs]


def test_sigkill_of_one_process_ends_the_other_within_the_heartbeat_timeout(tmp_path):
  procs, logs = _start("kill", tmp_path)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not all("running" in t for t in _texts(logs)):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "\n".join(_texts(logs))
      time.sleep(0.1)
    killed = time.monotonic()
    os.kill(procs[1].pid, signal.SIGKILL)
    code = procs[0].wait(timeout=child.HEARTBEAT_SECONDS + 30)
    seconds = time.monotonic() - killed
  finally:
    _wait(procs, [], timeout=5)
  text = _texts(logs)[0]
  print(f"process 0 ended {seconds:.1f} s after SIGKILL of process 1 (heartbeat timeout "
        f"{child.HEARTBEAT_SECONDS} s), exit {code}")
  assert code != 0
  assert seconds < child.HEARTBEAT_SECONDS + 5, seconds
  # JAX's own words, from the heartbeat check that config.distributed.heartbeat_timeout sets.
  assert "another task died" in text and "stopped sending heartbeats" in text, text[-3000:]


def test_a_user_error_on_one_process_ends_both_at_once(tmp_path):
  started = time.monotonic()
  procs, logs = _start("user_error", tmp_path)
  codes = _wait(procs, [], timeout=TIMEOUT)
  seconds, texts = time.monotonic() - started, _texts(logs)
  assert codes == [2, 2], "\n".join(t[-3000:] for t in texts)
  assert seconds < 30, seconds  # start-up included; JAX's own timeouts here are 60 s
  assert "vqddm_jax: a file that only process 1 lacks" in texts[1]
  # Process 0 waited in a collective, with heartbeat and shutdown timeouts of 60 s: job_end ended it.
  assert "vqddm_jax: process 1 of 2 ended the job (exit 2): a file that only process 1 lacks" in texts[0]


def test_hosts_that_list_different_image_files_stop_with_one_message(tmp_path):
  for host, train in ((0, 6), (1, 5)):  # Host 1 misses a file, as after a transient NFS error.
    for split, n in (("train", train), ("test", 2)):
      folder = tmp_path / f"host{host}" / "images" / split
      folder.mkdir(parents=True)
      for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
  procs, logs = _start("files", tmp_path)
  codes = _wait(procs, [], timeout=TIMEOUT)
  texts = _texts(logs)
  assert codes == [2, 2], "\n".join(t[-3000:] for t in texts)
  for text in texts:
    assert "do not see the same files in image folder listing of" in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("  train: ")]
    assert len(lines) == 1 and "'6 files, sha256 " in lines[0] and "on process 0;" in lines[0], lines
    assert "'5 files, sha256 " in lines[0] and lines[0].endswith("on process 1"), lines
    assert "  test: " not in text  # the held-out split agrees


def test_the_watchdog_ends_a_hung_step_on_every_process_with_the_resumable_code(tmp_path):
  procs, logs = _start("watchdog", tmp_path)
  codes = _wait(procs, [], timeout=TIMEOUT)
  texts = _texts(logs)
  assert codes == [watchdog.EXIT_STALLED] * 2, "\n".join(t[-3000:] for t in texts)
  assert "vqddm_jax: watchdog: test: step 3 (" in texts[1] and "has not finished after" in texts[1]
  assert "in p_step" in texts[1]  # every thread's Python stack: where the main thread hangs
  code = watchdog.EXIT_STALLED
  assert f"vqddm_jax: process 1 of 2 ended the job (exit {code}): watchdog: test: step 3" in texts[0]
  assert watchdog.EXIT_STALLED == 75 and str(watchdog.EXIT_STALLED) in tpu_vm.RESUMABLE_EXIT_CODES


def test_processes_are_named_in_ranges():
  assert agreement._processes([3]) == "process 3"
  assert agreement._processes([0, 1, 2, 5, 7, 8]) == "processes 0-2, 5, 7-8"


def test_the_timeouts_reach_jax_distributed_initialize(monkeypatch):
  from vqddm_jax import config_schema
  from vqddm_jax.errors import UserError
  got = {}

  def initialize(**kwargs):
    got.update(kwargs)
    raise RuntimeError("no cluster here")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  distributed = config_schema.base_config().distributed
  distributed.update(enabled=True, heartbeat_timeout=7, shutdown_timeout=11)
  with pytest.raises(UserError, match="jax.distributed could not start"):
    parallel.initialize_distributed(distributed)
  assert got == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 7, "shutdown_timeout_seconds": 11}
