"""Sharded mini-batch k-means and full-batch Lloyd refinement (seeding: `seeding.py`).

Layout. The features are centred (float32 distances through ||x||² + ||c||² − 2x·cᵀ lose digits far from the
origin), shuffled by a permutation drawn from the key, padded with zero-weight rows to a multiple of the global
mini-batch B and dealt round-robin to the S shards (`sharding.shard_strided`): global position m lives on shard
m % S at local row m // S. Mini-batch b is positions [bB, (b+1)B), i.e. local rows [bB/S, (b+1)B/S) of every
shard, and the seeding set is the first `init_size` positions (a uniform random subset). Both depend on the key
alone, so the centroids do not depend on the device count (up to float rounding in the cross-device sums)
whenever `batch_size` is a multiple of both device counts.

Phases, each optional: seeding on a random subset; Sculley's mini-batch steps (per-centre learning rates);
nested mini-batches (Lloyd steps on growing prefixes of the shuffled points, which are uniform subsets nested
in one another); full-batch Lloyd refinement. Lloyd steps may be over-relaxed (`overrelax`).

Every step computes distances chunk by chunk (`chunk_size` rows × K at a time): no N×K×d tensor, and N×K only
in bounded chunks. Per-cluster sums, counts and inertia are reduced with `parallel.psum` over the devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqddm_jax import parallel
from vqddm_jax.kmeans import distances, seeding, sharding


def check_num_clusters(num_clusters: int, num_points: int) -> None:
  """Raises ValueError unless 1 <= num_clusters <= num_points."""
  if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= num_points:
    raise ValueError(f"num_clusters={num_clusters!r} is not allowed: it must be an integer in "
                     f"[1, {num_points}] (the number of feature vectors)")


def as_features(features) -> np.ndarray:
  x = np.asarray(features, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"features must be f32[N, d] with N >= 1, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("features contain NaN or inf")
  return x


# --------------------------------------------------------------------------------------------------------
# Per-shard k-means (runs under pmap on axis parallel.AXIS).


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shapes of one fit: K, shards S, rows per shard and block Bl = B/S, blocks nb, rows per matmul.

  Loop counts are traced arguments, so fits that differ only in them share one compiled program.
  """
  num_clusters: int
  shards: int
  block: int
  num_blocks: int
  chunk: int

  @property
  def far(self) -> int:
    """How many far points are gathered per re-seeding event (at most this many clusters re-seeded)."""
    return min(self.num_clusters, self.block)


def block_rows(plan: Plan, x, w, b):
  """Rows of block `b` on this shard: (f32[Bl, d], weights f32[Bl], global positions i32[Bl])."""
  start = b * plan.block
  rows = start + jnp.arange(plan.block, dtype=jnp.int32)
  return (lax.dynamic_slice_in_dim(x, start, plan.block), lax.dynamic_slice_in_dim(w, start, plan.block),
          rows * plan.shards + lax.axis_index(parallel.AXIS))


def _stats(plan: Plan, x, w, c):
  """Assignment of a block: labels, distances, local per-cluster sums f32[K, d], counts f32[K], inertia."""
  labels, dist = distances.nearest_chunked(x, c, plan.chunk)
  sums = jax.ops.segment_sum(x * w[:, None], labels, plan.num_clusters)
  counts = jax.ops.segment_sum(w, labels, plan.num_clusters)
  return labels, dist, sums, counts, jnp.sum(w * dist)


def _top_far(plan: Plan, dist, w, pos, x):
  """This shard's `far` real points farthest from their centroid: (distances, global positions, rows)."""
  vals = jnp.where(w > 0, dist, -1.0)  # padding rows never re-seed a cluster
  # Sorting by (−distance, position) breaks ties by global position, whatever the device count.
  _, _, idx = lax.sort((-vals, pos, jnp.arange(vals.shape[0])), num_keys=2)
  idx = idx[:plan.far]
  return vals[idx], pos[idx], x[idx]


def _reseed(plan: Plan, c, starved, top):
  """Moves starved clusters (in index order) onto the globally farthest points; returns (c, moved)."""
  vals, pos, rows = top
  all_vals = lax.all_gather(vals, parallel.AXIS).reshape(-1)
  all_pos = lax.all_gather(pos, parallel.AXIS).reshape(-1)
  _, _, src = lax.sort((-all_vals, all_pos, jnp.arange(all_vals.shape[0])), num_keys=2)
  src = src[:plan.far]
  mine = src // plan.far == lax.axis_index(parallel.AXIS)
  # Each point lives on one shard: summing the owners' rows gathers them without moving all candidates.
  far_rows = parallel.psum(jnp.where(mine[:, None], rows[src % plan.far], 0.0))
  rank = jnp.cumsum(starved) - 1
  slot = jnp.clip(rank, 0, plan.far - 1)
  moved = starved & (rank < plan.far) & (all_vals[src][slot] >= 0.0)
  return jnp.where(moved[:, None], far_rows[slot], c), moved


def _block_index(seed: jnp.ndarray, i: jnp.ndarray, num_blocks: int) -> jnp.ndarray:
  """Mini-batch of step `i`: a hash (murmur3's finaliser) of (seed, i), uniform over blocks.

  A hash rather than jax.random keeps threefry out of the loop body (smaller program, faster compile).
  """
  h = seed + i.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
    h = h ^ (h >> shift)
    if mult is not None:
      h = h * jnp.uint32(mult)
  return (h % jnp.uint32(num_blocks)).astype(jnp.int32)


def _minibatch(plan: Plan, x, w, c, key, num_iters, reseed_every, reseed_ratio):
  """`num_iters` mini-batch steps (per-centre learning rate 1/count, Sculley 2010); every `reseed_every`
  steps, clusters that got less than `reseed_ratio` × the mean count since the last check are re-seeded."""

  def step(i, carry):
    c, v, got, _ = carry
    b = _block_index(seed, i, plan.num_blocks)
    xb, wb, pos = block_rows(plan, x, w, b)
    _, dist, sums, counts, _ = _stats(plan, xb, wb, c)
    sums, counts = parallel.psum((sums, counts))
    v = v + counts
    c = c + (sums - counts[:, None] * c) / jnp.maximum(v, 1.0)[:, None]
    return c, v, got + counts, (dist, wb, pos, xb)

  def check(c, v, got, last):
    starved = got < reseed_ratio * jnp.sum(got) / plan.num_clusters
    c, moved = _reseed(plan, c, starved, _top_far(plan, *last))
    return c, jnp.where(moved, 0.0, v)  # a moved centre starts a fresh running mean

  k, dim = c.shape
  seed = jax.random.bits(key, dtype=jnp.uint32)
  dummy = (jnp.zeros((plan.block,)), jnp.zeros((plan.block,)), jnp.zeros((plan.block,), jnp.int32),
           jnp.zeros((plan.block, dim)))

  def round_(r, carry):
    c, v = carry
    first = r * reseed_every
    last_step = jnp.minimum(first + reseed_every, num_iters)
    c, v, got, last = lax.fori_loop(first, last_step, step, (c, v, jnp.zeros(k), dummy))
    return check(c, v, got, last)

  # The last round may be short; its check is harmless (it compares counts of fewer steps).
  return lax.fori_loop(0, -(-num_iters // reseed_every), round_, (c, jnp.zeros(k)))[0]


def _full_pass(plan: Plan, x, w, c, num_blocks):
  """One pass over blocks [0, num_blocks): psum'd sums f32[K, d] and counts f32[K], and this shard's
  distance of every row to its centroid f32[rows] (−1 for rows outside the pass), read only to re-seed."""

  def body(b, carry):
    sums, counts, dist_all = carry
    xb, wb, _ = block_rows(plan, x, w, b)
    _, dist, s, n, _ = _stats(plan, xb, wb, c)
    dist_all = lax.dynamic_update_slice_in_dim(dist_all, dist, b * plan.block, 0)
    return sums + s, counts + n, dist_all

  init = (jnp.zeros_like(c), jnp.zeros(c.shape[0]), jnp.full(x.shape[:1], -1.0))
  sums, counts, dist_all = lax.fori_loop(0, num_blocks, body, init)
  sums, counts = parallel.psum((sums, counts))
  return sums, counts, dist_all


def _lloyd(plan: Plan, x, w, c, refine_iters, tol, num_blocks, overrelax):
  """Up to `refine_iters` Lloyd steps over the points of blocks [0, num_blocks) (all of them: full-batch);
  stops once Σ‖Δc‖² <= tol. Empty clusters are re-seeded.

  Each step but the last moves a centre by `overrelax` × (mean of its points − centre): Lloyd's fixed-point
  iteration creeps along shallow directions, and over-relaxation (1 < α < 2) takes longer strides along them.
  Step `refine_iters` (the last, unless `tol` stops the loop earlier) is a plain Lloyd step, so a full run
  ends on the means of the points assigned in its last pass.
  """

  def cond(carry):
    i, _, shift = carry
    return (i < refine_iters) & (shift > tol)

  def body(carry):
    i, c, _ = carry
    sums, counts, dist = _full_pass(plan, x, w, c, num_blocks)
    mean = sums / jnp.maximum(counts, 1.0)[:, None]
    alpha = jnp.where(i == refine_iters - 1, 1.0, overrelax)
    new = jnp.where(counts[:, None] > 0, c + alpha * (mean - c), c)
    empty = counts == 0

    def reseed_empty():
      pos = jnp.arange(x.shape[0], dtype=jnp.int32) * plan.shards + lax.axis_index(parallel.AXIS)
      return _reseed(plan, new, empty, _top_far(plan, dist, w, pos, x))[0]

    # Counts are psum'd, so every device takes the same branch; the sort over all rows runs only when needed.
    new = lax.cond(jnp.any(empty), reseed_empty, lambda: new)
    return i + 1, new, jnp.sum((new - c) ** 2)

  return lax.while_loop(cond, body, (0, c, jnp.inf))[1]


@functools.lru_cache(maxsize=None)
def _fit_fn(plan: Plan, devices: tuple[jax.Device, ...] | None):
  def fit(x, w, c, key, loops, nested, reseed_ratio, tol, overrelax):
    num_iters, reseed_every, refine_iters = loops
    c = _minibatch(plan, x, w, c, key, num_iters, reseed_every, reseed_ratio)

    def level(i, c):  # nested mini-batches: Lloyd steps on growing prefixes of the shuffled points
      return _lloyd(plan, x, w, c, nested[i, 1], tol, nested[i, 0], overrelax)

    c = lax.fori_loop(0, nested.shape[0], level, c)
    return _lloyd(plan, x, w, c, refine_iters, tol, plan.num_blocks, overrelax)

  return parallel.pmap(fit, in_axes=(0, 0) + (None,) * 7, devices=devices)


# --------------------------------------------------------------------------------------------------------
# Public API.


def default_chunk_size(devices: Sequence[jax.Device] | None = None) -> int:
  """Rows per distance matmul: 128 on CPUs, where the [K, 128] scores stay in cache (a whole pass ran 15-20 %
  faster than with 1,024 rows at K = 512), and 4,096 on GPUs and TPUs, which want large matmuls."""
  platform = (devices[0] if devices else jax.devices()[0]).platform
  return 128 if platform == "cpu" else 4096


def kmeans(key: jax.Array, features, num_clusters: int, *, num_iters: int = 100, batch_size: int = 4096,
           init="kmeans++", init_size: int | None = None, init_trials: int | None = None,
           init_rounds: int = 5, init_oversample: int | None = None, chain_length: int = 200,
           refine_iters: int = 10, tol: float = 1e-4, reseed_every: int = 10,
           reseed_ratio: float = 0.01, chunk_size: int | None = None,
           nested: Sequence[tuple[int, int]] = (), overrelax: float = 1.0,
           devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Mini-batch k-means over features sharded across devices, optionally refined by full-batch Lloyd steps.

  Deterministic for a given key; the same on any number of devices that divides `batch_size` (up to float
  rounding of cross-device sums). On several hosts, every host passes the same full `features`.

  Args:
    key: PRNG key; it fixes the shuffle, the seeding and the order of the mini-batches.
    features: f32[N, d] (NumPy or JAX), e.g. pre-quantisation encoder outputs.
    num_clusters: K, in [1, N].
    num_iters: mini-batch steps (each sees `batch_size` points; N / batch_size steps make one epoch).
    batch_size: global mini-batch size B (rounded up to a multiple of the device count, capped at N).
    init: "kmeans++" (greedy, `init_trials` candidates per centre), "kmeans||" (k-means||: `init_rounds`
      rounds of `init_oversample` D² draws, then greedy k-means++ over the weighted draws; much cheaper than
      "kmeans++" on large seeding sets), "afkmc2" (AFK-MC², the authors' choice) or initial centroids
      f32[K, d].
    init_size: size of the random seeding subset (default min(N, max(64 K, B)) for k-means++, min(N,
      max(128 K, B)) for k-means||, N for AFK-MC²); the seeding decides which local optimum Lloyd ends in,
      and a larger subset finds better ones.
    init_trials: k-means++ candidates per centre (default 2 + ⌊ln K⌋, as scikit-learn; 1 = plain k-means++).
    init_rounds: k-means|| sampling rounds.
    init_oversample: k-means|| draws per round (default K // 2); 1 + rounds × draws must be >= K.
    chain_length: AFK-MC² Markov-chain length per centre.
    refine_iters: at most this many full-batch Lloyd steps after the mini-batch phase.
    tol: Lloyd stops once Σ_k ‖Δc_k‖² <= tol × (mean per-feature variance), as scikit-learn.
    reseed_every: mini-batch steps between checks for starved clusters.
    reseed_ratio: a cluster is starved when it got less than this × the mean count since the last check;
      starved (and, in Lloyd steps, empty) clusters move onto the points farthest from their centroids.
    chunk_size: rows per distance matmul: memory holds chunk_size × K distances per device (default
      `default_chunk_size(devices)`).
    nested: (num_points, steps) pairs, run between the mini-batch phase and the full-batch refinement:
      `steps` Lloyd steps on the first `num_points` shuffled points (rounded up to whole mini-batches), each
      prefix a uniform subset nested in the next (nested mini-batch k-means, Newling & Fleuret, NeurIPS
      2016). Steps on small prefixes are cheap and do most of the moving; e.g. ((16384, 8), (65536, 3)).
    overrelax: α of the Lloyd steps (see `_lloyd`); 1 is plain Lloyd, 1.5 converges about twice as fast.
    devices: devices to shard over (one process); default all devices of all hosts.

  Returns:
    centroids: f32[K, d] NumPy array.
  """
  x = as_features(features)
  n, dim = x.shape
  check_num_clusters(num_clusters, n)
  devices = None if devices is None else tuple(devices)
  chunk_size = default_chunk_size(devices) if chunk_size is None else chunk_size
  _check_options(num_iters=num_iters, batch_size=batch_size, refine_iters=refine_iters,
                 reseed_every=reseed_every, chunk_size=chunk_size, chain_length=chain_length,
                 overrelax=overrelax)
  shards = sharding.num_shards(devices)
  k_perm, k_init, k_fit = jax.random.split(key, 3)
  batch = shards * min(-(-batch_size // shards), -(-n // shards))
  num_blocks = -(-n // batch)
  xp, wp, mean = _shuffled_centred(x, k_perm, num_blocks * batch)
  levels = _nested_levels(nested, batch, num_blocks)
  c0 = seeding.initial_centroids(k_init, xp[:n], num_clusters, init=init, init_size=init_size,
                                 init_trials=init_trials, init_rounds=init_rounds,
                                 init_oversample=init_oversample, chain_length=chain_length,
                                 chunk=chunk_size, batch=batch, mean=mean)
  plan = Plan(num_clusters=num_clusters, shards=shards, block=batch // shards, num_blocks=num_blocks,
              chunk=chunk_size)
  centred = _run_phases(plan, devices, xp, wp, c0, k_fit, (num_iters, reseed_every, refine_iters), levels,
                        num_points=n, reseed_ratio=reseed_ratio, tol=tol, overrelax=overrelax)
  return (centred + mean).astype(np.float32)


def _run_phases(plan: Plan, devices: tuple[jax.Device, ...] | None, xp: np.ndarray, wp: np.ndarray, c0,
                key: jax.Array, loops: tuple[int, int, int], levels: np.ndarray, *, num_points: int,
                reseed_ratio: float, tol: float, overrelax: float) -> np.ndarray:
  """The mini-batch, nested and Lloyd phases of `kmeans` on the devices, from the seeded centroids.

  Args:
    plan, devices: the fit's shapes and devices.
    xp, wp: the shuffled, centred points f32[rows, d] and their weights f32[rows] (the first `num_points`
      rows are real, the rest zero-weight padding), the same on every host.
    c0: seeded centroids f32[K, d] (centred).
    key: the phases' key (mini-batch order).
    loops: (num_iters, reseed_every, refine_iters); levels: `_nested_levels`.
    reseed_ratio, tol, overrelax: as for `kmeans` (tol relative to the mean per-feature variance).

  Returns:
    Centred centroids f64[K, d] on the host (`c0` itself when every phase has zero steps).
  """
  num_iters, _, refine_iters = loops
  if num_iters == 0 and refine_iters == 0 and not levels[:, 1].any():
    return np.asarray(c0, np.float64)
  flat = xp[:num_points].reshape(-1)
  tol_abs = float(tol * np.dot(flat, flat) / flat.size)  # xp is centred: mean per-feature variance
  out = _fit_fn(plan, devices)(sharding.shard_strided(xp, plan.shards, devices),
                               sharding.shard_strided(wp, plan.shards, devices), c0, key,
                               np.array(loops, np.int32), levels, np.float32(reseed_ratio),
                               np.float32(tol_abs), np.float32(overrelax))
  return np.asarray(parallel.unreplicate(out), np.float64)


def _shuffled_centred(x: np.ndarray, key: jax.Array, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`x` shuffled by a permutation drawn from `key`, centred, zero-padded to `rows`:
  (points f32[rows, d], weights f32[rows] (1 real, 0 padding), mean f32[d])."""
  n, dim = x.shape
  mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
  # NumPy's shuffle, seeded by the key: jax.random.permutation of 200,000 rows takes 0.1 s on one CPU core.
  perm = np.random.default_rng(np.asarray(jax.random.key_data(key))).permutation(n)
  xp = np.zeros((rows, dim), np.float32)
  np.take(x, perm, axis=0, out=xp[:n])
  xp[:n] -= mean
  wp = np.zeros((rows,), np.float32)
  wp[:n] = 1.0
  return xp, wp, mean


def _check_options(*, overrelax: float, **counts: int) -> None:
  """Raises ValueError for a negative loop count, a non-positive size, or α outside (0, 2)."""
  for name, value in counts.items():
    low = 0 if name in ("num_iters", "refine_iters") else 1
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name}={value!r} must be an integer >= {low}")
  if not 0.0 < overrelax < 2.0:  # α >= 2 overshoots the mean by more than the step it corrects
    raise ValueError(f"overrelax={overrelax!r} must be in (0, 2); 1 is plain Lloyd")


_MAX_LEVELS = 16  # nested levels are padded to this many (0 steps), so level lists share one program


def _nested_levels(nested, batch: int, num_blocks: int) -> np.ndarray:
  """i32[_MAX_LEVELS, 2] of (blocks in the prefix, Lloyd steps) from `nested` (num_points, steps) pairs."""
  levels = np.zeros((_MAX_LEVELS, 2), np.int32)
  nested = tuple(nested)
  if len(nested) > _MAX_LEVELS:
    raise ValueError(f"nested has {len(nested)} levels; at most {_MAX_LEVELS} are allowed")
  for i, level in enumerate(nested):
    if (len(level) != 2 or not all(isinstance(v, (int, np.integer)) for v in level) or level[0] < 1
        or level[1] < 0):
      raise ValueError(f"nested[{i}]={level!r} must be a pair (num_points >= 1, steps >= 0)")
    # A prefix is whole mini-batches of the shuffled points, and never more than all of them.
    levels[i] = (min(-(-level[0] // batch), num_blocks), level[1])
  return levels
