"""Multinomial (uniform-transition) discrete diffusion over code maps: pure, jit-able JAX (docs/method.md §3).

Time index t = 1..T everywhere; schedule tables are indexed by t = 0..T (row 0: the clean data). K is the last
axis of every probability tensor; nothing builds a K×K matrix, so memory is O(B·h·w·K).

Modules: `schedule` (noise schedules), `posterior` (q(z_t | z_0), q_sample, the posterior, KL,
parametrisations), `objective` (per-image loss terms, estimators of −ELBO, bits per code), `importance`
(importance sampling of t), `samplers` (ancestral sampling, strided sampling, inpainting), `editing` (mixing
two maps at step t, re-noising one, denoising from t).
"""
from __future__ import annotations

from vqddm_jax.diffusion import editing, importance, objective, posterior, samplers, schedule
from vqddm_jax.diffusion.editing import denoise, denoise_chunk, denoise_timesteps, mix_at_step, renoise
from vqddm_jax.diffusion.importance import (ImportanceState, importance_probs, init_importance, is_ready,
                                            sample_t)
from vqddm_jax.diffusion.objective import (bits_per_code, importance_weighted_nelbo, loss_t, nelbo_all_t,
                                           nelbo_monte_carlo, prior_kl, x0_cross_entropy)
from vqddm_jax.diffusion.posterior import (PARAMETRIZATIONS, categorical, categorical_kl, log_one_hot,
                                           log_posterior, log_q_zt_given_z0, q_sample, x0_logits)
from vqddm_jax.diffusion.samplers import (inpaint, inpaint_chunk, inpaint_init, model_log_posterior,
                                          reverse_chunk, reverse_step, sample, sampling_timesteps,
                                          tempered, uniform_codes)
from vqddm_jax.diffusion.schedule import (LOG_ZERO, SCHEDULE_KINDS, Schedule, log_keep_ratio,
                                          make_schedule)

__all__ = [
    "LOG_ZERO", "PARAMETRIZATIONS", "SCHEDULE_KINDS", "ImportanceState", "Schedule", "bits_per_code",
    "categorical", "categorical_kl", "denoise", "denoise_chunk", "denoise_timesteps", "editing", "importance",
    "importance_probs", "importance_weighted_nelbo", "init_importance", "inpaint", "inpaint_chunk",
    "inpaint_init", "is_ready", "log_keep_ratio", "log_one_hot", "log_posterior", "log_q_zt_given_z0",
    "loss_t", "make_schedule", "mix_at_step", "model_log_posterior", "nelbo_all_t", "nelbo_monte_carlo",
    "objective", "posterior", "prior_kl", "q_sample", "renoise", "reverse_chunk", "reverse_step", "sample",
    "sample_t", "samplers", "sampling_timesteps", "schedule", "tempered", "uniform_codes", "x0_cross_entropy",
    "x0_logits",
]
