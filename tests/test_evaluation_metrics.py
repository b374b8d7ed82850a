"""Feature-space metrics: Fréchet distance, KID and k-NN precision / recall against closed forms."""
from __future__ import annotations

import numpy as np
import pytest

from vqddm_jax.evaluation import feature_metrics as fm


def _gaussian(rng, n, mean, cov):
  return rng.multivariate_normal(mean, cov, size=n)


def _random_spd(rng, f):
  a = rng.normal(size=(f, f))
  return a @ a.T / f + 0.1 * np.eye(f)


def test_feature_statistics_matches_numpy():
  x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
  mu, sigma = fm.feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64).T), rtol=1e-12)


def test_frechet_identical_sets_is_zero():
  x = np.random.default_rng(1).normal(size=(300, 16))
  mu, sigma = fm.feature_statistics(x)
  assert fm.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form():
  # Diagonal covariances: d² = ||mu1 - mu2||² + sum_i (s1_i - s2_i)², s = standard deviations.
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
  sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
  got = fm.frechet_distance(mu1, np.diag(sd1 ** 2), mu2, np.diag(sd2 ** 2))
  assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_general_closed_form_and_symmetry():
  rng = np.random.default_rng(2)
  f = 6
  mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
  s1, s2 = _random_spd(rng, f), _random_spd(rng, f)
  # Independent oracle: the trace term through the eigenvalues of the (non-symmetric) product s1 @ s2.
  tr_cross = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_cross
  d12 = fm.frechet_distance(mu1, s1, mu2, s2)
  assert d12 == pytest.approx(expected, rel=1e-10)
  assert fm.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(d12, rel=1e-10)
  assert d12 > 0


def test_frechet_of_samples_approaches_population_value():
  rng = np.random.default_rng(3)
  mean_b = np.array([1.0, 0.0, 0.0])
  a = _gaussian(rng, 20000, np.zeros(3), np.eye(3))
  b = _gaussian(rng, 20000, mean_b, np.diag([4.0, 1.0, 1.0]))
  got = fm.frechet_distance(*fm.feature_statistics(a), *fm.feature_statistics(b))
  assert got == pytest.approx(1.0 + (2.0 - 1.0) ** 2, abs=0.1)


def test_frechet_singular_covariances_stay_real_and_nonnegative():
  # Fewer samples than dimensions: both covariances are singular (the case that needs sqrtm's offset).
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.1
  d = fm.frechet_distance(*fm.feature_statistics(a), *fm.feature_statistics(b))
  assert np.isfinite(d) and d >= 0
  assert fm.frechet_distance(*fm.feature_statistics(b), *fm.feature_statistics(a)) == pytest.approx(d, rel=1e-8)


def test_frechet_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes do not match"):
    fm.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_identical_distribution_near_zero_and_shift_positive():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(600, 8))
  same = rng.normal(size=(600, 8))
  shifted = rng.normal(size=(600, 8)) + 1.0
  mean0, std0 = fm.kid(a, same, num_subsets=20, subset_size=200, seed=0)
  mean1, std1 = fm.kid(a, shifted, num_subsets=20, subset_size=200, seed=0)
  assert abs(mean0) < 0.05 and std0 < 0.1
  assert mean1 > 1.0 and mean1 > 20 * max(abs(mean0), std0)
  # The identical *set* also scores ~0, and the result is a deterministic function of the seed.
  assert abs(fm.kid(a, a, num_subsets=20, subset_size=200, seed=1)[0]) < 0.05
  assert fm.kid(a, shifted, num_subsets=20, subset_size=200, seed=0) == (mean1, std1)


def test_kid_matches_brute_force_formula():
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
  k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
  xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
  yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
  xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
  # subset_size = N draws every row (in some order), and MMD² does not depend on the order.
  mean, std = fm.kid(x, y, num_subsets=3, subset_size=5, seed=0)
  assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_rejects_too_large_subsets():
  x = np.zeros((10, 2))
  with pytest.raises(ValueError, match="subset_size"):
    fm.kid(x, x, subset_size=11)
  assert fm.kid(x + np.arange(10)[:, None], x, num_subsets=1)[0] > 0  # None -> min(N_a, N_b).


def test_precision_recall_identical_and_shifted():
  rng = np.random.default_rng(7)
  real = rng.normal(size=(400, 5))
  assert fm.precision_recall(real, real, k=3, chunk_size=64) == (1.0, 1.0)
  far = fm.precision_recall(real, real + 10.0, k=3)
  assert far == (0.0, 0.0)
  near_p, near_r = fm.precision_recall(real, rng.normal(size=(400, 5)) + 0.75, k=3)
  assert 0.0 < near_p < 0.95 and 0.0 < near_r < 0.95


def test_precision_recall_mode_collapse_lowers_recall_only():
  rng = np.random.default_rng(8)
  real = rng.normal(size=(500, 2))
  # Fakes that cover only a small part of the real distribution: faithful but not diverse.
  collapsed = rng.normal(size=(500, 2)) * 0.2
  precision, recall = fm.precision_recall(real, collapsed, k=3)
  assert precision > 0.95 and recall < 0.5


def test_precision_recall_chunking_does_not_change_the_result():
  rng = np.random.default_rng(9)
  real, fake = rng.normal(size=(300, 4)), rng.normal(size=(250, 4)) * 1.3
  full = fm.precision_recall(real, fake, k=3, chunk_size=10_000)
  assert fm.precision_recall(real, fake, k=3, chunk_size=7) == full


def test_precision_stderr_matches_the_spread_over_fake_sets():
  """Given the real set, precision over n i.i.d. fakes is a binomial fraction: its spread over many fake sets
  is `fraction_stderr`, the ± the report prints."""
  rng = np.random.default_rng(11)
  real = rng.normal(size=(300, 3))
  draws = [fm.precision_recall(real, rng.normal(size=(128, 3)) * 1.4, k=3)[0] for _ in range(300)]
  expected = fm.fraction_stderr(np.mean(draws), 128)
  assert 0.2 < np.mean(draws) < 0.9
  assert abs(np.std(draws) / expected - 1.0) < 0.15
  assert fm.fraction_stderr(1.0, 5) == 0.0 and fm.fraction_stderr(0.85, 256) == pytest.approx(0.0223, abs=1e-4)
  with pytest.raises(ValueError, match="count"):
    fm.fraction_stderr(0.5, 0)


def test_knn_radii_against_sorting():
  x = np.random.default_rng(10).normal(size=(40, 3))
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  expected = np.sort(d, axis=1)[:, 2]  # Third nearest other row.
  np.testing.assert_allclose(fm.knn_radii(x, k=3, chunk_size=16), expected, rtol=1e-10)
