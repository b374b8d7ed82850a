"""Vector quantisation as pure functions (docs/method.md §2).

The codebook is an ordinary parameter array `f32[K, d]` owned by the VQ-VAE module; everything here is a pure
function of it, so ReFiT can swap it and the tests can call these without a module.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Quantized(NamedTuple):
  """Output of `quantize`.

  Attributes:
    z_q: f32[..., d] straight-through quantised features: forward value Z[z], gradient of the identity to h.
    indices: i32[...] nearest code per position.
    codebook_loss: f32[] mean ||sg[h] - z_q||² (moves the codebook towards the features).
    commitment_loss: f32[] mean ||h - sg[z_q]||² (keeps the encoder close to its codes; weighted by β).
  """
  z_q: jnp.ndarray
  indices: jnp.ndarray
  codebook_loss: jnp.ndarray
  commitment_loss: jnp.ndarray


def squared_distances(h: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """||h - Z_k||² for every position and code, through one matmul (never a [..., K, d] tensor).

  Args:
    h: f32[..., d] features.
    codebook: f32[K, d].

  Returns:
    f32[..., K] squared distances (computed in float32 whatever the input dtype).
  """
  h = h.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  h_sq = jnp.sum(h * h, axis=-1, keepdims=True)
  z_sq = jnp.sum(codebook * codebook, axis=-1)
  cross = jnp.einsum("...d,kd->...k", h, codebook, precision=jax.lax.Precision.HIGHEST)
  return h_sq + z_sq - 2.0 * cross


def nearest_code(h: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """Index of the nearest codebook vector: `i32[...]` for `h: f32[..., d]`, `codebook: f32[K, d]`."""
  return jnp.argmin(squared_distances(h, codebook), axis=-1).astype(jnp.int32)


def lookup(indices: jnp.ndarray, codebook: jnp.ndarray) -> jnp.ndarray:
  """Code vectors `f32[..., d]` for `indices: i32[...]`."""
  return jnp.take(codebook, indices, axis=0)


def quantize(h: jnp.ndarray, codebook: jnp.ndarray) -> Quantized:
  """Nearest-code quantisation with the straight-through estimator and the two VQ loss terms.

  Args:
    h: f32[..., d] encoder features (after quant_conv).
    codebook: f32[K, d].

  Returns:
    `Quantized`; the stage loss adds `codebook_loss + beta * commitment_loss`.
  """
  indices = nearest_code(jax.lax.stop_gradient(h), codebook)
  z = lookup(indices, codebook).astype(h.dtype)
  codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(h) - z))
  commitment_loss = jnp.mean(jnp.square(h - jax.lax.stop_gradient(z)))
  # Forward value z; backward identity to h, so decoder gradients reach the encoder.
  z_q = h + jax.lax.stop_gradient(z - h)
  return Quantized(z_q, indices, codebook_loss, commitment_loss)


def vq_objective(q: Quantized, beta: float, convention: str = "ours") -> jnp.ndarray:
  """The two VQ terms of a stage's loss, `f32[]`: codebook + β·commitment ('ours', the VQ-VAE paper's) or
  β·codebook + commitment ('taming_legacy', taming-transformers' default `legacy=True` quantiser, under which
  its released tokenizers were trained: fine-tuning one keeps its balance)."""
  if convention == "taming_legacy":
    return beta * q.codebook_loss + q.commitment_loss
  return q.codebook_loss + beta * q.commitment_loss


def code_histogram(indices: jnp.ndarray, num_codes: int,
                   mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Counts of each code, `f32[K]`, over `indices: i32[B, ...]` (positions of masked-out images skipped).

  Args:
    indices: i32[B, ...] code maps.
    num_codes: K.
    mask: optional bool[B]; False rows are padding and are not counted.
  """
  weights = jnp.ones(indices.shape, jnp.float32)
  if mask is not None:
    weights = weights * mask.reshape(mask.shape + (1,) * (indices.ndim - mask.ndim))
  return jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(weights.reshape(-1))


def usage_fraction(histogram: jnp.ndarray, min_count: int = 1) -> jnp.ndarray:
  """Fraction of codes used at least `min_count` times (the authors count >= 10), `f32[]`."""
  return jnp.mean((histogram >= min_count).astype(jnp.float32))


def perplexity(histogram: jnp.ndarray) -> jnp.ndarray:
  """exp(H(p)) of the code distribution p = histogram / sum, `f32[]` (K when uniform, 1 when collapsed)."""
  p = histogram / jnp.maximum(jnp.sum(histogram), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)
