"""Noise schedules of the multinomial diffusion (docs/method.md §3.2), as log tables indexed by t = 0..T.

Row t of every table belongs to step t (t = 1..T); row 0 is the clean data (α_0 = ᾱ_0 = 1), whose log(1 − ·)
entries hold the finite floor `LOG_ZERO` instead of −inf. Tables are computed in float64 NumPy and cast to
float32 once: at T = 4000, 1 − α_1 ≈ 1e-5, which float32 arithmetic on α itself would lose.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import struct

from vqddm_jax import choices

# Finite stand-in for log 0 (the authors' log(1e-30)): exp() of it is negligible next to any probability the
# model can represent, and sums of a few such floors stay finite in float32, so no 0·(−inf) = NaN can occur.
LOG_ZERO = float(np.float32(np.log(1e-30)))  # float32-exact, so tables compare equal

SCHEDULE_KINDS = choices.SCHEDULE_KINDS


@struct.dataclass
class Schedule:
  """Log tables of a schedule; every array is `f32[T+1]`, indexed by t = 0..T (row 0: α = ᾱ = 1).

  Attributes:
    log_alpha: log α_t, the one-step keep probability of q(z_t | z_{t-1}).
    log_1m_alpha: log(1 − α_t) (row 0: LOG_ZERO).
    log_alpha_bar: log ᾱ_t, ᾱ_t = Π_{i<=t} α_i.
    log_1m_alpha_bar: log(1 − ᾱ_t) (row 0: LOG_ZERO).
    log_alpha_bar_lo: float32 rounding residual of `log_alpha_bar` (float64 value − float32 value). The sum
      hi + lo carries about 48 bits, so that log(ᾱ_t/ᾱ_s) for nearby s < t (the strided posterior) is exact
      to float32 precision although both logs are large and close.
    kind: the schedule kind (static).
    num_classes: optional K (static); a default for functions that need K but see no K-sized tensor.
  """
  log_alpha: jnp.ndarray
  log_1m_alpha: jnp.ndarray
  log_alpha_bar: jnp.ndarray
  log_1m_alpha_bar: jnp.ndarray
  log_alpha_bar_lo: jnp.ndarray
  kind: str = struct.field(pytree_node=False, default="cosine")
  num_classes: Optional[int] = struct.field(pytree_node=False, default=None)

  @property
  def num_steps(self) -> int:
    """T, the number of diffusion steps (static: read from the table length)."""
    return self.log_alpha.shape[0] - 1


def _log1mexp(x: np.ndarray) -> np.ndarray:
  """log(1 − exp(x)) for x <= 0, accurate at both ends (x → 0⁻ and x → −∞)."""
  x = np.asarray(x, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _log_cos2(t: np.ndarray, num_steps: int, s: float) -> np.ndarray:
  """log f(t), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), in float64; f(T) = 0 maps to a tiny positive value."""
  angle = (t / num_steps + s) / (1.0 + s) * (np.pi / 2.0)
  return 2.0 * np.log(np.maximum(np.cos(angle), 1e-300))


def schedule_log_tables_f64(num_steps: int, kind: str = "cosine", s: float = 0.008):
  """(log α_t, log ᾱ_t) for t = 0..T in float64; see `make_schedule`."""
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"unknown schedule kind {kind!r}; allowed: {SCHEDULE_KINDS}")
  t = np.arange(num_steps + 1, dtype=np.float64)
  log_f = _log_cos2(t, num_steps, s)
  if kind == "cosine":
    # Paper: ᾱ_t = f(t)/f(0); ᾱ_T = 0 exactly in theory, so it is floored and α_t follows as a ratio.
    log_alpha_bar = np.maximum(log_f - log_f[0], LOG_ZERO)
    log_alpha = np.concatenate([[0.0], np.diff(log_alpha_bar)])
  else:
    # Authors' code: γ_t = clip(f(t)/f(t−1), 0.001, 1), α_t = √γ_t, ᾱ_t = Π α_i.
    log_gamma = np.clip(np.diff(log_f), np.log(0.001), 0.0)
    log_alpha = np.concatenate([[0.0], 0.5 * log_gamma])
    log_alpha_bar = np.maximum(np.cumsum(log_alpha), LOG_ZERO)
  return log_alpha, log_alpha_bar


def make_schedule(num_steps: int, kind: str = "cosine", s: float = 0.008, *,
                  num_classes: Optional[int] = None) -> Schedule:
  """Builds the log tables of a noise schedule, indexed by t = 0..T.

  Args:
    num_steps: T >= 1.
    kind: "cosine" (the paper: ᾱ_t = f(t)/f(0)) or "cosine_sqrt" (the authors' code: α_t = √clip(f(t)/f(t−1),
      0.001, 1), so ᾱ_t ≈ √(f(t)/f(0)) and α_T ≈ 0.0316).
    s: the cosine offset.
    num_classes: optional K stored as a static default for `q_sample`, `prior_kl` and the samplers.

  Returns:
    A `Schedule` of float32 tables of length T + 1.

  Raises:
    ValueError: for an unknown kind or T < 1.
  """
  log_alpha, log_alpha_bar = schedule_log_tables_f64(num_steps, kind, s)
  log_1m_alpha = np.maximum(_log1mexp(log_alpha), LOG_ZERO)
  log_1m_alpha_bar = np.maximum(_log1mexp(log_alpha_bar), LOG_ZERO)
  hi = log_alpha_bar.astype(np.float32)
  lo = (log_alpha_bar - hi.astype(np.float64)).astype(np.float32)
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
  return Schedule(log_alpha=f32(log_alpha), log_1m_alpha=f32(log_1m_alpha),
                  log_alpha_bar=f32(hi), log_1m_alpha_bar=f32(log_1m_alpha_bar),
                  log_alpha_bar_lo=f32(lo), kind=kind, num_classes=num_classes)


def resolve_num_classes(sched: Schedule, num_classes: Optional[int]) -> int:
  """K from an explicit argument, else from the schedule; raises ValueError when neither gives it."""
  k = num_classes if num_classes is not None else sched.num_classes
  if k is None or int(k) < 2:
    raise ValueError(f"num_classes must be given (here or in make_schedule) and be >= 2, got {k!r}")
  return int(k)


def log1mexp(x: jnp.ndarray) -> jnp.ndarray:
  """log(1 − exp(x)) for x < 0 in JAX, accurate for x → 0⁻ and x → −∞; floored at LOG_ZERO."""
  safe = jnp.minimum(x, -1e-30)  # both branches stay finite, so where() has no NaN to hide
  out = jnp.where(safe > -np.log(2.0), jnp.log(-jnp.expm1(safe)), jnp.log1p(-jnp.exp(safe)))
  return jnp.maximum(out, LOG_ZERO)


def log_keep_ratio(sched: Schedule, t: jnp.ndarray, s: jnp.ndarray):
  """(log(ᾱ_t/ᾱ_s), log(1 − ᾱ_t/ᾱ_s)) for 0 <= s < t <= T, elementwise over broadcast integer arrays.

  These are the keep / resample log-probabilities of q(z_t | z_s). For s = t − 1 the float64-built one-step
  tables are used; otherwise the difference is taken in hi + lo form, so ratios near 1 stay exact.
  """
  t = jnp.asarray(t, jnp.int32)
  s = jnp.asarray(s, jnp.int32)
  diff = ((sched.log_alpha_bar[t] - sched.log_alpha_bar[s])
          + (sched.log_alpha_bar_lo[t] - sched.log_alpha_bar_lo[s]))
  diff = jnp.minimum(diff, 0.0)
  one_step = s == t - 1
  log_r = jnp.where(one_step, sched.log_alpha[t], diff)
  log_1m_r = jnp.where(one_step, sched.log_1m_alpha[t], log1mexp(diff))
  return log_r, log_1m_r
