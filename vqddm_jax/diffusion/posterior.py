"""Forward process, posterior and KL of the multinomial diffusion (docs/method.md §3.1, §3.3, §3.4).

Everything over the K classes is in log space and costs O(K) per position: a transition
Q = r·I + (1 − r)·11ᵀ/K is applied in closed form, never as a K×K matrix. K is always the last axis. The time
index t is 1..T and indexes the schedule tables directly (row 0 is the clean data).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax import choices
from vqddm_jax.diffusion.schedule import LOG_ZERO, Schedule, log_keep_ratio, resolve_num_classes

PARAMETRIZATIONS = choices.PARAMETRIZATIONS


def _expand_like(x: jnp.ndarray, ref_ndim: int) -> jnp.ndarray:
  """Adds trailing unit axes so that a per-example `x: [B]` (or a scalar) broadcasts against `[B, ...]`."""
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ref_ndim - x.ndim))


def log_one_hot(z: jnp.ndarray, num_classes: int) -> jnp.ndarray:
  """Log one-hot with the finite floor LOG_ZERO: `z: i32[...]` -> `f32[..., K]`."""
  hit = jnp.arange(num_classes, dtype=jnp.int32) == jnp.asarray(z, jnp.int32)[..., None]
  return jnp.where(hit, 0.0, LOG_ZERO).astype(jnp.float32)


def _normalize(log_x: jnp.ndarray) -> jnp.ndarray:
  return log_x - jax.nn.logsumexp(log_x, axis=-1, keepdims=True)


def _log_mix_uniform(log_v: jnp.ndarray, log_keep: jnp.ndarray, log_resample: jnp.ndarray) -> jnp.ndarray:
  """log(keep · v + resample/K) over the last axis (K): v mapped by Q = keep·I + resample·11ᵀ/K."""
  log_k = np.log(log_v.shape[-1])
  return jnp.logaddexp(log_keep[..., None] + log_v, (log_resample - log_k)[..., None])


def _flat_random(draw, key: jax.Array, shape) -> jnp.ndarray:
  """Draws `shape` random values as one flat vector, then reshapes.

  Same distribution; but XLA:CPU compiles JAX's (partitionable) threefry for a rank-4 shape in seconds
  versus well under one second for rank 1, and that cost would hit every jit of a sampler or a loss.
  """
  return draw(key, (int(np.prod(shape)),)).reshape(shape)


def _gumbel_argmax(key: jax.Array, log_w: jnp.ndarray) -> jnp.ndarray:
  """argmax(log_w + Gumbel noise) over the last axis: a draw from Cat(softmax(log_w)), `i32[...]`."""
  return jnp.argmax(log_w + _flat_random(jax.random.gumbel, key, log_w.shape), axis=-1).astype(jnp.int32)


def grouping(num_classes: int) -> tuple[int, int]:
  """(G, S): `categorical`'s G groups of S consecutive codes, G·S >= K.

  The largest divisor G of K with G <= √K when it is at least √K / 2 (no padding: 512 -> 16 x 32);
  otherwise G = ⌈√K⌉ and S = ⌈K / G⌉, and the last G·S − K entries are padding of log-probability −inf (a
  prime K such as the T + 1 = 4001 steps of the importance sampler: 64 x 63).
  """
  divisor = max(g for g in range(1, math.isqrt(num_classes) + 1) if num_classes % g == 0)
  if 4 * divisor * divisor >= num_classes:
    return divisor, num_classes // divisor
  groups = math.isqrt(num_classes - 1) + 1
  return groups, -(-num_classes // groups)


def categorical(key: jax.Array, log_p: jnp.ndarray) -> jnp.ndarray:
  """One draw per position from Cat(softmax(log_p)), exactly: `f32[..., K] -> i32[...]`.

  Two-level Gumbel-max. The K codes form G groups of S consecutive codes (`grouping`, padded with −inf
  where G·S > K): a group is drawn with probability equal to its mass (Gumbel-max over the G log-masses, a
  logsumexp each), then a code of that group with probability proportional to its own (Gumbel-max over the
  group's S log-probabilities). P(code) = P(group) · P(code | group), so the distribution is exactly
  Cat(softmax(log_p)), but each position needs G + S Gumbel draws instead of K (48 instead of 512 at
  K = 512, 127 instead of 4001 for the importance sampler's t). On XLA:CPU the K draws and their two
  logarithms were a single-threaded ~11 ms fusion of the ~48 ms reverse step at the MNIST size (16.5 ms
  alone, against 1.8 ms for the two levels), and drawing t for a batch of 32 took 2.8 ms of the train step.
  """
  k = log_p.shape[-1]
  g, size = grouping(k)
  if g == 1:
    return _gumbel_argmax(key, log_p)
  if g * size > k:
    log_p = jnp.pad(log_p, [(0, 0)] * (log_p.ndim - 1) + [(0, g * size - k)], constant_values=-jnp.inf)
  grouped = log_p.reshape(log_p.shape[:-1] + (g, size))
  key_group, key_code = jax.random.split(key)
  group = _gumbel_argmax(key_group, jax.nn.logsumexp(grouped, axis=-1))
  within = jnp.take_along_axis(grouped, group[..., None, None], axis=-2)[..., 0, :]
  return group * size + _gumbel_argmax(key_code, within)


def log_q_zt_given_z0(log_z0: jnp.ndarray, t: jnp.ndarray, sched: Schedule) -> jnp.ndarray:
  """log q(z_t | z_0) = log(ᾱ_t v + (1 − ᾱ_t)/K) per position.

  Args:
    log_z0: f32[B, ..., K], a floored log one-hot or any log-probability vector v (normalised here).
    t: i32[B] or scalar, the step, 0..T (t = 0 returns v itself, up to the floor).
    sched: the schedule.

  Returns:
    f32[B, ..., K], normalised over K.
  """
  t = _expand_like(t, log_z0.ndim - 1)
  return _log_mix_uniform(_normalize(log_z0), sched.log_alpha_bar[t], sched.log_1m_alpha_bar[t])


def q_sample(key: jax.Array, z0: jnp.ndarray, t: jnp.ndarray, sched: Schedule,
             num_classes: Optional[int] = None) -> jnp.ndarray:
  """Draws z_t ~ q(z_t | z_0) = Cat(ᾱ_t e_{z_0} + (1 − ᾱ_t)/K) for integer codes, in O(1) per position.

  Sampled as the mixture it is: keep z_0 with probability ᾱ_t, else draw a uniform code (which may equal z_0).
  One key covers the whole `z0`; for randomness independent of the device count, vmap over examples with
  per-example keys (z0: i32[h, w], t scalar).

  Args:
    key: a PRNG key.
    z0: i32[B, ...] codes in 0..K−1.
    t: i32[B] or scalar, the step, 1..T.
    sched: the schedule.
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    i32[B, ...], z_t.
  """
  k = resolve_num_classes(sched, num_classes)
  z0 = jnp.asarray(z0, jnp.int32)
  t = _expand_like(t, z0.ndim)
  key_keep, key_code = jax.random.split(key)
  uniform = _flat_random(functools.partial(jax.random.uniform, minval=1e-38), key_keep, z0.shape)
  keep = jnp.log(uniform) < sched.log_alpha_bar[t]
  noise = _flat_random(functools.partial(jax.random.randint, minval=0, maxval=k, dtype=jnp.int32),
                       key_code, z0.shape)
  return jnp.where(keep, z0, noise)


def log_posterior(log_z0: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray, sched: Schedule,
                  s: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """log q(z_s | z_t, z_0) = log N[θ_{s←t}(z_t, v)], normalised over K (docs/method.md §3.3).

      θ_{s←t}(z_t, v) = [(ᾱ_t/ᾱ_s) e_{z_t} + (1 − ᾱ_t/ᾱ_s)/K] ⊙ [ᾱ_s v + (1 − ᾱ_s)/K]

  With the network's log-probabilities of x̂_0 as `log_z0` this is the model's p(z_s | z_t); at s = 0 it is
  the decoder distribution N[x̂_0 ⊙ q(z_t | ·)]; with a floored one-hot it is the true posterior.

  Args:
    log_z0: f32[B, ..., K], a floored log one-hot of z_0 or any log-probability vector v (normalised here).
    z_t: i32[B, ...], the codes at step t.
    t: i32[B] or scalar, the step, 1..T.
    sched: the schedule.
    s: i32[B] or scalar with 0 <= s < t; None means t − 1 (one reverse step).

  Returns:
    f32[B, ..., K], log-probabilities of z_s.
  """
  t = jnp.asarray(t, jnp.int32)
  s = t - 1 if s is None else jnp.asarray(s, jnp.int32)
  nd = z_t.ndim
  t, s = _expand_like(t, nd), _expand_like(s, nd)
  log_r, log_1m_r = log_keep_ratio(sched, t, s)
  log_resample = log_1m_r - np.log(log_z0.shape[-1])
  # Factor q(z_t | z_s = k) as a function of k: keep-or-resample if k == z_t, resample only otherwise.
  is_zt = jnp.arange(log_z0.shape[-1], dtype=jnp.int32) == jnp.asarray(z_t, jnp.int32)[..., None]
  log_lik = jnp.where(is_zt, jnp.logaddexp(log_r, log_resample)[..., None], log_resample[..., None])
  log_prior = _log_mix_uniform(_normalize(log_z0), sched.log_alpha_bar[s], sched.log_1m_alpha_bar[s])
  return _normalize(log_lik + log_prior)


def categorical_kl(log_p: jnp.ndarray, log_q: jnp.ndarray) -> jnp.ndarray:
  """KL(p ‖ q) over the last axis, f32[..., K] x2 -> f32[...].

  Entries with p = 0 contribute 0 (also for log p = −inf), so a floored one-hot p gives a finite value.
  Rounding can make KL of p ≈ q come out at −1e-9; it is clamped at 0 (the true gradient there is ≈ 0 too).
  """
  p = jnp.exp(log_p)
  safe_log_p = jnp.where(p > 0, log_p, 0.0)
  kl = jnp.sum(jnp.where(p > 0, p * (safe_log_p - log_q), 0.0), axis=-1)
  return jnp.maximum(kl, 0.0)


def x0_logits(net_out: jnp.ndarray, z_t: jnp.ndarray, parametrization: str = "residual") -> jnp.ndarray:
  """Logits of x̂_0 from the network output (docs/method.md §3.4).

  Args:
    net_out: f32[B, h, w, K], the network output.
    z_t: i32[B, h, w], the network's input codes.
    parametrization: "residual" (the paper: net_out + one_hot(z_t)) or "x0" (the authors' configs: net_out).

  Returns:
    f32[B, h, w, K] logits (not normalised).

  Raises:
    ValueError: for an unknown parametrization.
  """
  if parametrization == "residual":
    return net_out + jax.nn.one_hot(z_t, net_out.shape[-1], dtype=net_out.dtype)
  if parametrization == "x0":
    return net_out
  raise ValueError(f"unknown parametrization {parametrization!r}; allowed: {PARAMETRIZATIONS}")
