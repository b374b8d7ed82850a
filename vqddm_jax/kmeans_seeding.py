"""k-means seeding for ReFiT (`refit.kmeans`): greedy k-means++ and AFK-MC², jitted, on one device, and
`initial_centroids`, which picks one by the arguments of `refit.kmeans`.

The seeding set is small next to the data (a random subset), and seeding on one device makes the initial
centroids the same whatever the number of devices that run the k-means iterations afterwards.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def sq_dist_to(x: jnp.ndarray, x_sq: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
  """Squared distances f32[n, m] between `x: f32[n, d]` (with `x_sq = ||x||²`) and `rows: f32[m, d]`."""
  # HIGHEST: TPUs otherwise multiply f32 in bf16 passes, far too coarse for distances between near points.
  xy = jnp.dot(x, rows.T, precision=lax.Precision.HIGHEST)
  return jnp.maximum(x_sq[:, None] + jnp.sum(rows * rows, -1)[None, :] - 2.0 * xy, 0.0)


def sample_proportional(u: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """Indices i32[m] drawn with probability ∝ `w: f32[n]` (w >= 0, not all 0), given `u: f32[m]` ~ U[0, 1).

  Inverse-CDF in two levels (blocks of ~√n, then within the block): a full cumsum per k-means++ step costs
  more than the step's distances on CPU.
  """
  n = w.shape[0]
  group = max(1, math.isqrt(n))
  blocks = -(-n // group)
  wb = jnp.pad(w, (0, blocks * group - n)).reshape(blocks, group)
  block_sum = jnp.sum(wb, axis=1)
  cdf = jnp.cumsum(block_sum)
  u = u * cdf[-1]
  # Counting entries <= u is searchsorted(side="right"): ~√n comparisons per draw, and quick to compile.
  b = jnp.minimum(jnp.sum(cdf[None, :] <= u[:, None], axis=1), blocks - 1)
  within = jnp.cumsum(wb[b], axis=1)
  i = jnp.sum(within <= (u - (cdf[b] - block_sum[b]))[:, None], axis=1)
  i = jnp.minimum(i, group - 1)
  # Rounding can step past the block's last positive weight; fall back to its heaviest point.
  i = jnp.where(wb[b, i] > 0, i, jnp.argmax(wb[b], axis=1))
  return jnp.minimum(b * group + i, n - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_clusters", "trials"))
def kmeanspp(key: jax.Array, x: jnp.ndarray, *, num_clusters: int, trials: int) -> jnp.ndarray:
  """Greedy k-means++: each step draws `trials` candidates by D² and keeps the one that lowers the potential
  most (trials=1 is plain k-means++). `x: f32[n, d]` -> f32[num_clusters, d]."""
  n = x.shape[0]
  x_sq = jnp.sum(x * x, -1)
  k_first, k_draw = jax.random.split(key)
  first = x[jax.random.randint(k_first, (), 0, n)]
  c = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
  # All draws up front, which keeps threefry out of the loop body (smaller program, faster compile).
  draws = jax.random.uniform(k_draw, (num_clusters, trials))

  def body(k, carry):
    c, dmin = carry
    # All-zero distances (fewer distinct points than clusters) fall back to uniform draws.
    weights = jnp.where(jnp.sum(dmin) > 0, dmin, 1.0)
    cand = sample_proportional(draws[k], weights)
    dc = sq_dist_to(x, x_sq, x[cand])
    best = jnp.argmin(jnp.sum(jnp.minimum(dmin[:, None], dc), axis=0))
    return c.at[k].set(x[cand[best]]), jnp.minimum(dmin, dc[:, best])

  return lax.fori_loop(1, num_clusters, body, (c, sq_dist_to(x, x_sq, first[None])[:, 0]))[0]


@functools.partial(jax.jit, static_argnames=("num_clusters", "chain_length"))
def afkmc2(key: jax.Array, x: jnp.ndarray, *, num_clusters: int, chain_length: int) -> jnp.ndarray:
  """AFK-MC² (Bachem et al., NeurIPS 2016): k-means++ approximated by one Metropolis-Hastings chain of
  `chain_length` per centre with the proposal q(x) = ½ d(x, c₁)²/Σd² + ½/n; cost O(chain · K² · d) after one
  pass. `x: f32[n, d]` -> f32[num_clusters, d]."""
  n, dim = x.shape
  x_sq = jnp.sum(x * x, -1)
  k_first, k_prop, k_acc = jax.random.split(key, 3)
  first = x[jax.random.randint(k_first, (), 0, n)]
  proposals = jax.random.uniform(k_prop, (num_clusters, chain_length))
  accepts = jax.random.uniform(k_acc, (num_clusters, chain_length - 1))
  d1 = sq_dist_to(x, x_sq, first[None])[:, 0]
  q = 0.5 * d1 / jnp.maximum(jnp.sum(d1), 1e-30) + 0.5 / n
  cdf = jnp.cumsum(q)
  c = jnp.zeros((num_clusters, dim), x.dtype).at[0].set(first)

  def body(k, c):
    cand = jnp.clip(jnp.searchsorted(cdf, proposals[k] * cdf[-1], side="right"), 0, n - 1)
    rows = x[cand]
    dc = sq_dist_to(rows, x_sq[cand], c)
    dc = jnp.min(jnp.where(jnp.arange(num_clusters)[None, :] < k, dc, jnp.inf), axis=1)
    # Target ∝ D², proposal q: accept y over x when D²(y)/q(y) > u · D²(x)/q(x).
    ratio = dc / q[cand]

    def step(state, inp):
      cur_w, cur_i = state
      w, i, u = inp
      take = (w > u * cur_w) | (cur_w <= 0.0)
      return (jnp.where(take, w, cur_w), jnp.where(take, i, cur_i)), None

    inputs = (ratio[1:], jnp.arange(1, chain_length), accepts[k])
    (_, pick), _ = lax.scan(step, (ratio[0], jnp.int32(0)), inputs)
    return c.at[k].set(rows[pick])

  return lax.fori_loop(1, num_clusters, body, c)


def initial_centroids(key, x, num_clusters, *, init, init_size, init_trials, chain_length, batch, mean):
  """Initial centroids f32[K, d] for `refit.kmeans` (its arguments of the same names), centred by `mean`.

  `x: f32[N, d]` are the shuffled, centred features; `batch` is the global mini-batch size.
  """
  n, dim = x.shape
  if not isinstance(init, str):
    c = np.asarray(init, np.float32)
    if c.shape != (num_clusters, dim):
      raise ValueError(f"init centroids must have shape {(num_clusters, dim)}, got {c.shape}")
    return jnp.asarray((c - mean).astype(np.float32))
  if init not in ("kmeans++", "afkmc2"):
    raise ValueError(f"init={init!r} must be 'kmeans++', 'afkmc2' or an array of centroids")
  if init_size is None:
    init_size = n if init == "afkmc2" else max(64 * num_clusters, batch)
  if not isinstance(init_size, (int, np.integer)) or init_size < num_clusters:
    raise ValueError(f"init_size={init_size!r} must be an integer >= num_clusters={num_clusters}")
  # x is shuffled, so its first rows are a uniform random subset, the same on every device count.
  xs = jnp.asarray(x[:min(init_size, n)])
  if init == "afkmc2":
    return afkmc2(key, xs, num_clusters=num_clusters, chain_length=chain_length)
  trials = 2 + int(math.log(num_clusters)) if init_trials is None else init_trials
  if not isinstance(trials, (int, np.integer)) or trials < 1:
    raise ValueError(f"init_trials={init_trials!r} must be an integer >= 1")
  return kmeanspp(key, xs, num_clusters=num_clusters, trials=trials)
