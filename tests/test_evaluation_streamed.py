"""Streamed evaluation: float64 moments equal NumPy's on the whole set whatever the chunking, the streamed
Inception Score equals the one-shot one, a set given in chunks keeps what each metric needs, and the
Inception weights file may carry the classifier layer that IS needs."""
from __future__ import annotations

import numpy as np
import pytest

from vqddm_jax.evaluation import (feature_metrics, feature_net, inception, inception_layout,
                                  inception_weights)
from vqddm_jax.evaluation import inception_score as is_lib
from vqddm_jax.evaluation import moments, streamed


def _features(n=203, f=6, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  # A large common offset: naive Σx, Σxxᵀ accumulation would lose digits here; the pairwise update must not.
  return (rng.standard_normal((n, f)) @ rng.standard_normal((f, f)) + 1e4).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 7, 64, 203])
def test_streamed_moments_equal_numpy_on_all_features(chunk):
  x = _features()
  m = moments.accumulate((x[i:i + chunk] for i in range(0, len(x), chunk)), x.shape[1])
  x64 = x.astype(np.float64)
  assert m.count == len(x)
  np.testing.assert_allclose(m.mean, x64.mean(0), rtol=1e-13)
  np.testing.assert_allclose(m.covariance(), np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)
  mu, sigma = feature_metrics.feature_statistics(x)
  assert feature_metrics.frechet_distance(mu, sigma, m.mean, m.covariance()) < 1e-6


def test_moments_merge_is_order_free_and_empty_is_neutral():
  x = _features(50)
  a, b = moments.of_chunk(x[:13]), moments.of_chunk(x[13:])
  ab, ba = moments.merge(a, b), moments.merge(b, a)
  np.testing.assert_allclose(ab.scatter, ba.scatter, rtol=1e-12)
  assert moments.merge(moments.empty(6), a) is a and moments.merge(a, moments.empty(6)) is a
  with pytest.raises(ValueError, match="at least 2 rows"):
    moments.of_chunk(x[:1]).covariance()


def test_streamed_inception_score_equals_one_shot_and_known_values():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((57, 11)) * 3
  sums = is_lib.empty(57, 11)
  for start in range(0, 57, 8):
    sums = is_lib.add_logits(sums, logits[start:start + 8], start)
  assert is_lib.score(sums) == pytest.approx(is_lib.inception_score(logits), rel=1e-12)
  # Reference from the definition: per part of N // 10, exp(mean KL(p(y|x) || mean p)).
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  parts = [p[i * 57 // 10:(i + 1) * 57 // 10] for i in range(10)]
  scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in parts]
  assert is_lib.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
  # Confident and evenly spread over C classes: IS = C; the same prediction everywhere: IS = 1.
  one_hot = np.eye(5)[np.arange(50) % 5] * 100
  assert is_lib.inception_score(one_hot, num_splits=2)[0] == pytest.approx(5.0, rel=1e-6)
  assert is_lib.inception_score(np.zeros((20, 5)))[0] == pytest.approx(1.0)


def _fake_net(calls: list, num_classes: int = 0) -> feature_net.FeatureNet:
  """Features: per-channel mean and std of each image (6-d); logits from the same; counts its calls."""
  def apply(images):
    calls.append(len(images))
    f = np.concatenate([images.mean((1, 2)), images.std((1, 2))], axis=1).astype(np.float32)
    return f, (np.tile(f, (1, 2))[:, :num_classes] if num_classes else None)
  return feature_net.FeatureNet("fake", "FAKE", "fake features", "0" * 64, 6, apply, num_classes=num_classes)


def test_stream_keeps_moments_of_all_and_features_of_the_first():
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (90, 8, 8, 3)).astype(np.float32)
  calls = []
  net = _fake_net(calls, num_classes=4)
  s = streamed.stream(net, ((i, images[i:i + 16]) for i in range(0, 90, 16)), 90, keep=40)
  assert calls == [16] * 5 + [10]
  feats = net.features(images)
  np.testing.assert_allclose(s.moments.mean, feats.astype(np.float64).mean(0), rtol=1e-6)
  np.testing.assert_array_equal(s.kept, feats[:40])
  np.testing.assert_array_equal(s.first_images, images[:streamed.GRID_IMAGES])
  assert is_lib.score(s.scores) == pytest.approx(is_lib.inception_score(np.tile(feats, (1, 2))[:, :4]))
  mu, sigma = feature_metrics.feature_statistics(feats)
  row = streamed.quality_row(s, ref_mu=mu, ref_sigma=sigma, real=feats[50:], seed=0)
  assert row["n"] == 90 and row["fd"] < 1e-6 and set(row) >= {"kid", "kid_std", "precision", "recall", "is"}
  assert all(np.isfinite(v) for v in row.values())


def test_metric_names_say_which_feature_space():
  assert _fake_net([]).metric_names() == {"fd": "FD_FAKE", "kid": "KID_FAKE", "precision": "precision_FAKE",
                                          "recall": "recall_FAKE"}
  inception_like = feature_net.FeatureNet("inception", "", "", "", 2048, lambda x: (x, None), 1008)
  assert inception_like.metric_names()["fd"] == "FID" and inception_like.has_scores


def test_inception_weights_may_carry_the_classifier_layer(tmp_path):
  # The layout check on a small stand-in for the 470 trunk arrays (the real ones cost seconds to write).
  rng = np.random.default_rng(0)
  trunk = {"params/Conv2d_1a_3x3/conv/kernel": (3, 3, 3, 2), "batch_stats/Conv2d_1a_3x3/bn/mean": (2,)}
  flat = {k: rng.standard_normal(s, dtype=np.float32) for k, s in trunk.items()}
  fc = {k: rng.standard_normal(s, dtype=np.float32) for k, s in inception_layout.FC_SHAPES.items()}

  def load(name, arrays):
    path = inception_layout.save_npz(inception_layout.unflatten(arrays), str(tmp_path / name))
    return inception_layout.load_npz(path, trunk, inception_layout.FC_SHAPES)

  assert not inception.has_classifier(load("plain.npz", flat))
  variables = load("fc.npz", {**flat, **fc})
  assert inception.has_classifier(variables)
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], fc["params/fc/kernel"])
  # Half a classifier is a broken file, not an optional part.
  with pytest.raises(ValueError, match="1 missing"):
    load("half.npz", {**flat, "params/fc/kernel": fc["params/fc/kernel"]})
  # The converter keeps pytorch-fid's fc layer (transposed to [2048, 1008]).
  converted = inception_weights.convert_state_dict(
      {"fc.weight": np.arange(1008 * 2048, dtype=np.float32).reshape(1008, 2048),
       "fc.bias": np.zeros(1008, np.float32)})
  assert converted["params/fc/kernel"].shape == (2048, 1008) and converted["params/fc/kernel"][1, 0] == 1.0
