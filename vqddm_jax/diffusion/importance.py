"""Importance sampling of the step t (docs/method.md §3.5), as a pure state and pure functions.

Uniform t until every t = 1..T has been seen more than 10 times; then p(t) ∝ √(EMA_0.9 of L_t²) + 1e-4, with
p(1) := p(2) (the decoder term's scale differs from the KL terms'). Arrays are indexed by t = 0..T; row 0 is
unused (never sampled, probability 0). The state is a pytree of arrays, checkpointed with the train state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from vqddm_jax.diffusion import posterior

MIN_COUNT = 10     # every t needs more than this many samples before importance sampling starts
EMA_DECAY = 0.9
FLOOR = 1e-4       # added to √history so that no t gets probability 0


@struct.dataclass
class ImportanceState:
  """EMA of L_t² and sample counts, indexed by t = 0..T (row 0 unused).

  Attributes:
    history: f32[T+1], EMA_0.9 of L_t², started at 0 as in the authors' code.
    count: i32[T+1], how many losses of each t were seen.
  """
  history: jnp.ndarray
  count: jnp.ndarray

  @property
  def num_steps(self) -> int:
    return self.history.shape[0] - 1


def init_importance(num_steps: int) -> ImportanceState:
  """An empty state for T = num_steps (uniform sampling until it fills up)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return ImportanceState(history=jnp.zeros((num_steps + 1,), jnp.float32),
                         count=jnp.zeros((num_steps + 1,), jnp.int32))


def is_ready(state: ImportanceState) -> jnp.ndarray:
  """bool[]: whether every t = 1..T has more than MIN_COUNT samples (importance sampling is on)."""
  return jnp.all(state.count[1:] > MIN_COUNT)


def importance_probs(state: ImportanceState) -> jnp.ndarray:
  """p(t) for t = 0..T, `f32[T+1]` (p(0) = 0): uniform until `is_ready`, then ∝ √(history) + 1e-4."""
  big_t = state.num_steps
  weights = jnp.sqrt(state.history + 1e-10) + FLOOR
  if big_t >= 2:
    weights = weights.at[1].set(weights[2])
  weights = weights.at[0].set(0.0)
  uniform = jnp.full((big_t + 1,), 1.0 / big_t, jnp.float32).at[0].set(0.0)
  return jnp.where(is_ready(state), weights / jnp.sum(weights), uniform)


def sample_t(key: jax.Array, state: Optional[ImportanceState] = None, *,
             num_steps: Optional[int] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Draws one step t in 1..T and its probability p(t); vmap it over per-example keys for a batch.

  Args:
    key: a PRNG key.
    state: the importance state, or None for uniform sampling (then `num_steps` gives T).
    num_steps: T, needed only when `state` is None.

  Returns:
    (t: i32[], p_t: f32[]).
  """
  if state is None:
    if num_steps is None or num_steps < 1:
      raise ValueError("sample_t needs an ImportanceState or num_steps >= 1")
    t = jax.random.randint(key, (), 1, num_steps + 1, dtype=jnp.int32)
    return t, jnp.asarray(1.0 / num_steps, jnp.float32)
  probs = importance_probs(state)
  # Two-level Gumbel-max over log p: exact, and log 0 = −inf keeps t = 0 out.
  t = posterior.categorical(key, jnp.log(probs))
  return t, probs[t]


def update(state: ImportanceState, t: jnp.ndarray, loss_t: jnp.ndarray,
           decay: float = EMA_DECAY) -> ImportanceState:
  """Folds a batch of (t, L_t) pairs into the state, deterministically and order-independently.

  Every t present in the batch gets one EMA step with the mean of its L_t² (so duplicates of a t neither race
  nor depend on their order); its count grows by its number of occurrences. Under data parallelism pass the
  pairs gathered from all devices, so every device applies the same update.

  Args:
    state: the importance state.
    t: i32[N], steps in 1..T (any shape; flattened).
    loss_t: f32[N], the L_t value of each pair, in nats (not divided by p(t)).
    decay: EMA decay of the history.

  Returns:
    The new state.
  """
  size = state.num_steps + 1
  t = jnp.asarray(t, jnp.int32).reshape(-1)
  sq = jax.lax.stop_gradient(jnp.asarray(loss_t, jnp.float32).reshape(-1)) ** 2
  n = jax.ops.segment_sum(jnp.ones_like(t), t, num_segments=size)   # integer adds: exact in any order
  mean_sq = _segment_sum_deterministic(t, sq, size) / jnp.maximum(n, 1).astype(jnp.float32)
  history = jnp.where(n > 0, decay * state.history + (1.0 - decay) * mean_sq, state.history)
  return ImportanceState(history=history, count=state.count + n)


def _segment_sum_deterministic(ids: jnp.ndarray, values: jnp.ndarray, size: int) -> jnp.ndarray:
  """Σ of `values` per id, bit-identical on every backend and for any order of the pairs.

  A float scatter-add may use atomics (GPU), whose order varies between runs and between replicas. Instead:
  sort the pairs by (id, value), run a segmented prefix sum with a fixed tree (associative_scan), and write
  each segment's last partial sum to its id with a scatter whose indices are unique.
  """
  ids, values = jax.lax.sort((ids, values), num_keys=2)
  boundary = ids[1:] != ids[:-1]
  starts = jnp.concatenate([jnp.ones((1,), bool), boundary])
  ends = jnp.concatenate([boundary, jnp.ones((1,), bool)])

  def combine(a, b):
    (va, fa), (vb, fb) = a, b
    return jnp.where(fb, vb, va + vb), fa | fb

  partial, _ = jax.lax.associative_scan(combine, (values, starts))
  target = jnp.where(ends, ids, size)   # out of range: dropped
  return jnp.zeros((size,), jnp.float32).at[target].set(partial, mode="drop")

