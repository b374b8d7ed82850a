"""FID reference statistics (computed once, cached, reused, refused when they do not fit), the VGG16 feature
space that gives any RGB folder finite labelled metrics, and the validation of the evaluation fields."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from vqddm_jax import config_schema, main, stages
from vqddm_jax.errors import ConfigError, MismatchError
from vqddm_jax.evaluation import feature_net, protocol, reference_stats
from vqddm_jax.evaluation import report as report_lib
from vqddm_jax.workdir import Workdir


def _rgb_folder(root, *, train: int = 10, test: int = 4, size: int = 32) -> None:
  rng = np.random.default_rng(0)
  for split, n in (("train", train), ("test", test)):
    os.makedirs(root / split)
    for i in range(n):
      # Smooth colour blobs rather than white noise, so the VGG16 features are not all alike.
      base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
      Image.fromarray(base).resize((size, size), Image.BILINEAR).save(root / split / f"{i:02d}.png")


def _folder_config(root, image_size: int = 32):
  config = config_schema.base_config()
  config.data.update(source="image_folder", image_folder=str(root), channels=3, image_size=image_size,
                     resize="center_crop", shuffle_buffer=1, prefetch=1)
  return config


def _counting_net(calls: list, fingerprint: str = "0" * 64) -> feature_net.FeatureNet:
  def apply(images):
    calls.append(len(images))
    return np.concatenate([images.mean((1, 2)), images.std((1, 2))], axis=1).astype(np.float32), None
  return feature_net.FeatureNet("fake", "FAKE", "per-channel mean and std", fingerprint, 6, apply)


def test_reference_stats_are_computed_once_cached_and_reused(tmp_path):
  _rgb_folder(tmp_path / "images")
  config, workdir, calls = _folder_config(tmp_path / "images"), Workdir(tmp_path / "w"), []
  cache = workdir.reference_stats("fake")
  first = reference_stats.load_or_compute(config.data, _counting_net(calls), cache=cache, batch_size=4)
  assert sum(calls) == 10 and cache.exists()
  assert first.count == 10 and first.record["split"] == "train" and first.record["image_size"] == 32
  calls.clear()
  again = reference_stats.load_or_compute(config.data, _counting_net(calls), cache=cache)
  assert calls == []  # Read from the cache: no feature pass.
  np.testing.assert_array_equal(again.mu, first.mu)
  np.testing.assert_array_equal(again.sigma, first.sigma)
  # The same statistics as NumPy on all training images at once.
  images = np.concatenate(list(reference_stats.split_batches(config.data, "train", 8)))
  feats = _counting_net([]).features(images).astype(np.float64)
  np.testing.assert_allclose(first.mu, feats.mean(0), rtol=1e-6)
  np.testing.assert_allclose(first.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
  # Reusable from another run by path; refused when the run differs.
  assert reference_stats.load_or_compute(config.data, _counting_net(calls), cache=tmp_path / "x.npz",
                                         given=str(cache)).count == 10 and calls == []
  other = _folder_config(tmp_path / "images", image_size=16)
  with pytest.raises(MismatchError, match=r"reference_stats_fake\.npz.*image_size: 32 in the file, 16 in this "
                     r"run.*remove that file"):
    reference_stats.load_or_compute(other.data, _counting_net(calls), cache=cache)
  with pytest.raises(ConfigError, match=r"config\.eval\.reference_stats = .*feature_weights"):
    reference_stats.load_or_compute(config.data, _counting_net(calls, "1" * 64), cache=tmp_path / "x.npz",
                                    given=str(cache))
  assert calls == []


def test_rgb_folder_without_inception_weights_gets_finite_vgg16_metrics(tmp_path):
  _rgb_folder(tmp_path / "images")
  config, workdir = _folder_config(tmp_path / "images"), Workdir(tmp_path / "w")
  net, facts = protocol.feature_network(config, workdir)
  assert net.key == "vgg16" and "FD_VGG16" in facts["note"]
  assert net.metric_names() == {"fd": "FD_VGG16", "kid": "KID_VGG16", "precision": "precision_VGG16",
                                "recall": "recall_VGG16"}
  ref = protocol.reference_statistics(config, workdir, net)
  assert ref.count == 10 and ref.mu.shape == (512,) and np.isfinite(ref.sigma).all()
  assert workdir.reference_stats("vgg16").exists()
  scorer = protocol.Scorer(net, ref, protocol.real_features(config, net, 4), seed=0)
  fake = np.random.default_rng(1).uniform(-1, 1, (9, 32, 32, 3)).astype(np.float32)
  row, first = scorer.row(protocol.array_chunks(fake, 4), 9)
  assert row["n"] == 9 and first.shape == (9, 32, 32, 3)
  assert all(np.isfinite(row[k]) for k in ("fd", "kid", "kid_std", "precision", "recall"))
  assert row["fd"] > 0
  # The stage of --mode=reference_stats finds the statistics evaluate cached and does nothing.
  assert stages.run_stage(stages.BY_NAME["reference_stats"], config, workdir).skipped
  how = protocol.protocol_facts(config, net, ref, 4, workdir)
  report = {"protocol": how, "note": facts["note"], "quality": {"samples (20 steps)": row},
            "steps_vs_quality": [dict(row, steps=20, fraction="T", seconds=1.0)], "samples_grid": "s.png"}
  md = report_lib.markdown(report)
  assert "| images | FD_VGG16 | KID_VGG16 | precision_VGG16 | recall_VGG16 | n |" in md
  assert "nan" not in md.lower()


def test_reference_stats_mode_is_registered_outside_the_pipeline():
  assert "reference_stats" in stages.BY_NAME and "reference_stats" in main.MODES
  assert "reference_stats" not in [s.name for s in stages.PIPELINE]


def test_evaluation_fields_are_validated_by_name(tmp_path):
  config = load_config("configs/mnist.py:tiny")
  config.eval.reference_stats = str(tmp_path / "missing.npz")
  with pytest.raises(ConfigError, match=r"config\.eval\.reference_stats = .*missing\.npz.*--mode=reference_stats"):
    config_schema.validate_config(config)
  (tmp_path / "stats.txt").write_text("x")
  config.eval.reference_stats = str(tmp_path / "stats.txt")
  with pytest.raises(ConfigError, match=r"config\.eval\.reference_stats = .*an existing \.npz"):
    config_schema.validate_config(config)
  (tmp_path / "stats.npz").write_bytes(b"")
  config.eval.reference_stats = str(tmp_path / "stats.npz")
  config_schema.validate_config(config)
  config.eval.chunk_size = 0
  with pytest.raises(ConfigError, match=r"config\.eval\.chunk_size = 0"):
    config_schema.validate_config(config)
