"""How k-means lays its points over the shards: rows dealt round-robin, so that a contiguous mini-batch of
the shuffled points lands as contiguous rows of every shard, whatever the device count (see `fit.py`)."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from vqddm_jax import parallel


def num_shards(devices: Sequence[jax.Device] | None = None) -> int:
  """How many shards a mapped computation over `devices` has (default: all devices of all hosts)."""
  return len(devices) if devices is not None else parallel.device_count()


def shard_strided(host_array: np.ndarray, shards: int,
                  devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Deals host rows round-robin to shards: row `i` goes to shard `i % shards`, local row `i // shards`.

  Args:
    host_array: `[shards * n, ...]`, the same full array on every host.
    shards: the global number of shards (`num_shards(devices)`).
    devices: explicit devices (single process); None maps over every host's local devices.

  Returns:
    `[local shards, n, ...]`: this process's shards (all of them when `devices` is given or on one host).
    Any contiguous block of `shards * b` rows lands as `b` contiguous local rows on every shard, so
    block-sampled mini-batches are the same whatever the device count.
  """
  x = np.asarray(host_array)
  if x.shape[0] % shards:
    raise ValueError(f"leading axis {x.shape[0]} is not divisible by {shards} shards")
  x = np.swapaxes(x.reshape((x.shape[0] // shards, shards) + x.shape[1:]), 0, 1)
  if devices is None and parallel.process_count() > 1:
    local, index = parallel.local_device_count(), parallel.process_index()
    x = x[index * local:(index + 1) * local]
  return x
