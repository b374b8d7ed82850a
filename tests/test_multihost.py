"""A real two-process job on this machine: `python -m vqddm_jax.main` twice (2 CPU devices each, gloo collectives
over 127.0.0.1, one shared work directory), as a user starts it on two hosts. Children get an explicit
environment and are ended by process id, with timeouts, whatever happens.

1. Stage 1, uninterrupted: the reference.
2. Stage 1 → encode → stage 2 → sample in a fresh work directory, with SIGTERM to process 1 alone during stage
   1: both stop at the same step after one checkpoint and exit 0.
3. The same command again on both: stage 1 resumes and ends where the reference ended, bit for bit; encode,
   stage 2 and sampling follow, both processes exit 0, and the job writes one set of outputs.

That the job equals one process with 4 devices is shown where it can be exact: the global batches of every
step (tests/test_data.py, tests/test_prior.py). The trained parameters cannot be compared bit for bit with a
one-process run here: XLA:CPU compiles the same per-device gradient into different code in a process with 4
devices than in one with 2 (measured: a jitted conv-kernel gradient on one device differs in its last bits
between such processes, whatever the collectives), and Adam amplifies those last bits in near-zero gradients.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, _session_data_dir
from vqddm_jax import checkpointing
from vqddm_jax import workdir as workdir_lib
from vqddm_jax.workdir import Workdir

STAGE1_STEPS = 32
# The tiny config with fewer levels (16x16 code maps): these processes spend most of their time compiling.
COMMON = ["--config=configs/mnist.py:tiny", "--config.refit.enabled=False", "--config.vqvae.ch_mult=(1,2)",
          "--config.prior.ch_mult=(1,)",
          f"--config.vqvae_train.num_steps={STAGE1_STEPS}", "--config.vqvae_train.checkpoint_every=8",
          "--config.vqvae_train.log_every=8", f"--config.vqvae_train.image_every={STAGE1_STEPS}",
          f"--config.vqvae_train.eval_every={STAGE1_STEPS}", "--config.sample.num_samples=8"]
TIMEOUT = 420
# The second job compiles what the first compiled (same device layout and flags): a shared cache saves that.
_CACHE = tempfile.mkdtemp(prefix="vqddm_multihost_cache_")


def _env() -> dict[str, str]:
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "JAX_PLATFORMS": "cpu",
          "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
          "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true --xla_cpu_collective_timeout_seconds=120",
          "JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(workdir: Workdir, mode: str, logs) -> list[subprocess.Popen]:
  """Both processes of one job, exactly the command a user runs on each host."""
  port = _free_port()
  procs = []
  for i in range(2):
    args = [sys.executable, "-m", "vqddm_jax.main", f"--workdir={workdir.root}", *COMMON, f"--mode={mode}",
            f"--config.data.data_dir={_session_data_dir()}", "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=logs[i], stderr=subprocess.STDOUT,
                                  start_new_session=True))
  return procs


def _wait(procs, logs) -> list[int]:
  deadline = time.monotonic() + TIMEOUT
  try:
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    for log in logs:
      log.flush()


def _run(workdir, mode, tmp_path, name, *, sigterm_after_step: int | None = None) -> tuple[list[int], list[str]]:
  """Runs one two-process job; returns the exit codes and the two logs."""
  paths = [tmp_path / f"{name}{i}.txt" for i in range(2)]
  logs = [open(p, "w") for p in paths]
  procs = []
  try:
    procs = _start_pair(workdir, mode, logs)
    if sigterm_after_step is not None:
      deadline = time.monotonic() + TIMEOUT
      while not (workdir.train("vqvae").checkpoints / str(sigterm_after_step)).exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), paths[0].read_text()[-3000:]
        time.sleep(0.1)
      procs[1].send_signal(signal.SIGTERM)  # process 1 alone
    codes = _wait(procs, logs)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for log in logs:
      log.close()
  return codes, [p.read_text(errors="replace") for p in paths]


def _ema(workdir: Workdir, stage: str):
  return jax.tree_util.tree_leaves(checkpointing.read_item(workdir.train(stage).checkpoints, "ema_params"))


@pytest.fixture(scope="module")
def prepared():
  from conftest import load_config
  from vqddm_jax import data
  config = load_config("configs/mnist.py:tiny")
  config.data.data_dir = str(_session_data_dir())
  data.prepare(config.data)  # Built once here, not raced by the children.


def test_two_process_job_stops_together_on_sigterm_resumes_exactly_and_finishes(prepared, tmp_path):
  reference, job = Workdir(tmp_path / "reference"), Workdir(tmp_path / "job")
  pipeline = "train_vqvae,encode,train_prior,sample"
  codes, logs = _run(reference, "train_vqvae", tmp_path, "reference")
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  # SIGTERM to process 1 alone: both stop at the same step, after one checkpoint, and exit 0.
  codes, logs = _run(job, pipeline, tmp_path, "stopped", sigterm_after_step=8)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  stops = [re.findall(r"every host saves at step (\d+)", log) for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  stop_step = int(stops[0][0])
  assert 8 < stop_step < STAGE1_STEPS, stop_step
  assert checkpointing.latest_step(job.train("vqvae").checkpoints) == stop_step
  assert not job.code_store.exists()  # the pipeline stopped with stage 1
  # The same command again: resumes, ends on the reference's parameters bit for bit, runs every stage.
  codes, logs = _run(job, pipeline, tmp_path, "resumed")
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert f"from step {stop_step}" in logs[0] and f"from step {stop_step}" in logs[1]
  for a, b in zip(_ema(reference, "vqvae"), _ema(job, "vqvae"), strict=True):
    np.testing.assert_array_equal(a, b)
  prior_step = checkpointing.latest_step(job.train("prior").checkpoints)
  samples = workdir_lib.read_npz(job.samples(prior_step, 20).npz)
  assert samples["codes"].shape == (8, 16, 16) and samples["images"].shape == (8, 32, 32, 1)
  assert workdir_lib.read_json(job.code_store / "meta.json")["counts"] == {"train": 4500, "test": 500}
  assert "vqddm_jax: finished in" in logs[0] and "vqddm_jax: finished in" not in logs[1]  # process 0 reports
