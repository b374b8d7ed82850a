"""The variational objective of the multinomial diffusion, per image in nats (docs/method.md §3.5).

    L_1     = −log p(z_0 | z_1)                                  (decoder term, t = 1)
    L_t     = KL(q(z_{t−1} | z_t, z_0) ‖ p(z_{t−1} | z_t))        (t = 2..T)
    L_prior = KL(q(z_T | z_0) ‖ Uniform(K))
    −ELBO   = L_prior + Σ_t L_t

Each term is summed over all positions of a code map. t is 1..T throughout. Functions that evaluate the
network take `logits_fn(z_t: i32[B, h, w], t: i32[B]) -> f32[B, h, w, K]`, the logits of x̂_0 (after
`x0_logits`), and per-example PRNG keys `keys: [B]` so that results do not depend on how a batch is split
over devices.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.diffusion.posterior import q_sample
from vqddm_jax.diffusion.schedule import LOG_ZERO, Schedule, log_keep_ratio, resolve_num_classes

LogitsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _sum_positions(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _softplus(x: jnp.ndarray) -> jnp.ndarray:
  """log(1 + eˣ), stable; unlike jax.nn.softplus, XLA:CPU fuses it into a following reduction."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@jax.custom_vjp
def _sum_softplus(b: jnp.ndarray, log_x: jnp.ndarray) -> jnp.ndarray:
  """Σ_k softplus(b + log_x_k) over the last axis; its VJP is one fused elementwise pass (σ(b + log_x))."""
  return jnp.sum(_softplus(b[..., None] + log_x), axis=-1)


def _sum_softplus_fwd(b, log_x):
  return _sum_softplus(b, log_x), (b, log_x)


def _sum_softplus_bwd(res, ct):
  b, log_x = res
  grad_x = ct[..., None] * jax.nn.sigmoid(b[..., None] + log_x)
  return jnp.sum(grad_x, axis=-1), grad_x


_sum_softplus.defvjp(_sum_softplus_fwd, _sum_softplus_bwd)


@jax.custom_vjp
def _take_last(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """x[..., index] per position; its VJP is an elementwise select, not a scatter into a dense zero tensor."""
  return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]


def _take_last_fwd(x, index):
  return _take_last(x, index), (index, x.shape[-1])


def _take_last_bwd(res, ct):
  index, k = res
  hit = jnp.arange(k, dtype=index.dtype) == index[..., None]
  return jnp.where(hit, ct[..., None], 0.0), None


_take_last.defvjp(_take_last_fwd, _take_last_bwd)


def _softplus_diff(u: jnp.ndarray, delta: jnp.ndarray, minus_delta: bool = False) -> jnp.ndarray:
  """softplus(u + δ) − softplus(u) (− δ if `minus_delta`), without cancellation of two large logs.

  u <= 0: log1p(σ(u)·expm1(δ)), where σ(u) <= 1/2 keeps the argument above −1/2;
  u > 0:  δ + softplus(−u − δ) − softplus(−u), the δ dropped exactly when `minus_delta`.
  Each branch sees only inputs for which it is finite with a finite gradient (else log1p(−1) would give
  0·inf = NaN in the gradient of the branch that where() discards).
  """
  small = jnp.log1p(jax.nn.sigmoid(jnp.minimum(u, 0.0)) * jnp.expm1(jnp.minimum(delta, 80.0)))
  large = _softplus(-u - delta) - _softplus(-u)
  if minus_delta:
    return jnp.where(u > 0, large, small - delta)
  return jnp.where(u > 0, delta + large, small)


class _StepLogs(NamedTuple):
  """Per-example log quantities of one reverse step t -> s = t − 1, each broadcastable to [B, h, w]."""
  log_r: jnp.ndarray      # log α_t: keep probability of q(z_t | z_s)
  l_res: jnp.ndarray      # log((1 − α_t)/K) = log q(z_t | z_s = k) for k != z_t
  l_keep: jnp.ndarray     # log(α_t + (1 − α_t)/K) = log q(z_t | z_s = z_t)
  log_a_s: jnp.ndarray    # log ᾱ_s
  l_noise: jnp.ndarray    # log((1 − ᾱ_s)/K)
  b: jnp.ndarray          # log(ᾱ_s K/(1 − ᾱ_s)): log q(z_s = k | v) − l_noise = softplus(b + log v_k)


def _step_logs(sched: Schedule, t: jnp.ndarray, k: int) -> _StepLogs:
  log_r, log_1m_r = log_keep_ratio(sched, t, t - 1)
  l_res = log_1m_r - np.log(k)
  l_noise = sched.log_1m_alpha_bar[t - 1] - np.log(k)
  return _StepLogs(log_r=log_r, l_res=l_res, l_keep=jnp.logaddexp(log_r, l_res),
                   log_a_s=sched.log_alpha_bar[t - 1], l_noise=l_noise,
                   b=sched.log_alpha_bar[t - 1] - l_noise)


def _posterior_kl(log_x0, z0, z_t, lx_z0, lx_zt, c: _StepLogs) -> jnp.ndarray:
  """KL(q(z_s | z_t, z_0) ‖ p(z_s | z_t)) per position, f32[B, h, w]; see `loss_t` for the method."""
  k = log_x0.shape[-1]
  same = z0 == z_t
  c_hit, c_miss = _softplus(c.b), _softplus(c.b + LOG_ZERO)   # softplus(b + log e_{z_0}) at / off z_0
  # Class weights of q from its closed-form normaliser. q at z_0 is never formed: it is often 1 − 1e-7,
  # so E_q[d] = d_{z_0} + Σ_{k≠z_0} q_k (d_k − d_{z_0}) keeps the digits.
  a = c.log_r - c.l_res + c.l_noise + jnp.where(same, c_hit, c_miss)
  log_q_norm = c.l_res + _softplus(a)
  q_zt = jnp.exp(c.l_keep + c.l_noise + c_miss - log_q_norm)
  q_rest = jnp.exp(c.l_res + c.l_noise + c_miss - log_q_norm)
  # e_k = d_k − d_{z_0}; d_{z_0} in the accurate difference form, d_k by subtraction (c_miss is ~0 or tiny).
  d_z0 = _softplus_diff(c.b, lx_z0)
  shift = c_miss + d_z0
  e_z0 = _softplus(c.b + lx_z0) - shift
  e_zt = _softplus(c.b + lx_zt) - shift
  # The only pass over K is a plain sum (a product of two K-sized tensors would become a dot with both
  # operands materialised); weights are q_rest everywhere but at z_0 (0) and z_t (q_zt). No cancellation in
  # subtracting K·shift: softplus >= 0 and shift <= ~0 for t >= 2.
  sum_e = _sum_softplus(jnp.broadcast_to(c.b, z0.shape), log_x0) - k * shift
  mean_e = q_rest * (sum_e - e_z0) + jnp.where(same, 0.0, (q_zt - q_rest) * e_zt)
  log_mean_exp_e = jnp.where(same, _softplus_diff(a, d_z0, minus_delta=True),
                             _softplus_diff(a, _softplus(c.b + lx_zt) - c_miss) - d_z0)
  return jnp.maximum(log_mean_exp_e - mean_e, 0.0)   # rounding can give −1e-12 when p = q


def loss_t(log_x0: jnp.ndarray, z0: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray,
           sched: Schedule) -> jnp.ndarray:
  """L_t per image in nats: the posterior KL for t >= 2, the decoder NLL −log p(z_0 | z_1) for t = 1.

  Equal to `categorical_kl(log_posterior(log_one_hot(z0)), log_posterior(log_x0))` (t >= 2) and to
  `−log_posterior(log_x0)[z0]` (t = 1), but computed in one fused pass over K (one more in the gradient) and
  without cancellation near KL = 0. With θ_k = f1_k · f2_k (f1_k = q(z_t | z_s = k), f2_k = q(z_s = k | v)),
  the true posterior q has three distinct values (at z_0, at z_t, elsewhere), both normalisers have closed
  forms (Σ_k f2_k = 1 for normalised v), and with d_k = log f2_k(x̂_0) − log f2_k(e_{z_0}):

      KL = log E_q[e^d] − E_q[d],   log E_q[e^d] = softplus(a + d_{z_t}) − softplus(a)  (a: a scalar).

  Args:
    log_x0: f32[B, h, w, K], the model's normalised log-probabilities of x̂_0 (log_softmax of `x0_logits`).
    z0: i32[B, h, w], the data codes.
    z_t: i32[B, h, w], z_t ~ q(z_t | z_0).
    t: i32[B] (or a scalar), the step, 1..T.
    sched: the schedule.

  Returns:
    f32[B], L_t summed over positions.
  """
  z0, z_t = jnp.asarray(z0, jnp.int32), jnp.asarray(z_t, jnp.int32)
  t_vec = jnp.broadcast_to(jnp.asarray(t, jnp.int32), z0.shape[:1])
  c = _step_logs(sched, t_vec.reshape((-1,) + (1,) * (z0.ndim - 1)), log_x0.shape[-1])
  lx_z0, lx_zt = _take_last(log_x0, z0), _take_last(log_x0, z_t)
  kl = _posterior_kl(log_x0, z0, z_t, lx_z0, lx_zt, c)
  # Decoder term: log p(z_0 | z_1) = log f1_{z_0} + log f2_{z_0} − log(model normaliser).
  f2 = lambda lx: jnp.logaddexp(c.log_a_s + lx, c.l_noise)
  log_p_z0 = (jnp.where(z0 == z_t, c.l_keep, c.l_res) + f2(lx_z0)
              - jnp.logaddexp(c.log_r + f2(lx_zt), c.l_res))
  return jnp.where(t_vec == 1, -_sum_positions(log_p_z0), _sum_positions(kl))


def prior_kl(z0: jnp.ndarray, sched: Schedule, num_classes: Optional[int] = None) -> jnp.ndarray:
  """L_prior = KL(q(z_T | z_0) ‖ Uniform(K)) per image in nats, in closed form (it does not depend on z_0).

  With a = ᾱ_T: q puts a + (1 − a)/K on z_0 and (1 − a)/K elsewhere, so
  KL = (a + (1 − a)/K) log(1 + (K − 1) a) + (1 − a)(K − 1)/K · log(1 − a).

  Args:
    z0: i32[B, ...], the data codes (only their shape is used).
    sched: the schedule.
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    f32[B], ≈ 0 for a schedule that ends in noise; it has no gradient.
  """
  k = resolve_num_classes(sched, num_classes)
  log_a = sched.log_alpha_bar[-1]
  log_1m_a = sched.log_1m_alpha_bar[-1]
  a, one_m_a = jnp.exp(log_a), jnp.exp(log_1m_a)
  per_position = ((a + one_m_a / k) * jnp.log1p((k - 1) * a)
                  + one_m_a * (k - 1) / k * log_1m_a)
  num_positions = int(np.prod(z0.shape[1:]))
  return jnp.full((z0.shape[0],), jnp.maximum(per_position, 0.0) * num_positions, jnp.float32)


def x0_cross_entropy(log_x0: jnp.ndarray, z0: jnp.ndarray) -> jnp.ndarray:
  """−log p̂(z_0 | z_t) per image in nats: the auxiliary term of D3PM's hybrid loss (Austin et al. 2021, §3.4).

  It trains x̂_0 directly at every t, also at large t where the posterior KL barely depends on x̂_0.

  Args:
    log_x0: f32[B, h, w, K], the model's normalised log-probabilities of x̂_0.
    z0: i32[B, h, w], the data codes.

  Returns:
    f32[B], summed over positions.
  """
  return -_sum_positions(_take_last(log_x0, jnp.asarray(z0, jnp.int32)))


def importance_weighted_nelbo(loss_t_value: jnp.ndarray, p_t: jnp.ndarray,
                              prior: jnp.ndarray) -> jnp.ndarray:
  """The training estimator L_t / p(t) + L_prior, unbiased for −ELBO when t ~ p(t).

  Args:
    loss_t_value: f32[B], `loss_t` of each image.
    p_t: f32[B], the probability with which each image's t was drawn (1/T when uniform).
    prior: f32[B], `prior_kl`.

  Returns:
    f32[B], per-image estimate of −ELBO in nats.
  """
  return loss_t_value / p_t + prior


def bits_per_code(nats_per_image: jnp.ndarray, num_positions: int) -> jnp.ndarray:
  """Converts nats per image to bits per code: nats / (ln 2 · h · w). A uniform prior scores log2 K."""
  return nats_per_image / (np.log(2.0) * num_positions)


def _loss_at(keys: jax.Array, z0: jnp.ndarray, t: jnp.ndarray, logits_fn: LogitsFn, sched: Schedule,
             num_classes: int) -> jnp.ndarray:
  """L_t for one t per image, z_t drawn with fold_in(keys[b], t[b]); returns f32[B]."""
  step_keys = jax.vmap(jax.random.fold_in)(keys, t)
  z_t = jax.vmap(lambda kk, z, tt: q_sample(kk, z, tt, sched, num_classes))(step_keys, z0, t)
  log_x0 = jax.nn.log_softmax(logits_fn(z_t, t), axis=-1)
  return loss_t(log_x0, z0, z_t, t, sched)


def nelbo_all_t(keys: jax.Array, z0: jnp.ndarray, logits_fn: LogitsFn, sched: Schedule, *,
                t_chunk: int = 1, num_classes: Optional[int] = None) -> jnp.ndarray:
  """−ELBO per image in nats with every t = 1..T evaluated: L_prior + Σ_t L_t (held-out evaluation).

  The sum over t is exact; each L_t uses one z_t ~ q(z_t | z_0) drawn with fold_in(keys[b], t). A `lax.scan`
  runs `t_chunk` values of t per step as one network call on a batch of t_chunk·B maps, so memory stays
  O(t_chunk·B·h·w·K) for any T. The result does not depend on `t_chunk` (up to float summation order).

  Args:
    keys: per-example PRNG keys, [B] (typed) or u32[B, 2] (raw).
    z0: i32[B, h, w], the data codes.
    logits_fn: `(z_t: i32[N, h, w], t: i32[N]) -> f32[N, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.
    t_chunk: how many t values share one network call (>= 1).
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    f32[B], −ELBO in nats (use `bits_per_code` to report it).
  """
  if t_chunk < 1:
    raise ValueError(f"t_chunk must be >= 1, got {t_chunk}")
  k = resolve_num_classes(sched, num_classes)
  batch, big_t = z0.shape[0], sched.num_steps
  num_chunks = -(-big_t // t_chunk)
  tile = lambda x: jnp.tile(x, (t_chunk,) + (1,) * (x.ndim - 1))
  keys_c, z0_c = tile(keys), tile(z0)

  def body(total, chunk):
    # A padded last chunk repeats t = T with weight 0, so every chunk has the same shape.
    t = jnp.arange(1, t_chunk + 1, dtype=jnp.int32) + chunk * t_chunk
    weight = (t <= big_t).astype(jnp.float32)
    t_flat = jnp.repeat(jnp.minimum(t, big_t), batch)
    values = _loss_at(keys_c, z0_c, t_flat, logits_fn, sched, k).reshape(t_chunk, batch)
    return total + jnp.sum(values * weight[:, None], axis=0), None

  total, _ = jax.lax.scan(body, jnp.zeros((batch,), jnp.float32), jnp.arange(num_chunks))
  return total + prior_kl(z0, sched, k)


def nelbo_monte_carlo(keys: jax.Array, z0: jnp.ndarray, logits_fn: LogitsFn, sched: Schedule, *,
                      num_samples: int, num_classes: Optional[int] = None
                      ) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Unbiased −ELBO per image with a standard error, from `num_samples` uniform draws of t per image.

  Estimate: L_prior + T · mean_m L_{t_m}; standard error: T · std_m(L_{t_m}) / √M (sample std, M − 1).
  Draw m of image b uses fold_in(fold_in(keys[b], T + 1), m) for t (T + 1 never collides with a step index).

  Args:
    keys: per-example PRNG keys, [B] (typed) or u32[B, 2] (raw).
    z0: i32[B, h, w], the data codes.
    logits_fn: `(z_t: i32[B, h, w], t: i32[B]) -> f32[B, h, w, K]` logits of x̂_0; t is 1..T.
    sched: the schedule.
    num_samples: M >= 2, the number of t draws per image.
    num_classes: K; defaults to `sched.num_classes`.

  Returns:
    (f32[B] estimate in nats, f32[B] its standard error).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 for a standard error, got {num_samples}")
  k = resolve_num_classes(sched, num_classes)
  big_t = sched.num_steps
  t_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, big_t + 1))(keys)

  def body(_, m):
    draw_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, m))(t_keys)
    t = jax.vmap(lambda kk: jax.random.randint(kk, (), 1, big_t + 1, dtype=jnp.int32))(draw_keys)
    # z_t keys fold in m as well, so repeated draws of the same t are independent.
    return None, _loss_at(draw_keys, z0, t, logits_fn, sched, k)

  _, values = jax.lax.scan(body, None, jnp.arange(num_samples))   # f32[M, B]; M is small
  estimate = prior_kl(z0, sched, k) + big_t * jnp.mean(values, axis=0)
  return estimate, big_t * jnp.std(values, axis=0, ddof=1) / np.sqrt(num_samples)
