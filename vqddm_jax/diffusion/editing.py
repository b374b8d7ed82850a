"""Editing code maps with the prior: mix two maps at step t, or re-noise one, then denoise from t.

The authors' interpolation noises both images' code maps to step t with q(z_t | z_0), takes each position
from the first with probability λ (else from the second), and denoises the mix from t with the reverse
process; re-noising one map to t and denoising it back is a discrete counterpart of SDEdit. t sets how much
of the inputs survives: at t the forward process keeps a code with probability ᾱ_t (plus 1/K by chance), so
small t changes little and t = T forgets the inputs (the authors used t = 100 of T = 4000, ᾱ ≈ 0.9987).

Time index t = 0..T here: t = 0 is the clean map (no noise, nothing to denoise), t = 1..T as everywhere
(the schedule tables' row t). All functions are pure and jit-able, except that the denoising step sequence
(`denoise_timesteps`) is static NumPy.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.diffusion.posterior import _expand_like, q_sample
from vqddm_jax.diffusion.samplers import LogitsFn, _scan_transitions, reverse_step, sampling_timesteps
from vqddm_jax.diffusion.schedule import Schedule


def renoise(key: jax.Array, z: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """z_t ~ q(z_t | z_0 = z): one map noised to step t (t = 0 returns `z`).

  Args:
    key: a PRNG key (one for the whole batch; vmap with per-example keys for device-independent draws).
    z: i32[B, h, w] codes in 0..K−1.
    t: i32[] or i32[B], the step, 0..T.
    sched: the schedule.

  Returns:
    i32[B, h, w].
  """
  return q_sample(key, z, t, sched)


def mix_at_step(key: jax.Array, z_a: jnp.ndarray, z_b: jnp.ndarray, t: jnp.ndarray, lam: jnp.ndarray,
                sched: Schedule) -> jnp.ndarray:
  """The authors' interpolation input: both maps noised to step t, each position taken from the first with
  probability λ, else from the second.

  One uniform u per position decides (`u < λ`), so with one key the positions taken from `z_a` grow with λ:
  λ = 1 returns `z_a` noised, λ = 0 `z_b` noised, and at t = 0 the mix of the clean maps.

  Args:
    key: a PRNG key.
    z_a, z_b: i32[B, h, w], the two images' code maps.
    t: i32[] or i32[B], the step, 0..T.
    lam: f32[] or f32[B], λ in [0, 1]: the fraction of positions from `z_a`.
    sched: the schedule.

  Returns:
    i32[B, h, w].
  """
  key_a, key_b, key_mix = jax.random.split(key, 3)
  shape = jnp.shape(z_a)
  # Drawn flat and reshaped (as `q_sample` does): XLA:CPU compiles a rank-1 threefry much faster.
  u = jax.random.uniform(key_mix, (int(np.prod(shape)),)).reshape(shape)
  take_a = u < _expand_like(jnp.asarray(lam, jnp.float32), len(shape))
  return jnp.where(take_a, renoise(key_a, z_a, t, sched), renoise(key_b, z_b, t, sched))


def denoise_timesteps(num_steps: int, t: int, num_sampling_steps: Optional[int] = None) -> np.ndarray:
  """The descending steps a denoising from step t visits: t, then those of `sampling_timesteps` below t.

  Args:
    num_steps: T of the schedule.
    t: the starting step, 0..T (0: nothing to denoise).
    num_sampling_steps: None for every step t, t−1, ..., 0; S < T for the strided subset of S steps of
      `sampling_timesteps(T, S)` cut at t (t itself always starts it).

  Returns:
    i32[n+1], strictly decreasing from t to 0 (`[0]` for t = 0: no transition).
  """
  if not 0 <= t <= num_steps:
    raise ValueError(f"t must be in 0..{num_steps}, got {t}")
  grid = sampling_timesteps(num_steps, num_sampling_steps)
  return np.concatenate([np.array([t], np.int32), grid[grid < t]]).astype(np.int32)


def denoise_chunk(key: jax.Array, z: jnp.ndarray, ts_chunk: jnp.ndarray, logits_fn: LogitsFn,
                  sched: Schedule) -> jnp.ndarray:
  """`reverse_chunk` that passes over repeated entries: a pair (t, s) with s = t leaves z as it is.

  Padding every chunk of a denoising to one length with repeats of its last entry lets one compiled program
  denoise from any t; on an unpadded sequence it equals `reverse_chunk` (step t draws from fold_in(key, t)).

  Args:
    key: the sampling key (the same for every chunk).
    z: i32[B, h, w], the codes at step ts_chunk[0].
    ts_chunk: i32[C+1], non-increasing steps in 0..T.
    logits_fn: `(z_t, t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.

  Returns:
    i32[B, h, w], the codes at step ts_chunk[-1].
  """
  def step(z_t, t, s):
    return jax.lax.cond(t > s, lambda z: reverse_step(jax.random.fold_in(key, t), z, t, s, logits_fn, sched),
                        lambda z: z, z_t)

  return _scan_transitions(step, z, ts_chunk)


def denoise(key: jax.Array, z_t: jnp.ndarray, t: int, logits_fn: LogitsFn, sched: Schedule, *,
            num_sampling_steps: Optional[int] = None) -> jnp.ndarray:
  """Runs the reverse process from step t down to 0 (`denoise_timesteps`), one `lax.scan`.

  Args:
    key: a PRNG key; the transition out of step τ draws from fold_in(key, τ).
    z_t: i32[B, h, w], the codes at step t.
    t: the step, 0..T (a Python int: it sets the loop length); t = 0 returns `z_t` unchanged.
    logits_fn: `(z_t, t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.
    num_sampling_steps: None for every step, S < T for the strided subset (see `denoise_timesteps`).

  Returns:
    i32[B, h, w], z_0.
  """
  ts = denoise_timesteps(sched.num_steps, t, num_sampling_steps)
  if len(ts) == 1:
    return jnp.asarray(z_t, jnp.int32)
  return denoise_chunk(key, z_t, ts, logits_fn, sched)
