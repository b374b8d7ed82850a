"""Checks a host before a (multi-host) job: `python -m vqddm_jax.preflight --workdir=DIR [--distributed]`.

Prints one line per process: its index and the process count, local and global devices and their platform,
the code version (`vqddm_jax.code_version`); then checks that the work directory takes a small file (through
`etils.epath`, so `gs://` works) and a tiny Orbax checkpoint (through `vqddm_jax.checkpointing`, the way the
stages save). With `--distributed` it first joins the job (`jax.distributed.initialize()`, auto-detected on
Cloud TPU and SLURM) and checks that every process runs the same code. Exit 0 when all checks pass, 1 with
the reason otherwise.
"""
from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from flax import struct
import numpy as np


@struct.dataclass
class _State:
  step: Any
  params: Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vqddm_jax.preflight", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the job's work directory (gs://... on TPU pods)")
  parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
  parser.add_argument("--local_device_ids", default=None,
                      help="with --distributed: this process's devices, e.g. 0,1,2,3 (SLURM, one task per node)")
  # Auto-detected on Cloud TPU and SLURM; needed elsewhere (e.g. several processes on one machine).
  parser.add_argument("--coordinator_address", default=None, help="with --distributed: HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=None, help="with --distributed: number of processes")
  parser.add_argument("--process_id", type=int, default=None, help="with --distributed: this process's index")
  return parser.parse_args(argv)


def _check_same_code(version: str) -> None:
  """Raises when the processes of the job run different code (compares every process's version)."""
  from vqddm_jax import agreement
  agreement.check_same_on_every_process("code", {"code version": version})


def _check_file(workdir: str, process: int, token: str) -> None:
  from etils import epath
  path = epath.Path(workdir) / "preflight" / f"process_{process}.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(token)
  got = path.read_text()
  if got != token:
    raise RuntimeError(f"{path} reads back {got!r}, not the {token!r} just written")
  path.unlink()


def _check_orbax(workdir: str, version: str) -> None:
  """Saves and restores a tiny state with the project's Checkpointer under WORKDIR/preflight/orbax."""
  import jax
  from etils import epath
  from vqddm_jax import checkpointing
  directory = epath.Path(workdir) / "preflight" / "orbax"
  ckpt = checkpointing.Checkpointer(str(directory))
  try:
    # Every process reads the same latest step before the collective save, so they agree on the new one.
    step = (ckpt.latest_step() or 0) + 1
    state = _State(step=np.int32(step), params={"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step})
    ckpt.save(step, state, {"code_version": version})
    # A path helper that mistakes gs://... for a local path would save to local disk "successfully".
    if jax.process_index() == 0 and not (directory / str(step)).exists():
      raise RuntimeError(f"the checkpoint was not written to {directory}/{step} (the Checkpointer wrote to "
                         f"{ckpt.directory})")
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    restored, meta = ckpt.restore(abstract)
    if int(restored.step) != step or not np.array_equal(restored.params["w"], state.params["w"]):
      raise RuntimeError(f"checkpoint {directory}/{step} restored different values")
    if meta.get("code_version") != version:
      raise RuntimeError(f"checkpoint {directory}/{step} restored meta {meta}")
  finally:
    ckpt.close()


def main(argv: list[str] | None = None) -> int:
  args = _parse(argv)
  import jax
  if args.distributed:
    # Must precede anything that starts the backend (jax.devices() and the like).
    ids = [int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids else None
    try:
      jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes, process_id=args.process_id,
                                 local_device_ids=ids)
    except Exception as e:  # pylint: disable=broad-except
      print(f"preflight FAILED: jax.distributed.initialize(): {type(e).__name__}: {e}", file=sys.stderr)
      return 1
  from vqddm_jax.code_version import code_version
  version = code_version()
  devices = jax.devices()
  who = (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
         f"{len(devices)} global devices ({devices[0].platform}), code {version}")
  checks = (("same code on every process", lambda: _check_same_code(version)),
            (f"file under {args.workdir}/preflight", lambda: _check_file(
                args.workdir, jax.process_index(), f"{version} {uuid.uuid4().hex}")),
            (f"Orbax save/restore under {args.workdir}/preflight/orbax", lambda: _check_orbax(
                args.workdir, version)))
  for name, check in checks:
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      print(f"preflight FAILED: {who}: {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      return 1
  print(f"preflight ok: {who}, workdir {args.workdir} (file and Orbax checkpoint written and read back)",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
