"""Sample-quality metrics in a feature space: Fréchet distance, KID, and k-NN precision / recall.

All of them compare two sets of feature vectors (rows), whatever network produced them: the project's small
MNIST classifier offline, the FID Inception network (`inception.py`) where its weights are available. Every
computation runs in float64 NumPy on the host: these are one-off evaluations whose cost is dominated by
matrix products that NumPy's BLAS does well, and float64 keeps the Fréchet distance's trace of a matrix square
root accurate (float32 loses several digits there for 2048-d features).
"""
from __future__ import annotations

import numpy as np


def _as_features(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"{name} must be a [N, F] array with N >= 2 rows, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds non-finite values")
  return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of a feature set, the Gaussian FID fits to it.

  Args:
    features: f[N, F] (any float dtype), N >= 2.

  Returns:
    (mu f64[F], sigma f64[F, F]); sigma is the unbiased (N - 1) covariance, as in pytorch-fid and TF FID.
  """
  x = _as_features(features, "features")
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; eigenvalues that rounding made negative count as 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  d² = ||mu1 − mu2||² + Tr(sigma1) + Tr(sigma2) − 2 Tr((sigma1^½ sigma2 sigma1^½)^½).

  The cross term is computed from the symmetric PSD matrix sigma1^½ sigma2 sigma1^½ by an eigen-decomposition
  (its square root's trace is the sum of the square roots of its eigenvalues). That equals pytorch-fid's
  Tr(sqrtm(sigma1 sigma2)) — the two matrices are similar — but needs no scipy, never goes complex, and needs
  no diagonal "offset" for singular covariances (N < F).

  Args:
    mu1, mu2: f[F] means.
    sigma1, sigma2: f[F, F] symmetric PSD covariances.

  Returns:
    The squared distance d² as a Python float (what is reported as FID), >= 0: rounding that would make it
    slightly negative for (nearly) identical statistics is clipped to 0.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  f = mu1.shape[0]
  if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
    raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                     f"sigma2 {s2.shape}; expected [F] and [F, F]")
  # Symmetrise: covariances that went through float32 or a file are symmetric only up to rounding.
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  root1 = _psd_sqrt(s1)
  cross = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((cross + cross.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = mu1 - mu2
  d2 = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
  return float(max(d2, 0.0))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² with the cubic polynomial kernel k(a, b) = (a·b / d + 1)³ (Bińkowski et al. 2018)."""
  m, n, d = x.shape[0], y.shape[0], x.shape[1]
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  # The unbiased estimator drops the diagonal k(a, a) terms of the within-set sums.
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(features_a, features_b, *, num_subsets: int = 100, subset_size: int | None = None,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD² (cubic polynomial kernel) averaged over random subsets.

  Each of `num_subsets` rounds draws `subset_size` rows of each set without replacement (independently for
  the two sets) and computes the unbiased MMD², as Bińkowski et al. and torch-fidelity do. Unlike FD, the
  estimate is unbiased, so it can be slightly negative when the two sets come from the same distribution.

  Args:
    features_a: f[N_a, F].
    features_b: f[N_b, F].
    num_subsets: number of random subsets (rounds).
    subset_size: rows per set per round; None means min(N_a, N_b, 1000). A value above min(N_a, N_b)
      raises ValueError.
    seed: seed of the NumPy generator that draws the subsets (the result is a deterministic function of it).

  Returns:
    (mean, std) of the MMD² estimates over the subsets, as Python floats.
  """
  a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
  largest = min(a.shape[0], b.shape[0])
  m = min(largest, 1000) if subset_size is None else int(subset_size)
  if not 2 <= m <= largest:
    raise ValueError(f"subset_size = {subset_size} must be in [2, min(N_a, N_b) = {largest}]")
  if num_subsets < 1:
    raise ValueError(f"num_subsets = {num_subsets} must be positive")
  rng = np.random.default_rng(seed)
  values = np.array([
      _mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
      for _ in range(num_subsets)])
  return float(values.mean()), float(values.std())


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _sq_distances(q: np.ndarray, q_norms: np.ndarray, r: np.ndarray, r_norms: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances f64[len(q), len(r)] through one matrix product, clipped at 0."""
  return np.maximum(q_norms[:, None] + r_norms[None, :] - 2.0 * (q @ r.T), 0.0)


def knn_radii(features, *, k: int = 3, chunk_size: int = 1024) -> np.ndarray:
  """Squared distance from each row to its k-th nearest other row (the radius of its k-NN ball).

  A row's distance to itself is 0 and always ranks first, so the k-th nearest *other* row is entry k of
  the sorted distance row (as in Kynkäänniemi et al.'s reference code).

  Args:
    features: f[N, F], N > k.
    k: neighbourhood size.
    chunk_size: rows per block; memory is O(chunk_size * N) float64.

  Returns:
    f64[N] squared radii.
  """
  x = _as_features(features, "features")
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k = {k} must be in [1, N - 1 = {n - 1}]")
  norms = _sq_norms(x)
  radii = np.empty(n)
  for start in range(0, n, chunk_size):
    d = _sq_distances(x[start:start + chunk_size], norms[start:start + chunk_size], x, norms)
    # The diagonal is 0 in exact arithmetic; force it, so rounding can never rank self below a neighbour.
    rows = np.arange(d.shape[0])
    d[rows, start + rows] = 0.0
    radii[start:start + d.shape[0]] = np.partition(d, k, axis=1)[:, k]
  return radii


def _fraction_inside(queries: np.ndarray, refs: np.ndarray, ref_radii: np.ndarray,
                     chunk_size: int) -> float:
  """Fraction of query rows within the k-NN ball of at least one reference row."""
  q_norms, r_norms = _sq_norms(queries), _sq_norms(refs)
  inside = 0
  for start in range(0, queries.shape[0], chunk_size):
    d = _sq_distances(queries[start:start + chunk_size], q_norms[start:start + chunk_size], refs, r_norms)
    inside += int(np.count_nonzero((d <= ref_radii[None, :]).any(axis=1)))
  return inside / queries.shape[0]


def precision_recall(real, fake, *, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN manifold estimates.

  The manifold of a set is the union of balls around its rows, each with the radius to that row's k-th
  nearest neighbour in the same set. Precision is the fraction of fake rows inside the real manifold
  (fidelity); recall is the fraction of real rows inside the fake manifold (coverage). Report both: a model
  that produces a few perfect samples has high precision and low recall.

  Distances are computed in blocks of `chunk_size` rows, so memory stays O(chunk_size * max(N_real,
  N_fake)) float64 (about 80 MB at chunk 1024 and N = 10,000) instead of O(N²).

  Args:
    real: f[N_r, F], N_r > k.
    fake: f[N_f, F], N_f > k.
    k: neighbourhood size (the paper uses 3).
    chunk_size: rows per distance block.

  Returns:
    (precision, recall), Python floats in [0, 1].
  """
  r, f = _as_features(real, "real"), _as_features(fake, "fake")
  if r.shape[1] != f.shape[1]:
    raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size = {chunk_size} must be positive")
  precision = _fraction_inside(f, r, knn_radii(r, k=k, chunk_size=chunk_size), chunk_size)
  recall = _fraction_inside(r, f, knn_radii(f, k=k, chunk_size=chunk_size), chunk_size)
  return precision, recall


def fraction_stderr(fraction: float, count: int) -> float:
  """Binomial standard error √(p (1 − p) / n) of a fraction p of n independent rows (precision or recall).

  Precision is the fraction of the n fake rows inside the real manifold, so with the real set fixed this is
  its sampling error over fakes (recall: over the n real rows, with the fake manifold fixed, which it
  understates). At n = 256 and p = 0.85 it is 0.022: differences between runs below ~0.05 are noise.
  """
  if count < 1:
    raise ValueError(f"count = {count} must be positive")
  p = min(max(float(fraction), 0.0), 1.0)
  return (p * (1.0 - p) / count) ** 0.5
