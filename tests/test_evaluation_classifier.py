"""The feature classifier: training, features, caching, the labelled MNIST-5k split."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from flax import serialization

from vqddm_jax.evaluation import classifier

TINY = dict(num_steps=40, batch_size=32, widths=(4, 8, 8), num_classes=4, learning_rate=1e-2)


def _quadrant_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images f32[n, 16, 16, 1] in [-1, 1] with a bright 6×6 blob in the quadrant given by the label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n).astype(np.int32)
  images = np.full((n, 16, 16, 1), -1.0, np.float32) + rng.uniform(0, 0.3, (n, 16, 16, 1)).astype(np.float32)
  for i, c in enumerate(labels):
    top, left = 8 * (c // 2) + rng.integers(0, 3), 8 * (c % 2) + rng.integers(0, 3)
    images[i, top:top + 6, left:left + 6] = 1.0
  return images, labels


@pytest.fixture(scope="module")
def trained():
  x, y = _quadrant_digits(96, seed=0)
  params, meta = classifier.train_classifier(x, y, seed=0, **TINY)
  return params, meta, x, y


def test_learns_a_separable_task(trained):
  params, meta, _, _ = trained
  x_test, y_test = _quadrant_digits(64, seed=1)
  assert classifier.accuracy(params, x_test, y_test) == 1.0
  assert meta["final_loss"] < 0.2 and meta["num_steps"] == 40 and meta["widths"] == [4, 8, 8]


def test_training_is_deterministic(trained):
  params, _, x, y = trained
  again, _ = classifier.train_classifier(x, y, seed=0, **TINY)  # Same static setting: no recompilation.
  np.testing.assert_array_equal(again["Dense_4"]["kernel"], params["Dense_4"]["kernel"])
  other, _ = classifier.train_classifier(x, y, seed=1, **TINY)
  assert not np.array_equal(other["Dense_4"]["kernel"], params["Dense_4"]["kernel"])


def test_features_shape_and_batching(trained):
  params, _, x, _ = trained
  feats = classifier.classifier_features(params, x[:37], batch_size=16)
  assert feats.shape == (37, classifier.FEATURES) and feats.dtype == np.float32
  assert feats.min() >= 0  # Post-ReLU.
  np.testing.assert_allclose(classifier.classifier_features(params, x[:37], batch_size=500), feats,
                             rtol=1e-6, atol=1e-6)


def test_rejects_bad_inputs(trained):
  params, _, x, y = trained
  with pytest.raises(ValueError, match="labels must be"):
    classifier.accuracy(params, x, y[:5])
  with pytest.raises(ValueError, match="images must be"):
    classifier.classifier_features(params, x[..., 0])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
    classifier.train_classifier(x, y + 4, seed=0, **TINY)


def test_load_or_train_caches_and_invalidates(tmp_path, trained):
  params, _, x, y = trained
  cache = str(tmp_path / "eval" / "classifier.msgpack")
  first, meta1 = classifier.load_or_train(cache, x, y, seed=0, **TINY)
  assert not meta1["cached"] and os.path.exists(cache)
  np.testing.assert_array_equal(first["Dense_4"]["kernel"], params["Dense_4"]["kernel"])
  second, meta2 = classifier.load_or_train(cache, x, y, seed=0, **TINY)
  assert meta2["cached"] and meta2["cache_key"] == meta1["cache_key"]
  np.testing.assert_array_equal(second["Dense_4"]["kernel"], params["Dense_4"]["kernel"])
  assert classifier.accuracy(second, x, y) == classifier.accuracy(params, x, y)
  # Other labels (or settings) must not reuse the cache.
  _, meta3 = classifier.load_or_train(cache, x, (y + 1) % 4, seed=0, **TINY)
  assert not meta3["cached"] and meta3["cache_key"] != meta1["cache_key"]


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, trained, caplog):
  params, _, x, y = trained
  cache = tmp_path / "eval" / "classifier.msgpack"
  classifier.load_or_train(str(cache), x, y, seed=0, **TINY)
  good = cache.read_bytes()
  corrupt = {"truncated": good[:len(good) // 2], "garbage": b"\x00garbage" * 50, "empty": b"",
             "other layout": serialization.msgpack_serialize({"meta": "[1, 2]"})}
  for what, blob in corrupt.items():
    cache.write_bytes(blob)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      rebuilt, meta = classifier.load_or_train(str(cache), x, y, seed=0, **TINY)
    assert not meta["cached"], what
    assert any(f"Classifier cache {cache} cannot be read" in r.getMessage() and "retraining" in r.getMessage()
               for r in caplog.records), what
    np.testing.assert_array_equal(rebuilt["Dense_4"]["kernel"], params["Dense_4"]["kernel"])
    # Rewritten whole: the next call loads it.
    again, meta = classifier.load_or_train(str(cache), x, y, seed=0, **TINY)
    assert meta["cached"] and classifier.accuracy(again, x, y) == classifier.accuracy(params, x, y), what


@pytest.fixture(scope="module")
def mnist_config():
  from conftest import load_config, _session_data_dir  # pylint: disable=g-import-not-at-top
  from vqddm_jax import data  # pylint: disable=g-import-not-at-top
  config = load_config("configs/mnist.py")
  config.data.data_dir = str(_session_data_dir())
  data.prepare(config.data)
  return config


def test_labelled_split_is_the_heldout_mnist5k(mnist_config):
  images, labels = classifier.labelled_split(mnist_config.data, mnist_config.data.eval_split,
                                             batch_size=128)  # 500 is not a multiple: padding dropped.
  assert images.shape == (500, 32, 32, 1) and images.dtype == np.float32
  assert labels.dtype == np.int32 and np.bincount(labels).tolist() == [50] * 10
  assert images.min() == -1.0 and images.max() == 1.0
  assert np.all(images[:, :2] == -1.0)  # 28×28 digits padded with background to 32×32.


@pytest.mark.skipif(not os.environ.get("VQDDM_SLOW_TESTS"),
                    reason="~1 min of CPU: set VQDDM_SLOW_TESTS=1 to train the default classifier")
def test_default_classifier_reaches_97_percent(mnist_config):
  train = classifier.labelled_split(mnist_config.data, mnist_config.data.train_split)
  test = classifier.labelled_split(mnist_config.data, mnist_config.data.eval_split)
  params, meta = classifier.train_classifier(*train, seed=0)
  acc = classifier.accuracy(params, *test)
  print(f"held-out accuracy {acc:.4f} after {meta['num_steps']} steps, {meta['train_seconds']:.1f} s")
  assert acc >= 0.97
