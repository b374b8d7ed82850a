"""Ancestral sampling and global-context inpainting (docs/method.md §3.6, §3.7).

A sampler walks a descending sequence of steps T = τ_0 > τ_1 > ... > τ_S = 0 (all T steps, or a strided
subset): z_T is uniform, and each transition τ_i → τ_{i+1} draws z_s ~ p(z_s | z_t) = N[θ_{s←t}(z_t, x̂_0)]
with x̂_0 = softmax(logits_fn(z_t, t)). The transition out of step t uses the key fold_in(key, t) and z_T uses
fold_in(key, 0), so running the sequence in chunks (`reverse_chunk`, `inpaint_chunk`) gives exactly the
result of one call. All functions are pure and jit-able; bind `logits_fn` in a closure under `jax.jit`.

`logits_fn(z_t: i32[B, h, w], t: i32[B]) -> f32[B, h, w, K]` returns logits of x̂_0 (after `x0_logits`);
t is 1..T, the same index as the schedule tables.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.diffusion.posterior import categorical, log_posterior, q_sample
from vqddm_jax.diffusion.schedule import Schedule, resolve_num_classes

LogitsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def sampling_timesteps(num_steps: int, num_sampling_steps: Optional[int] = None) -> np.ndarray:
  """The descending steps a sampler visits: `i32[S+1]`, from T down to 0, evenly spread.

  Args:
    num_steps: T of the schedule.
    num_sampling_steps: S, 1 <= S <= T (None: S = T, every step).

  Returns:
    i32[S+1], strictly decreasing, first T, last 0 (a NumPy array: it sets loop lengths, so it is static).
  """
  big_s = num_steps if num_sampling_steps is None else int(num_sampling_steps)
  if not 1 <= big_s <= num_steps:
    raise ValueError(f"num_sampling_steps must be in 1..{num_steps}, got {num_sampling_steps}")
  # floor(x + 0.5), not np.round: round-half-to-even can map two points 1 apart to the same integer.
  grid = np.floor(np.linspace(0.0, num_steps, big_s + 1) + 0.5).astype(np.int32)
  return grid[::-1].copy()


def uniform_codes(key: jax.Array, shape: Sequence[int], num_classes: int) -> jnp.ndarray:
  """z_T ~ Uniform{0..K−1}^shape, `i32[shape]`."""
  n = int(np.prod(shape))   # drawn flat: see posterior._flat_random
  return jax.random.randint(key, (n,), 0, num_classes, dtype=jnp.int32).reshape(tuple(shape))


def tempered(logits_fn: LogitsFn, temperature: float) -> LogitsFn:
  """`logits_fn` with the logits of x̂_0 divided by `temperature` τ > 0 (a Python float: it is compiled in).

  τ = 1 returns `logits_fn` itself: the model's own distribution, the one the −ELBO scores. τ < 1 sharpens
  every prediction of x̂_0 towards its likeliest codes (samples gain precision and lose diversity), τ > 1
  flattens it. The posterior θ(z_t, x̂_0) is then formed from the tempered x̂_0 as usual.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if temperature == 1.0:
    return logits_fn
  inverse = 1.0 / float(temperature)
  return lambda z_t, t: logits_fn(z_t, t).astype(jnp.float32) * inverse


def model_log_posterior(z_t: jnp.ndarray, t: jnp.ndarray, s: jnp.ndarray, logits_fn: LogitsFn,
                        sched: Schedule) -> jnp.ndarray:
  """log p(z_s | z_t) = log N[θ_{s←t}(z_t, softmax(logits_fn(z_t, t)))], `f32[B, h, w, K]`.

  Args:
    z_t: i32[B, h, w], the codes at step t.
    t: i32[] step, 1..T.
    s: i32[] target step, 0 <= s < t.
    logits_fn: `(z_t, t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0.
    sched: the schedule.
  """
  t_batch = jnp.full((z_t.shape[0],), t, jnp.int32)
  log_x0 = jax.nn.log_softmax(logits_fn(z_t, t_batch).astype(jnp.float32), axis=-1)
  return log_posterior(log_x0, z_t, t_batch, sched, jnp.full((z_t.shape[0],), s, jnp.int32))


def reverse_step(key: jax.Array, z_t: jnp.ndarray, t: jnp.ndarray, s: jnp.ndarray, logits_fn: LogitsFn,
                 sched: Schedule) -> jnp.ndarray:
  """One reverse transition z_t -> z_s ~ p(z_s | z_t), 0 <= s < t <= T (scalars), `z_t: i32[B, h, w]`."""
  log_p = model_log_posterior(z_t, t, s, logits_fn, sched)
  return categorical(key, log_p)


def reverse_chunk(key: jax.Array, z: jnp.ndarray, ts_chunk: jnp.ndarray, logits_fn: LogitsFn,
                  sched: Schedule) -> jnp.ndarray:
  """Runs the transitions ts_chunk[0] -> ts_chunk[1] -> ... -> ts_chunk[-1] as one `lax.scan`.

  Chunks of `sampling_timesteps` overlap by one entry: `ts[i : i + C + 1]` for i = 0, C, 2C, ...

  Args:
    key: the sampling key (the same for every chunk); step t uses fold_in(key, t).
    z: i32[B, h, w], the codes at step ts_chunk[0].
    ts_chunk: i32[C+1], a contiguous, strictly decreasing piece of the step sequence (values in 0..T).
    logits_fn: `(z_t, t) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.

  Returns:
    i32[B, h, w], the codes at step ts_chunk[-1].
  """
  return _scan_transitions(
      lambda z_t, t, s: reverse_step(jax.random.fold_in(key, t), z_t, t, s, logits_fn, sched), z, ts_chunk)


def _scan_transitions(step: Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray], z: jnp.ndarray,
                      ts_chunk: jnp.ndarray) -> jnp.ndarray:
  """`z = step(z, t, s)` for the consecutive pairs (t, s) of `ts_chunk: i32[C+1]`, as one `lax.scan`."""
  ts_chunk = jnp.asarray(ts_chunk, jnp.int32)
  z, _ = jax.lax.scan(lambda z_t, ts: (step(z_t, *ts), None), jnp.asarray(z, jnp.int32),
                      (ts_chunk[:-1], ts_chunk[1:]))
  return z


def sample(key: jax.Array, logits_fn: LogitsFn, sched: Schedule, shape: Sequence[int], *,
           num_sampling_steps: Optional[int] = None, num_classes: Optional[int] = None) -> jnp.ndarray:
  """Ancestral sampling from uniform codes over all T steps or S strided steps, one `lax.scan`.

  Args:
    key: a PRNG key.
    logits_fn: `(z_t: i32[B, h, w], t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.
    shape: (B, h, w).
    num_sampling_steps: S (None: all T steps).
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    i32[B, h, w], samples z_0.
  """
  k = resolve_num_classes(sched, num_classes)
  ts = sampling_timesteps(sched.num_steps, num_sampling_steps)
  z_big_t = uniform_codes(jax.random.fold_in(key, 0), shape, k)
  return reverse_chunk(key, z_big_t, ts, logits_fn, sched)


def inpaint_init(key: jax.Array, mask: jnp.ndarray, z0_known: jnp.ndarray, sched: Schedule,
                 num_classes: Optional[int] = None) -> jnp.ndarray:
  """z_T for inpainting: uniform codes, with the known positions drawn from q(z_T | z_0^known).

  Args:
    key: the sampling key (the same one later given to `inpaint_chunk`).
    mask: bool[B, h, w], True where the code is known.
    z0_known: i32[B, h, w], the known codes (ignored where mask is False).
    sched: the schedule.
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    i32[B, h, w].
  """
  k = resolve_num_classes(sched, num_classes)
  key_free, key_known = jax.random.split(jax.random.fold_in(key, 0))
  free = uniform_codes(key_free, mask.shape, k)
  return jnp.where(mask, q_sample(key_known, z0_known, sched.num_steps, sched, k), free)


def inpaint_chunk(key: jax.Array, z: jnp.ndarray, ts_chunk: jnp.ndarray, logits_fn: LogitsFn,
                  sched: Schedule, mask: jnp.ndarray, z0_known: jnp.ndarray) -> jnp.ndarray:
  """`reverse_chunk` with the known positions overwritten after each step by z_s ~ q(z_s | z_0^known).

  The unknown positions are generated in the context of all known ones, anywhere in the map; at s = 0 the
  known positions equal z0_known exactly.

  Args:
    key, z, ts_chunk, logits_fn, sched: as for `reverse_chunk` (z: i32[B, h, w] at step ts_chunk[0]; step t
      draws from fold_in(key, t); t is 1..T).
    mask: bool[B, h, w], True where the code is known.
    z0_known: i32[B, h, w], the known codes.

  Returns:
    i32[B, h, w], the codes at step ts_chunk[-1].
  """
  z0_known = jnp.asarray(z0_known, jnp.int32)

  def step(z_t, t, s):
    key_model, key_known = jax.random.split(jax.random.fold_in(key, t))
    log_p = model_log_posterior(z_t, t, s, logits_fn, sched)
    z_s = categorical(key_model, log_p)
    # q(z_s | z_0) is the keep-or-resample mixture, so q_sample draws it in O(1); at s = 0 it keeps z_0.
    known = q_sample(key_known, z0_known, s, sched, log_p.shape[-1])
    return jnp.where(mask, known, z_s)

  return _scan_transitions(step, z, ts_chunk)


def inpaint(key: jax.Array, logits_fn: LogitsFn, sched: Schedule, mask: jnp.ndarray, z0_known: jnp.ndarray,
            *, num_sampling_steps: Optional[int] = None, num_classes: Optional[int] = None) -> jnp.ndarray:
  """Global-context inpainting (docs/method.md §3.7) in one `lax.scan`: known positions kept, the rest sampled.

  Args:
    key: a PRNG key.
    logits_fn: `(z_t: i32[B, h, w], t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.
    mask: bool[B, h, w], True where the code is known.
    z0_known: i32[B, h, w], the known codes.
    num_sampling_steps: S (None: all T steps).
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    i32[B, h, w], equal to z0_known wherever mask is True.
  """
  ts = sampling_timesteps(sched.num_steps, num_sampling_steps)
  z_big_t = inpaint_init(key, mask, z0_known, sched, num_classes)
  return inpaint_chunk(key, z_big_t, ts, logits_fn, sched, mask, z0_known)
