"""Quality metrics of an image set that arrives in chunks: memory does not grow with the set's size.

A set of N images (10k-50k samples, say) is passed as chunks of consecutive images; each process of a
multi-host job gets the chunks of its own share (`parallel.host_slice`). Per chunk the feature network runs
once, and what each metric needs is kept:
- FD: the float64 mean and scatter of the features (`moments.py`), against reference statistics;
- KID and precision/recall: they need the feature vectors themselves, so only the first `keep` of them
  (10,000 by default: 40 MB for Inception's 2048-d features) are kept, and compared with a real feature set;
- IS: per-part sums of class probabilities (`inception_score.py`) when the network gives logits.
At the end the processes' partial results are merged exactly, so every process holds the same row.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from vqddm_jax import parallel
from vqddm_jax.evaluation import feature_metrics
from vqddm_jax.evaluation import inception_score as is_lib
from vqddm_jax.evaluation import moments as moments_lib
from vqddm_jax.evaluation.feature_net import FeatureNet

MAX_KEPT = 10_000  # Feature rows kept for KID and precision/recall (their cost grows with the square of it).
GRID_IMAGES = 64  # Images of the set kept for a picture (first ones, on process 0).


@dataclasses.dataclass(frozen=True)
class StreamedSet:
  """What was kept of an image set (see the module doc); the same on every process after `stream`.

  Attributes:
    moments: mean and scatter of all N feature rows.
    kept: f32[min(N, keep), F], the features of the first images of the set.
    scores: the Inception Score sums, or None when the network gives no logits.
    first_images: f32[<= GRID_IMAGES, H, W, C], the first images (this process's, for pictures).
  """
  moments: moments_lib.Moments
  kept: np.ndarray
  scores: is_lib.ScoreSums | None
  first_images: np.ndarray


def merge_moments(m: moments_lib.Moments) -> moments_lib.Moments:
  """The moments of every process's rows, merged in process order (the same on every process)."""
  if parallel.process_count() == 1:
    return m
  counts = parallel.gather_processes(np.array(m.count, np.int64))
  total = moments_lib.empty(m.dim)
  means = parallel.gather_processes(np.asarray(m.mean, np.float64))
  scatters = parallel.gather_processes(np.asarray(m.scatter, np.float64))
  for n, mean, scatter in zip(counts, means, scatters):
    total = moments_lib.merge(total, moments_lib.Moments(int(n), mean, scatter))
  return total


def _merge_scores(s: is_lib.ScoreSums) -> is_lib.ScoreSums:
  if parallel.process_count() == 1:
    return s
  return is_lib.ScoreSums(s.total, parallel.gather_processes(s.counts).sum(0),
                          *parallel.sum_over_processes((s.prob_sums, s.neg_entropy_sums)))


def stream(net: FeatureNet, chunks: Iterable[tuple[int, np.ndarray]], total: int, *,
           keep: int = MAX_KEPT) -> StreamedSet:
  """Runs `net` over a set of `total` images given in chunks and keeps what the metrics need.

  Args:
    net: the feature network.
    chunks: (start, images f32[n, H, W, C] in [-1, 1]) for this process's images start .. start + n − 1 of
      the set (every image of the set on exactly one process; see `parallel.host_slice`).
    total: N, the size of the whole set.
    keep: feature rows kept for KID and precision/recall (the set's first ones).
  """
  moments, kept, first = moments_lib.empty(net.dim), [], []
  scores = None
  for start, images in chunks:
    feats, logits = net.apply(np.asarray(images, np.float32))
    moments = moments_lib.add_chunk(moments, feats)
    if start < keep:
      kept.append(np.asarray(feats[:keep - start], np.float32))
    if start < GRID_IMAGES:
      first.append(np.asarray(images[:GRID_IMAGES - start], np.float32))
    if logits is not None:
      scores = is_lib.add_logits(scores or is_lib.empty(total, logits.shape[1]), logits, start)
  kept_rows = np.concatenate(kept) if kept else np.zeros((0, net.dim), np.float32)
  if net.has_scores:
    # A process without images still takes part in the merge, with empty sums of the right shape.
    scores = _merge_scores(scores or is_lib.empty(total, net.num_classes))
  return StreamedSet(merge_moments(moments), parallel.gather_rows(kept_rows),
                     scores, np.concatenate(first) if first else np.zeros((0,), np.float32))


def quality_row(streamed: StreamedSet, *, ref_mu: np.ndarray, ref_sigma: np.ndarray, real: np.ndarray,
                seed: int) -> dict[str, float]:
  """FD against the reference statistics; KID and precision/recall of the kept features against `real`.

  Args:
    streamed: the set, from `stream`.
    ref_mu, ref_sigma: f64[F], f64[F, F], the reference statistics.
    real: f[M, F] real features for KID and precision/recall (M >= 2).
    seed: seed of KID's subsets.

  Returns:
    {'fd', 'kid', 'kid_std', 'precision', 'recall', 'precision_se', 'recall_se', 'n'} (+ 'is', 'is_std'
    with scores; the `_se` are `feature_metrics.fraction_stderr`); every value finite.
  """
  m = streamed.moments
  fd = feature_metrics.frechet_distance(ref_mu, ref_sigma, m.mean, m.covariance())
  fake = streamed.kept
  # Subsets of half the smaller set (at most 1000, as Bińkowski et al.), so that the spread is informative.
  subset = max(2, min(len(real), len(fake), 2000) // 2)
  kid_mean, kid_std = feature_metrics.kid(real, fake, seed=seed, subset_size=subset)
  # k = 3 (Kynkäänniemi et al.); fewer neighbours only when a set is too small for 3.
  precision, recall = feature_metrics.precision_recall(real, fake, k=max(1, min(3, len(real) - 1, len(fake) - 1)))
  row = {"fd": fd, "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
         "precision_se": feature_metrics.fraction_stderr(precision, len(fake)),
         "recall_se": feature_metrics.fraction_stderr(recall, len(real)), "n": int(m.count)}
  if streamed.scores is not None:
    row["is"], row["is_std"] = is_lib.score(streamed.scores)
  return row
