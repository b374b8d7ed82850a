"""The only module that knows about devices and processes.

Per-device step functions elsewhere are pure and refer to the mapped axis by the name `AXIS` ("data"); this
module maps them over the local devices with `jax.pmap` (on multi-host jobs the mapped axis spans every
device of every host; `pmap` is the one `jax.pmap` of the code), moves trees on and off the devices, and
reshapes host batches to `[local_devices, per_device, ...]`. It also starts `jax.distributed`, cuts each
process's share of a set (`host_slice`), gathers host values across processes bit for bit (float64 sums
included), and makes the one stop decision of a job (SIGTERM on any host stops every host at the same step).
"""
from __future__ import annotations

import functools
import os
import signal
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

AXIS = "data"


def local_device_count() -> int:
  return jax.local_device_count()


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


def device_count() -> int:
  """Devices of all hosts."""
  return jax.device_count()


def this_host(index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """(process index, process count): JAX's unless given (tests simulate hosts); ValueError unless
  0 <= index < count."""
  count = jax.process_count() if count is None else count
  index = jax.process_index() if index is None else index
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count})")
  return index, count


# Who gets the `total % count` items an even split leaves over (see `host_slice`).
HOST_REMAINDERS = ("spread", "first", "blocks")


def host_slice(total: int, *, process_index: int | None = None, process_count: int | None = None,
               remainder: str = "spread") -> slice:
  """This process's contiguous share of `total` items; the shares of processes 0, 1, ... tile [0, total).

  Args:
    total: how many items are shared out.
    process_index, process_count: default from JAX (tests simulate hosts).
    remainder: how the shares are cut when `total` does not divide (all agree when it does):
      "spread": share p is [p·total // P, (p+1)·total // P), larger shares later (evaluated image sets,
        ReFiT's feature vectors);
      "first": the first `total % P` shares take one more (TFDS's `split_for_jax_process`: what an eval
        split's records are, and so what image folders and `max_examples` follow);
      "blocks": blocks of ceil(total / P), the last shares shorter or empty (held-out code maps).

  Returns:
    slice(start, stop) with 0 <= start <= stop <= total.
  """
  p, n = this_host(process_index, process_count)
  if remainder == "spread":
    return slice(p * total // n, (p + 1) * total // n)
  if remainder == "first":
    base, extra = divmod(total, n)
    start = p * base + min(p, extra)
    return slice(start, start + base + (p < extra))
  if remainder == "blocks":
    share = -(-total // n)
    return slice(min(p * share, total), min((p + 1) * share, total))
  raise ValueError(f"remainder={remainder!r} is not one of {HOST_REMAINDERS}")


# Auto mode makes at most this many CPU devices: past it, the per-device copies of the optimiser update and
# the all-reduce cost more than the extra cores give back on the batch sizes a CPU run uses.
MAX_AUTO_CPU_DEVICES = 8


def auto_cpu_devices(batch_sizes: Sequence[int], cores: int) -> int:
  """The largest device count <= min(cores, MAX_AUTO_CPU_DEVICES) that divides every global batch size."""
  limit = max(1, min(cores, MAX_AUTO_CPU_DEVICES))
  return max(n for n in range(1, limit + 1) if all(b % n == 0 for b in batch_sizes))


def use_host_cores(requested: int, batch_sizes: Sequence[int]) -> int | None:
  """Sets the number of XLA CPU devices before the backend starts (`config.cpu_devices`).

  One XLA:CPU device runs most non-matmul work on one thread; one device per core lets pmap keep every core
  busy. 0 = auto (`auto_cpu_devices` over this process's cores), n > 0 = exactly n. Only the CPU backend is
  affected (a GPU/TPU host keeps its accelerators as the devices). A device count already forced through
  XLA_FLAGS (`--xla_force_host_platform_device_count`) or JAX_NUM_CPU_DEVICES wins.

  Returns:
    The count set, or None when the environment already decided it.
  """
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or os.environ.get("JAX_NUM_CPU_DEVICES")):
    return None
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    cores = os.cpu_count() or 1
  n = requested or auto_cpu_devices(batch_sizes, cores)
  jax.config.update("jax_num_cpu_devices", n)
  logging.info("CPU backend: %d XLA devices (%s; %d cores)", n, "config.cpu_devices" if requested
               else "auto", cores)
  return n


def initialize_distributed(cfg: Any) -> None:
  """Starts `jax.distributed` when `cfg.enabled` (the `config.distributed` section); a no-op otherwise.

  Must run before anything touches the JAX backend. Empty fields are left to JAX's auto-detection (Cloud
  TPU, SLURM); `local_device_ids` ("0,1,2,3") limits this process to those local devices. A process that
  stops sending heartbeats for `heartbeat_timeout` seconds (killed, host lost) ends every other process;
  `shutdown_timeout` bounds how long a process leaving normally waits for the others. Then `job_end` starts:
  a user error, an uncaught exception or the watchdog on one process ends every process within seconds.

  Raises:
    UserError: JAX refused to start (no cluster detected, or the other processes did not join in time).
  """
  if not cfg.enabled:
    return
  from vqddm_jax import job_end
  from vqddm_jax.errors import UserError
  kwargs: dict[str, Any] = {"initialization_timeout": int(cfg.initialization_timeout),
                            "heartbeat_timeout_seconds": int(cfg.heartbeat_timeout),
                            "shutdown_timeout_seconds": int(cfg.shutdown_timeout)}
  if cfg.coordinator_address:
    kwargs.update(coordinator_address=cfg.coordinator_address, num_processes=int(cfg.num_processes),
                  process_id=int(cfg.process_id))
  if cfg.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in cfg.local_device_ids.split(",")]
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise UserError(
        f"jax.distributed could not start ({type(e).__name__}: {str(e).strip().splitlines()[0]}). On Cloud "
        "TPU and SLURM run the same command on every host; elsewhere set config.distributed."
        "coordinator_address, num_processes and process_id") from e
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices; heartbeat timeout %d s",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               cfg.heartbeat_timeout)
  job_end.start()


def per_device_batch_size(global_batch_size: int) -> int:
  """Splits a global batch over hosts and local devices; raises when it does not divide evenly."""
  n = jax.device_count()
  if global_batch_size % n:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the {n} devices "
                     f"({jax.process_count()} hosts x {jax.local_device_count()} local)")
  return global_batch_size // n


@functools.lru_cache(maxsize=None)
def _local_sharding() -> jax.sharding.NamedSharding:
  """Splits a leading axis over this process's devices (the layout `jax.pmap` works on)."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def to_devices(tree: Any) -> Any:
  """Puts `[local_devices, ...]` host arrays on the devices, one slice each (pmap's input layout).

  On multi-host jobs the host arrays are returned as they are and `jax.pmap` transfers them itself.
  """
  if jax.process_count() > 1:
    return tree
  return jax.device_put(tree, _local_sharding())


def replicate(tree: Any) -> Any:
  """Copies a tree to every local device (leading axis = local devices)."""
  n = jax.local_device_count()
  return to_devices(jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))


def first_local(tree: Any) -> Any:
  """The first local device's shard `[1, ...]` of every `[local_devices, ...]` leaf, without computing
  anything (on multi-host jobs even indexing a mapped output would be a program of its own)."""
  return jax.tree_util.tree_map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x)[:1], tree)


def unreplicate(tree: Any) -> Any:
  """Takes device 0's copy of a replicated tree (to host memory)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], jax.device_get(first_local(tree)))


def shard(host_tree: Any) -> Any:
  """Reshapes `[local_devices * b, ...]` host arrays to `[local_devices, b, ...]`."""
  n = jax.local_device_count()

  def _reshape(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"leading axis {x.shape[0]} is not divisible by {n} local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree_util.tree_map(_reshape, host_tree)


def unshard(tree: Any) -> Any:
  """Inverse of `shard`: `[local_devices, b, ...]` -> `[local_devices * b, ...]` on the host."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).reshape((-1,) + tuple(x.shape[2:])), jax.device_get(tree))


# The train steps' arguments (state, batch, key): the key is broadcast, not sharded (steps fold in the step
# and the global example index themselves, so that results do not depend on how many devices run them).
STEP_AXES = (0, 0, None)


def pmap(fn: Callable[..., Any], *, in_axes: int | Sequence[int | None] = 0, donate_state: bool = False,
         devices: Sequence[jax.Device] | None = None) -> Callable[..., Any]:
  """Maps `fn` over the local devices on axis `AXIS` (on multi-host jobs the axis spans every host's devices).

  Args:
    fn: a per-device function; collectives inside it name `AXIS`.
    in_axes: 0 (every argument split on its leading axis, `[local_devices, ...]`) or one entry per argument,
      None to broadcast it (`STEP_AXES` for train steps; arguments after the key such as frozen LPIPS weights
      are `replicate`d trees, passed rather than embedded in the program as constants).
    donate_state: donate argument 0 (a train state the call replaces) so that it is updated in place.
    devices: restricts the mapping (one process; tests compare 8 devices with 1).
  """
  return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes if isinstance(in_axes, int) else tuple(in_axes),
                  donate_argnums=(0,) if donate_state else (),
                  devices=None if devices is None else list(devices))


def global_example_index(per_device: int) -> jnp.ndarray:
  """Inside a mapped function: the index of each local example in the global batch, `i32[per_device]`.

  Folding per-example keys from this index makes randomness independent of the device count, so one step on
  8 devices equals the same step on 1 device.
  """
  # Under multi-host pmap, axis_index already counts devices across all hosts.
  base = jax.lax.axis_index(AXIS) * per_device
  return base + jnp.arange(per_device, dtype=jnp.int32)


# ----------------------------------------------------------------------------------- inside mapped steps

# How `psum` / `pmean` reduce floats over the devices: set once at start-up (`set_ordered_reductions`).
_ordered_reductions = False


def set_ordered_reductions(on: bool) -> None:
  """Chooses how `psum` and `pmean` add floats over devices (`config.ordered_reductions`).

  Call it at start-up, before a step is traced: the choice is compiled into the steps.
  - False (default): `lax.psum`. Its order of additions belongs to the collective: XLA's in-process
    all-reduce and gloo's cross-process one add the same numbers in different orders, so a job on 2 hosts ×
    2 devices and one on 1 host × 4 devices differ in the last bits.
  - True: every device all-gathers the values (an exact copy) and adds them in device order. The result then
    depends on the global device order only, not on how the devices are spread over processes. Each device
    holds device-count copies of what is reduced (the gradients): for tests and reproducibility checks, not
    for pods.
  """
  global _ordered_reductions
  _ordered_reductions = bool(on)


def _ordered_sum(x: jax.Array) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.psum(x, AXIS)  # integer sums are exact in any order
  return jnp.sum(jax.lax.all_gather(x, AXIS), axis=0, dtype=x.dtype)


def psum(tree: Any) -> Any:
  """Sum of every leaf over the mapped devices (inside a function mapped by `pmap`)."""
  if jax.lax.axis_size(AXIS) == 1:  # XLA keeps a one-device all-reduce as a copy (7.7 M floats: ~4.5 ms)
    return tree
  if not _ordered_reductions:
    return jax.lax.psum(tree, AXIS)
  return jax.tree_util.tree_map(_ordered_sum, tree)


def pmean(tree: Any) -> Any:
  """Mean of every leaf over the mapped devices (inside a function mapped by `pmap`)."""
  if jax.lax.axis_size(AXIS) == 1:
    return tree
  if not _ordered_reductions:
    return jax.lax.pmean(tree, AXIS)
  n = jax.lax.psum(1, AXIS)
  return jax.tree_util.tree_map(lambda x: _ordered_sum(x) / n, tree)


# ------------------------------------------------------------------------------------ across processes


def gather_processes(x: np.ndarray) -> np.ndarray:
  """`[process_count, *x.shape]`: every process's `x` (same shape and dtype everywhere), in process order,
  bit for bit (float64 and int64 included)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  if x.dtype.itemsize <= 4:
    return np.asarray(multihost_utils.process_allgather(x))
  # JAX's default 32-bit mode would round float64 to float32 (int64 to int32): gather the bits as uint32 words.
  words = np.asarray(multihost_utils.process_allgather(np.ascontiguousarray(x).reshape(-1).view(np.uint32)))
  return words.view(x.dtype).reshape((len(words),) + x.shape)


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Every process's rows of `x: [n_p, ...]` (n_p may differ), concatenated in process order."""
  x = np.asarray(x)
  counts = gather_processes(np.array(len(x), np.int64))
  if len(counts) == 1:
    return x
  padded = np.zeros((int(counts.max()),) + x.shape[1:], x.dtype)
  padded[:len(x)] = x
  return np.concatenate([rows[:n] for rows, n in zip(gather_processes(padded), counts)])


def sum_over_processes(tree: Any) -> Any:
  """Leafwise float64 sums of a host tree over all processes, added in process order (the same result, bit for
  bit, on every process: held-out figures, Inception Score sums)."""
  return jax.tree_util.tree_map(lambda x: gather_processes(np.asarray(x, np.float64)).sum(0), tree)


def barrier(name: str) -> None:
  """Waits until every process got here (e.g. after process 0 wrote a file the others read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class StopAgreement:
  """The job's one stop decision: SIGTERM (or a preemption notice) on any host stops every host at one step.

  On one process a Python SIGTERM handler sets a flag. On several, JAX's preemption service (which a Python
  handler would replace on the signalled host only) tells every process at the same step. Use as a context
  manager around a training loop and call `reached(step)` once after every step, on every process.
  """

  def __init__(self):
    self._raised = False
    self._previous = None

  def __enter__(self) -> "StopAgreement":
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
    self._raised = True

  def reached(self, step: int) -> bool:
    """True on every process, at the same step, once a stop was asked for anywhere."""
    if jax.process_count() == 1:
      return self._raised
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      logging.warning("stop requested on some host (SIGTERM / preemption): every host saves at step %d", step)
      return True
    return False

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
