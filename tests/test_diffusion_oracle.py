"""Float64 brute-force Bayes oracle for the diffusion tests (explicit K×K transition matrices, small K).

The schedule is recomputed here from docs/method.md §3.2 independently of `vqddm_jax.diffusion.schedule`.
"""
from __future__ import annotations

import numpy as np


def alphas_f64(num_steps: int, kind: str, s: float = 0.008):
  """(α_t, ᾱ_t) for t = 0..T in float64 straight from the formulas (α_0 = ᾱ_0 = 1)."""
  t = np.arange(num_steps + 1, dtype=np.float64)
  f = np.cos((t / num_steps + s) / (1 + s) * np.pi / 2) ** 2
  if kind == "cosine":
    alpha_bar = f / f[0]
    alpha = np.concatenate([[1.0], alpha_bar[1:] / alpha_bar[:-1]])
  elif kind == "cosine_sqrt":
    alpha = np.concatenate([[1.0], np.sqrt(np.clip(f[1:] / f[:-1], 0.001, 1.0))])
    alpha_bar = np.cumprod(alpha)
  else:
    raise ValueError(kind)
  return alpha, alpha_bar


def transition(keep: float, num_classes: int) -> np.ndarray:
  """Q = keep·I + (1 − keep)·11ᵀ/K as an explicit K×K matrix; row = from, column = to."""
  return keep * np.eye(num_classes) + (1.0 - keep) / num_classes


def bayes_posterior(v: np.ndarray, z_t: np.ndarray, q_t_given_s: np.ndarray,
                    q_s_given_0: np.ndarray) -> np.ndarray:
  """q(z_s | z_t, v) ∝ Q_{s→t}[z_s, z_t] · (vᵀ Q̄_s)[z_s], for v: [N, K], z_t: [N]."""
  post = q_t_given_s[:, z_t].T * (v @ q_s_given_0)
  return post / post.sum(-1, keepdims=True)


def test_oracle_is_a_distribution():
  alpha, alpha_bar = alphas_f64(50, "cosine_sqrt")
  q = transition(alpha_bar[10], 4)
  np.testing.assert_allclose(q.sum(1), 1.0)
  post = bayes_posterior(np.eye(4)[[0, 3]], np.array([1, 3]), transition(alpha[11], 4), q)
  np.testing.assert_allclose(post.sum(1), 1.0)
  assert np.all(post >= 0) and np.isclose(alpha_bar[0], 1.0)
