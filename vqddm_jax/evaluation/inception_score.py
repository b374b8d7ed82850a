"""Inception Score (Salimans et al. 2016), streamed over chunks of classifier logits.

IS = exp(E_x KL(p(y|x) ‖ p(y))), with p(y) the mean of p(y|x) over the set. As in the original code, the N
images are cut into `num_splits` (10) consecutive parts of N // 10 images (image i in part s when
s·N//10 <= i < (s+1)·N//10), the score is computed per part, and the mean and standard deviation over the parts
are reported. The class probabilities are softmax(pool_3 · W_fc) of the FID Inception network, without the fc
layer's bias, which is what the original TensorFlow code computes (it reads the 'softmax/logits/MatMul'
weights and multiplies by them; torch-fidelity calls these "logits_unbiased").

Streaming: E_x KL(p(y|x) ‖ p̄) = E_x Σ_y p(y|x) log p(y|x) − Σ_y p̄(y) log p̄(y), since p̄ is the mean of
p(y|x); so per part it suffices to sum p(y|x) and Σ_y p log p over its images, and memory stays O(parts ×
classes) whatever N.
"""
from __future__ import annotations

import dataclasses

import numpy as np

NUM_SPLITS = 10


@dataclasses.dataclass(frozen=True)
class ScoreSums:
  """Per-part running sums of a set of `total` images (see the module doc).

  Attributes:
    total: the number of images of the whole set (fixes the parts).
    counts: i64[S] images seen per part.
    prob_sums: f64[S, C] Σ p(y|x) per part.
    neg_entropy_sums: f64[S] Σ_x Σ_y p(y|x) log p(y|x) per part.
  """
  total: int
  counts: np.ndarray
  prob_sums: np.ndarray
  neg_entropy_sums: np.ndarray


def empty(total: int, num_classes: int, num_splits: int = NUM_SPLITS) -> ScoreSums:
  """Sums for a set of `total` images; fewer than `num_splits` images give one part per image."""
  if total < 1:
    raise ValueError(f"total = {total} must be positive")
  parts = min(num_splits, total)
  return ScoreSums(total, np.zeros(parts, np.int64), np.zeros((parts, num_classes), np.float64),
                   np.zeros(parts, np.float64))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def add_logits(sums: ScoreSums, logits, start: int) -> ScoreSums:
  """`sums` with the images `start .. start + n − 1` of the set added.

  Args:
    sums: from `empty` or a previous call.
    logits: f[n, C] class logits of those images (any float dtype; computed in float64).
    start: the index of the first of them in the whole set (decides their parts).
  """
  logits = np.asarray(logits, np.float64)
  n, parts = logits.shape[0], len(sums.counts)
  if logits.ndim != 2 or logits.shape[1] != sums.prob_sums.shape[1]:
    raise ValueError(f"logits must be [n, {sums.prob_sums.shape[1]}], got shape {logits.shape}")
  if start < 0 or start + n > sums.total:
    raise ValueError(f"images {start}..{start + n - 1} are outside the set of {sums.total}")
  log_p = _log_softmax(logits)
  p = np.exp(log_p)
  # Part s holds images [s·N//S, (s+1)·N//S): the original code's split.
  bounds = np.arange(parts + 1) * sums.total // parts
  part = np.searchsorted(bounds, np.arange(start, start + n), side="right") - 1
  counts, prob_sums, neg = sums.counts.copy(), sums.prob_sums.copy(), sums.neg_entropy_sums.copy()
  np.add.at(counts, part, 1)
  np.add.at(prob_sums, part, p)
  np.add.at(neg, part, (p * log_p).sum(axis=1))
  return ScoreSums(sums.total, counts, prob_sums, neg)


def merge(a: ScoreSums, b: ScoreSums) -> ScoreSums:
  """Sums of two disjoint sets of images of the same whole set (e.g. two hosts' shares)."""
  if a.total != b.total or a.prob_sums.shape != b.prob_sums.shape:
    raise ValueError("the sums belong to different sets")
  return ScoreSums(a.total, a.counts + b.counts, a.prob_sums + b.prob_sums,
                   a.neg_entropy_sums + b.neg_entropy_sums)


def score(sums: ScoreSums) -> tuple[float, float]:
  """(mean, std) of the per-part Inception Scores over the parts that received images.

  A set read from files may come out a few images short of `total` (a file that fails to decode is
  skipped); its parts then hold slightly fewer images, which changes the score negligibly.
  """
  used = sums.counts > 0
  if not used.any():
    raise ValueError("no images were added")
  counts, prob_sums = sums.counts[used], sums.prob_sums[used]
  mean_p = prob_sums / counts[:, None]
  # p̄ log p̄ with 0 log 0 = 0: a class no image of the part predicts contributes nothing.
  safe = np.where(mean_p > 0, mean_p, 1.0)
  kl = sums.neg_entropy_sums[used] / counts - (mean_p * np.log(safe)).sum(axis=1)
  scores = np.exp(kl)
  return float(scores.mean()), float(scores.std())


def inception_score(logits, num_splits: int = NUM_SPLITS) -> tuple[float, float]:
  """IS (mean, std over parts) of all images at once: logits f[N, C]."""
  logits = np.asarray(logits)
  return score(add_logits(empty(logits.shape[0], logits.shape[1], num_splits), logits, 0))
