"""Mean and covariance of a feature set that never fits in memory, accumulated chunk by chunk in float64.

FID needs the mean and covariance of 10k-50k sample features and of a whole training split (hundreds of
thousands of images); holding the features would cost N × F floats. `Moments` keeps the count, the mean and
the scatter matrix (sum of outer products of deviations from the mean) instead, so memory is O(F²) whatever N.

Chunks are combined with the pairwise update of Chan, Golub & LeVeque (1979): with counts n_a, n_b, means
m_a, m_b, scatters S_a, S_b and d = m_b − m_a,

  n = n_a + n_b,  m = m_a + d · n_b / n,  S = S_a + S_b + d dᵀ · n_a n_b / n.

Unlike accumulating Σx and Σxxᵀ and subtracting n m mᵀ at the end, this never cancels two large numbers, so
features with a large mean (ReLU outputs, Inception's pool_3) keep their digits. The result equals
`np.cov(all_features, rowvar=False)` up to float64 rounding, whatever the chunking.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Moments:
  """Sufficient statistics of a feature set for a Gaussian fit.

  Attributes:
    count: rows seen.
    mean: f64[F] mean of the rows (zeros while count is 0).
    scatter: f64[F, F] Σ (x − mean)(x − mean)ᵀ over the rows.
  """
  count: int
  mean: np.ndarray
  scatter: np.ndarray

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  def covariance(self) -> np.ndarray:
    """f64[F, F], the unbiased (N − 1) covariance, as `feature_metrics.feature_statistics` and FID use."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
    return self.scatter / (self.count - 1)


def empty(dim: int) -> Moments:
  """The moments of no rows of width `dim`."""
  return Moments(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def of_chunk(features) -> Moments:
  """Moments of one chunk `f[n, F]` (any float dtype; computed in float64)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be a [n, F] array, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("features hold non-finite values")
  if x.shape[0] == 0:
    return empty(x.shape[1])
  mean = x.mean(axis=0)
  centred = x - mean
  return Moments(int(x.shape[0]), mean, centred.T @ centred)


def merge(a: Moments, b: Moments) -> Moments:
  """The moments of the union of two row sets (Chan et al.'s pairwise update; see the module doc)."""
  if a.dim != b.dim:
    raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
  if b.count == 0:
    return a
  if a.count == 0:
    return b
  n = a.count + b.count
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / n)
  scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.count * b.count / n)
  return Moments(n, mean, scatter)


def add_chunk(moments: Moments, features) -> Moments:
  """`moments` with the rows `features: f[n, F]` added."""
  return merge(moments, of_chunk(features))


def accumulate(chunks: Iterable, dim: int) -> Moments:
  """The moments of every row of an iterable of `f[n_i, F]` chunks, holding one chunk at a time."""
  total = empty(dim)
  for chunk in chunks:
    total = add_chunk(total, chunk)
  return total
