"""A real two-process job on this machine: `python -m vqddm_jax.main` twice (2 CPU devices each, gloo collectives
over 127.0.0.1, one shared work directory), as a user starts it on two hosts. Children get an explicit
environment and are ended by process id, with timeouts, whatever happens.

1. The reference: one process with 4 devices, stage 1 → encode → stage 2.
2. The two-process job, stage 1 → encode → stage 2 → sample in a fresh work directory, with SIGTERM to process
   1 alone during stage 1: both stop at the same step after one checkpoint and exit 0.
3. The same command again on both: stage 1 resumes; encode, stage 2 and sampling follow, both processes exit
   0, the job writes one set of outputs, and the final EMA parameters of stage 1 and stage 2 equal the
   one-process reference's bit for bit.

Two things make a 2 × 2 job and a 1 × 4 process add floats in the same order, and both runs use them:
- `--config.ordered_reductions=True`: gradients are summed over devices in device order (all-gather, then
  add) rather than by the all-reduce, whose order differs between XLA's in-process and gloo's cross-process
  implementation;
- NPROC=4: XLA:CPU sizes its intra-op thread pool as max(cores, devices) unless NPROC says otherwise, and the
  pool size decides how a dot splits its sums (measured: the same jitted dot differs in its last bits between
  a 2-device and a 4-device process on 2 cores, and agrees when both have 4 threads).
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
from vqddm_jax import files as files_lib
from vqddm_jax.workdir import Workdir

STAGE1_STEPS = 32
# The tiny config with fewer levels (16x16 code maps): these processes spend most of their time compiling.
COMMON = ["--config=configs/mnist.py:tiny", "--config.refit.enabled=False", "--config.vqvae.ch_mult=(1,2)",
          "--config.prior.ch_mult=(1,)",
          f"--config.vqvae_train.num_steps={STAGE1_STEPS}", "--config.vqvae_train.checkpoint_every=8",
          "--config.vqvae_train.log_every=8", f"--config.vqvae_train.image_every={STAGE1_STEPS}",
          f"--config.vqvae_train.eval_every={STAGE1_STEPS}", "--config.sample.num_samples=8",
          "--config.ordered_reductions=True"]
TIMEOUT = 420
# The second job compiles what the first compiled (same device layout and flags): a shared cache saves that.
_CACHE = tempfile.mkdtemp(prefix="vqddm_multihost_cache_")


def _env(devices: int = 2) -> dict[str, str]:
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "JAX_PLATFORMS": "cpu",
          "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "NPROC": "4",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true --xla_cpu_collective_timeout_seconds=120",
          "JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: Workdir, mode: str, logs) -> list[subprocess.Popen]:
  """The processes of one job, exactly the command a user runs on each host: two with 2 devices each for two
  logs, one with 4 devices for one."""
  port, pair = _free_port(), len(logs) == 2
  procs = []
  for i, log in enumerate(logs):
    args = [sys.executable, "-m", "vqddm_jax.main", f"--workdir={workdir.root}", *COMMON, f"--mode={mode}",
            f"--config.data.data_dir={_session_data_dir()}"]
    if pair:
      args += ["--config.distributed.enabled=True", "--config.distributed.num_processes=2",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(2 if pair else 4), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
  return procs


def _wait(procs, logs, timeout: float = TIMEOUT) -> list[int]:
  """Exit codes of `procs`, all within one `timeout`; whatever is still running then is killed by group."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    for log in logs:
      log.flush()


def _run(workdir, mode, tmp_path, name, *, processes: int = 2,
         sigterm_after_step: int | None = None) -> tuple[list[int], list[str]]:
  """Runs one job of `processes` processes (2, or 1 with 4 devices); returns the exit codes and the logs."""
  paths = [tmp_path / f"{name}{i}.txt" for i in range(processes)]
  logs = [open(p, "w") for p in paths]
  procs = []
  try:
    procs = _start(workdir, mode, logs)
    if sigterm_after_step is not None:
      deadline = time.monotonic() + TIMEOUT
      while not (workdir.vqvae.checkpoints / str(sigterm_after_step)).exists():
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


def test_two_process_job_stops_together_resumes_and_ends_on_the_one_process_parameters(prepared, tmp_path):
  reference, job = Workdir(tmp_path / "reference"), Workdir(tmp_path / "job")
  pipeline = "train_vqvae,encode,train_prior,sample"
  codes, logs = _run(reference, "train_vqvae,encode,train_prior", tmp_path, "reference", processes=1)
  assert codes == [0], logs[0][-3000:]
  assert "ordered_reductions: true" in logs[0]
  # SIGTERM to process 1 alone: both stop at the same step, after one checkpoint, and exit 0.
  codes, logs = _run(job, pipeline, tmp_path, "stopped", sigterm_after_step=8)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  stops = [re.findall(r"every host saves at step (\d+)", log) for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  stop_step = int(stops[0][0])
  assert 8 < stop_step < STAGE1_STEPS, stop_step
  assert checkpointing.latest_step(job.vqvae.checkpoints) == stop_step
  assert not job.code_store.exists()  # the pipeline stopped with stage 1
  # The same command again: resumes, ends on the reference's parameters bit for bit, runs every stage.
  codes, logs = _run(job, pipeline, tmp_path, "resumed")
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert f"from step {stop_step}" in logs[0] and f"from step {stop_step}" in logs[1]
  # The 2 × 2 job ends on the 1 × 4 process's parameters, bit for bit, in both stages.
  for stage in ("vqvae", "prior"):
    assert checkpointing.latest_step(job.train(stage).checkpoints) == checkpointing.latest_step(
        reference.train(stage).checkpoints)
    for a, b in zip(_ema(reference, stage), _ema(job, stage), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=stage)
  prior_step = checkpointing.latest_step(job.prior.checkpoints)
  samples = files_lib.read_npz(job.samples(prior_step, 20, num_samples=8, seed=1).npz)
  assert samples["codes"].shape == (8, 16, 16) and samples["images"].shape == (8, 32, 32, 1)
  assert files_lib.read_json(job.code_store / "meta.json")["counts"] == {"train": 4500, "test": 500}
  assert "vqddm_jax: finished in" in logs[0] and "vqddm_jax: finished in" not in logs[1]  # process 0 reports
