"""Inpainting an AR prior under any mask: sample prefix-forced completions, then reweight (importance
resampling).

Prefix-forced sampling (`sampling.sample` with `known`) draws the unknown codes z_U from
q(z_U) = Π_{i ∈ U} p(z_i | z_<i), ignoring what the known codes z_K after them say about them. The model's own
conditional is p(z_U | z_K) ∝ p(z_U, z_K) = q(z_U) · Π_{i ∈ K} p(z_i | z_<i), so a completion's importance
weight is w = Π_{i ∈ K} p(z_i | z_<i), the likelihood of the known codes given everything before them. Known
codes before the first unknown position form a prefix shared by every candidate of an image: their factor is
the same for all of them and cancels when the weights are normalised, so it is left out. Drawing N candidates
and keeping one with probability ∝ w (sampling-importance-resampling) converges to p(z_U | z_K) as N grows;
the effective sample size (Σw)² / Σw² says how many candidates effectively count.

The weights use the model's untempered, unfiltered log-probabilities. With temperature 1 and no top-k / top-p
the proposal is q above and the target is exactly the model's conditional; with a temperature or a filter the
proposal changes but the weights do not correct for it, so the result is then the filtered sampler's path
reweighted by the known codes' likelihood, not the model's conditional.

All math is in log space.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vqddm_jax.autoregressive.sampling import Decoder, log_probs, sample

# Candidate n samples with fold_in(key, n), n < N; the resampling key is fold_in(key, 2^32 - 1), the last
# fold_in value, which no candidate can use. (Not jax.random.split(key): split(key)[i] == fold_in(key, i).)
_RESAMPLE_TAG = 2**32 - 1


def log_weights(logp: jax.Array, known_mask: jax.Array) -> jax.Array:
  """Log importance weights of prefix-forced completions.

  Args:
    logp: f32[B, L], log p(code_i | codes_<i) of each completion (`sampling.log_probs`).
    known_mask: bool[B, L], True where the code was known (forced).

  Returns:
    f32[B]: Σ log p(known code | codes before it) over the known positions after the first unknown position
    of each row (0 where no known position follows an unknown one).
  """
  known_mask = jnp.asarray(known_mask, bool)
  after_first_unknown = jnp.cumsum(~known_mask, axis=1) > 0
  counted = known_mask & after_first_unknown
  return jnp.sum(jnp.where(counted, jnp.asarray(logp, jnp.float32), 0.0), axis=1)


def effective_sample_size(log_w: jax.Array) -> jax.Array:
  """(Σ_n w_n)² / Σ_n w_n² per image, from log weights (1 when one weight dominates, N when all are equal).

  Args:
    log_w: f32[N, B], log weights of N candidates for each of B images.

  Returns:
    f32[B], in [1, N].
  """
  log_w = jnp.asarray(log_w, jnp.float32)
  return jnp.exp(2.0 * jax.nn.logsumexp(log_w, axis=0) - jax.nn.logsumexp(2.0 * log_w, axis=0))


def inpaint_reweighted(decoder: Decoder, key: jax.Array, known: jax.Array, known_mask: jax.Array, *,
                       num_candidates: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Completes each code map under any mask by sampling-importance-resampling of prefix-forced completions.

  Candidate n (n = 0..N-1) is `sample(decoder, fold_in(key, n), B, known=known, known_mask=known_mask, ...)`,
  so with N = 1 the result is exactly the prefix-forced completion drawn with the key fold_in(key, 0). Each
  candidate gets one teacher-forced pass for its weight (`log_weights` of the model's own log-probs); then one
  candidate per image is kept with probability ∝ w, drawn with fold_in(key, 2^32 - 1), a key no candidate
  uses. Candidates run one after another (`lax.map`), so only one decoding cache is alive at a time; the N
  candidate code maps, i32[N, B, L], are kept.

  Args:
    decoder: the model.
    key: the inpainting key.
    known: i32[B, L], the known codes (ignored where the mask is False).
    known_mask: bool[B, L], True where the code is known.
    num_candidates: N >= 1.
    temperature, top_k, top_p: the proposal's sampling options (`sampling.filter_logits`); the weights are
      exact for the model's conditional only at the defaults (see the module docstring).

  Returns:
    (codes i32[B, L] with the known codes in place, effective sample size f32[B] in [1, N], the log weight
    f32[B] of the kept candidate).
  """
  if int(num_candidates) != num_candidates or num_candidates < 1:
    raise ValueError(f"num_candidates must be an integer >= 1, got {num_candidates}")
  known, known_mask = jnp.asarray(known, jnp.int32), jnp.asarray(known_mask, bool)
  batch = known.shape[0]

  def candidate(n):
    codes = sample(decoder, jax.random.fold_in(key, n), batch, temperature=temperature, top_k=top_k,
                   top_p=top_p, known=known, known_mask=known_mask)
    return codes, log_weights(log_probs(decoder, codes), known_mask)

  codes, log_w = jax.lax.map(candidate, jnp.arange(int(num_candidates), dtype=jnp.int32))  # [N, B, L], [N, B]
  chosen = jax.random.categorical(jax.random.fold_in(key, _RESAMPLE_TAG), log_w.T, axis=-1)   # [B]
  rows = jnp.arange(batch)
  return codes[chosen, rows], effective_sample_size(log_w), log_w[chosen, rows]
