"""One process of tests/test_multihost_faults.py: a two-process job on 127.0.0.1 that meets one fault.

Usage: python tests/multihost_faults_child.py MODE PROCESS_ID PORT WORKDIR (run in the process's own folder)

Modes:
  kill        collectives in a loop until the test kills process 1 with SIGKILL (heartbeat timeout 5 s);
  user_error  `main.execute` where process 1 meets a user error while process 0 waits in a collective;
  files       `main.execute` of stage 1 on `images/` of the current folder, which differs between processes;
  watchdog    the training loop where step 3 hangs: process 1 sleeps (its watchdog: 3 s), process 0 waits for
              it in a collective (its watchdog: 10 min, so that process 1's ends it).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from vqddm_jax import config_schema, main, parallel
from vqddm_jax.errors import MissingInputError

HEARTBEAT_SECONDS = 5


def job_config(process_id: int, port: int, heartbeat: int):
  config = config_schema.base_config()
  config.distributed.update(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                            process_id=process_id, initialization_timeout=60, heartbeat_timeout=heartbeat,
                            shutdown_timeout=60)
  return config


def kill(config) -> None:
  parallel.initialize_distributed(config.distributed)
  for i in range(10**9):
    parallel.gather_processes(np.array(i))
    if i == 10:
      print("running", flush=True)


def user_error(config, workdir: str) -> int:
  def run_pipeline(config, workdir, mode):
    if parallel.process_index() == 1:
      raise MissingInputError("a file that only process 1 lacks")
    parallel.barrier("process 1 never comes")
  main.run_pipeline = run_pipeline
  return main.execute(config, workdir, "train_vqvae")


def files(config, workdir: str) -> int:
  config.data.update(source="image_folder", image_folder="images", channels=3, image_size=16,
                     resize="center_crop", shuffle_buffer=1, prefetch=1)
  return main.execute(config, workdir, "train_vqvae")


@dataclasses.dataclass
class _Batches:
  """Host batches `{"i": i32[1]}` (one local device) that count the steps, with a resumable position."""
  position: dict = dataclasses.field(default_factory=lambda: {"i": 0})

  def __iter__(self):
    return self

  def __next__(self):
    self.position = {"i": self.position["i"] + 1}
    return {"i": np.array([self.position["i"]], np.int32)}


class _Writer:
  def write_scalars(self, step, scalars):
    del step, scalars

  def flush(self):
    pass


def watchdog(config, workdir: str) -> None:
  from flax import struct
  from vqddm_jax.training import loop
  from vqddm_jax.training import watchdog as watchdog_lib
  parallel.initialize_distributed(config.distributed)
  watchdog_lib.set_limit(0.05 if parallel.process_index() == 1 else 10.0)

  @struct.dataclass
  class State:
    step: np.ndarray
    params: np.ndarray

  def p_step(rstate, batch, key):
    del key
    if int(batch["i"][0]) == 3:
      if parallel.process_index() == 1:
        time.sleep(600)  # hung alive, as in a read that never returns
      parallel.gather_processes(np.array(3))  # waits for process 1
    return rstate, {"finite": np.ones((1,), np.float32)}

  spec = loop.LoopConfig("test", parallel_path(workdir), num_steps=5, log_every=1, checkpoint_every=100)
  loop.run(spec, init_state=State(np.array(0, np.int32), np.zeros((2,), np.float32)), p_step=p_step,
           open_batches=lambda position: _Batches(), key=None, writer=_Writer())


def parallel_path(workdir: str):
  from etils import epath
  return epath.Path(workdir) / "checkpoints"


if __name__ == "__main__":
  mode, index, port_, workdir_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  cfg = job_config(index, port_, HEARTBEAT_SECONDS if mode == "kill" else 60)
  if mode == "kill":
    kill(cfg)
  elif mode == "watchdog":
    watchdog(cfg, workdir_)
  else:
    sys.exit({"user_error": user_error, "files": files}[mode](cfg, workdir_))
