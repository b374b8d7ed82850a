"""Nearest centroid of every feature vector, sharded over devices (the assignment step of `fit.py`, alone)."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqddm_jax import parallel
from vqddm_jax.kmeans import distances, sharding
from vqddm_jax.kmeans.fit import Plan, as_features, block_rows, default_chunk_size


@functools.lru_cache(maxsize=None)
def _assign_fn(plan: Plan, devices: tuple[jax.Device, ...] | None):
  def run(x, c, num_points):
    def body(b, carry):
      labels, inertia = carry
      xb, _, pos = block_rows(plan, x, x[:, 0], b)
      lab, dist = distances.nearest_chunked(xb, c, plan.chunk)
      inertia = inertia + jnp.sum(jnp.where(pos < num_points, dist, 0.0))  # padding rows do not count
      return lax.dynamic_update_slice_in_dim(labels, lab, b * plan.block, 0), inertia

    labels, inertia = lax.fori_loop(0, plan.num_blocks, body,
                                    (jnp.zeros(x.shape[:1], jnp.int32), jnp.zeros(())))
    return lax.all_gather(labels, parallel.AXIS), parallel.psum(inertia)

  return parallel.pmap(run, in_axes=(0, None, None), devices=devices)


def assign(features, centroids, *, chunk_size: int | None = None,
           devices: Sequence[jax.Device] | None = None) -> tuple[np.ndarray, float]:
  """Nearest centroid of every feature vector, sharded over devices.

  Args:
    features: f32[N, d].
    centroids: f32[K, d].
    chunk_size: rows per distance matmul and device (default `default_chunk_size(devices)`).
    devices: devices to shard over (one process); default all devices of all hosts.

  Returns:
    labels: i32[N] NumPy array; inertia: float, Σ_n ‖x_n − c_{labels_n}‖².
  """
  x = as_features(features)
  c = np.asarray(centroids, np.float32)
  if c.ndim != 2 or c.shape[1] != x.shape[1] or c.shape[0] < 1:
    raise ValueError(f"centroids must be f32[K, {x.shape[1]}] with K >= 1, got shape {c.shape}")
  n = x.shape[0]
  devices = None if devices is None else tuple(devices)
  shards = sharding.num_shards(devices)
  mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
  block = min(default_chunk_size(devices) if chunk_size is None else chunk_size, -(-n // shards))
  num_blocks = -(-n // (block * shards))
  xp = np.zeros((num_blocks * block * shards, x.shape[1]), np.float32)
  np.subtract(x, mean, out=xp[:n])
  plan = Plan(num_clusters=c.shape[0], shards=shards, block=block, num_blocks=num_blocks, chunk=block)
  labels, inertia = _assign_fn(plan, devices)(sharding.shard_strided(xp, shards, devices),
                                              jnp.asarray(c - mean), np.int32(n))
  labels, inertia = parallel.unreplicate((labels, inertia))
  return np.asarray(labels).swapaxes(0, 1).reshape(-1)[:n].astype(np.int32), float(inertia)
