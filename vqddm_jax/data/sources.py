"""Data sources behind one small interface: encoded records per host, and a decode function.

A source yields *encoded* records (TFDS: serialized image bytes via `SkipDecoding`; folders: file paths), so
that shuffling, skipping on resume and picking each host's examples never pay for decoding; `pipeline.py`
decodes and preprocesses after those steps. The training stream is the whole split in an order that depends on
the seeds only, the same on every host; each host then decodes only its own examples of every global batch.

Interface (duck-typed):
  num_examples(split) -> int                      examples in the whole split, all hosts together
  train_records(split, *, seeds, shuffle_buffer) -> tf.data.Dataset
  eval_records(split, *, process_index, process_count) -> tf.data.Dataset   (fixed order, no shuffle)
  decode(record) -> {'image': u8[h, w, C], 'ok': bool[], 'label': i32[] (only with labels)}
  class_names -> list[str] | None                 the label's class names in index order, None if unlabelled
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vqddm_jax import parallel
from vqddm_jax.data import folder, mnist5k
from vqddm_jax.data.tf_host import tf
from vqddm_jax.errors import ConfigError, MissingInputError


class DataNotPreparedError(MissingInputError):
  """A TFDS data set is not prepared under the configured data_dir (this code never downloads)."""


class TfdsSource:
  """A prepared TFDS data set (including MNIST-5k), read with `download=False` semantics."""

  def __init__(self, cfg: Any, *, with_labels: bool = False):
    self._cfg = cfg
    if cfg.source == "mnist5k":
      self.name = mnist5k.NAME
      self.builder = mnist5k.builder(cfg.data_dir)
    else:
      self.name = cfg.tfds_name
      try:
        self.builder = tfds.builder(cfg.tfds_name, data_dir=_data_dir(cfg))
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ConfigError(f"config.data.tfds_name = {cfg.tfds_name!r} is not allowed: TFDS knows no such data "
                         f"set ({str(e).splitlines()[0]})") from None
    features = self.builder.info.features
    if cfg.image_key not in features:
      raise ConfigError(f"config.data.image_key = {cfg.image_key!r} is not allowed: {self.name} has features "
                       f"{sorted(features.keys())}")
    self._image = features[cfg.image_key]
    c = self._image.shape[-1] if self._image.shape else None
    if c is not None and c != cfg.channels:
      raise ConfigError(f"config.data.channels = {cfg.channels!r} is not allowed: {self.name} images have "
                       f"{c} channel(s)")
    self._with_labels = with_labels
    if with_labels and "label" not in features:
      raise ValueError(f"labels were requested but {self.name} has no 'label' feature")
    label = features["label"] if "label" in features else None
    self._class_names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None

  @property
  def class_names(self) -> list[str] | None:
    """The names of the 'label' feature's classes in label order (a ClassLabel), else None."""
    return list(self._class_names) if self._class_names is not None else None

  def not_prepared_message(self) -> str:
    data_dir = _data_dir(self._cfg) or "the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    cmd = f"tfds build {self.name}"
    if self._cfg.data_dir:
      cmd += f" --data_dir={self._cfg.data_dir}"
    manual = getattr(self.builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if self._cfg.manual_dir or manual:
      cmd += f" --manual_dir={self._cfg.manual_dir or '<folder with the downloaded files>'}"
    msg = (f"TFDS data set '{self.name}' (version {self.builder.version}) is not prepared under data_dir "
           f"{data_dir} (looked in {self.builder.data_dir}). This program never downloads "
           f"(download=False). Prepare it once, then rerun:\n  {cmd}\n"
           "(set config.data.data_dir / config.data.manual_dir to the folders you use)")
    if manual:
      msg += f"\nManual download instructions for {self.name}:\n{manual.strip()}"
    return msg

  def require_prepared(self) -> None:
    if not self.builder.is_prepared():
      raise DataNotPreparedError(self.not_prepared_message())

  def num_examples(self, split: str) -> int:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
      if not self.builder.is_prepared():
        raise DataNotPreparedError(self.not_prepared_message()) from None
      raise ConfigError(f"split {split!r} is not in {self.name} (splits: "
                       f"{sorted(self.builder.info.splits.keys())}): {e}") from None

  def _as_dataset(self, split: str, *, shuffle_seed: int | None) -> tf.data.Dataset:
    keys = {self._cfg.image_key: True, **({"label": True} if self._with_labels else {})}
    decoders = tfds.decode.PartialDecoding(keys, decoders={self._cfg.image_key: tfds.decode.SkipDecoding()})
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False, skip_prefetch=True)
    try:
      return self.builder.as_dataset(split=split, decoders=decoders, shuffle_files=shuffle_seed is not None,
                                     read_config=read_config)
    except AssertionError as e:  # TFDS's way of saying "no data under data_dir".
      raise DataNotPreparedError(self.not_prepared_message()) from e

  def train_records(self, split: str, *, seeds: tuple[int, int], shuffle_buffer: int) -> tf.data.Dataset:
    # The whole split (as TFDS's one-share-of-one split, which reads exactly what the plain split reads).
    whole = tfds.split_for_jax_process(split, process_index=0, process_count=1, drop_remainder=True)
    ds = self._as_dataset(whole, shuffle_seed=seeds[0])
    # Records are still encoded here, so a large buffer costs bytes, not decoded pixels.
    return ds.shuffle(shuffle_buffer, seed=seeds[1], reshuffle_each_iteration=False)

  def eval_records(self, split: str, *, process_index: int, process_count: int) -> tf.data.Dataset:
    host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count, drop_remainder=False)
    return self._as_dataset(host_split, shuffle_seed=None)

  def decode(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {"image": self._image.decode_example(record[self._cfg.image_key]), "ok": tf.constant(True)}
    if self._with_labels:
      out["label"] = tf.cast(record["label"], tf.int32)
    return out


class FolderSource:
  """A folder of PNG/JPEG files (see `folder.py` for splits, class folders and bad-file handling).

  Records are `{'path': tf.string}`, plus `'label': tf.int32` with labels: the labels are computed in Python
  from the listing and sliced with the paths, so the order and the host shares are those of the paths alone.
  """

  def __init__(self, cfg: Any, *, with_labels: bool = False):
    class_folders = bool(cfg.get("class_folders", False))  # Absent in configs stored by older code.
    if with_labels and not class_folders:
      raise ConfigError("labels were requested but config.data.class_folders = False, so this image folder "
                        f"({cfg.image_folder}) has none: set config.data.class_folders = True to label each "
                        "image by its class sub-folder (root/<class>/... or root/<split>/<class>/...)")
    self.name = cfg.image_folder
    self._channels = cfg.channels
    self._with_labels = with_labels
    self._listing = folder.list_folder(cfg.image_folder, train_split=cfg.train_split,
                                       eval_split=cfg.eval_split, channels=cfg.channels,
                                       holdout_fraction=cfg.holdout_fraction)
    self._classes = (folder.class_folders(self._listing, train_split=cfg.train_split) if class_folders
                     else None)

  @property
  def class_names(self) -> list[str] | None:
    """The class folder names in label order (config.data.class_folders), else None."""
    return list(self._classes.names) if self._classes else None

  def _files(self, split: str) -> list[str]:
    if split not in self._listing.splits:
      raise ConfigError(f"split {split!r} is not one of the image folder's splits "
                       f"{sorted(self._listing.splits)} (config.data.train_split / eval_split)")
    return self._listing.splits[split]

  def num_examples(self, split: str) -> int:
    return len(self._files(split))

  def train_records(self, split: str, *, seeds: tuple[int, int], shuffle_buffer: int) -> tf.data.Dataset:
    del shuffle_buffer  # A full permutation of the file list is a perfect shuffle; no buffer needed.
    files = self._files(split)
    order = np.random.default_rng(list(seeds)).permutation(len(files))
    return self._records(split, order)

  def eval_records(self, split: str, *, process_index: int, process_count: int) -> tf.data.Dataset:
    files = self._files(split)
    mine = parallel.host_slice(len(files), process_index=process_index, process_count=process_count,
                               remainder="first")  # as TFDS splits an eval split
    return self._records(split, np.arange(len(files))[mine])

  def _records(self, split: str, indices: np.ndarray) -> tf.data.Dataset:
    """The records of the listed files `indices` of `split`, in that order."""
    files = self._files(split)
    records = {"path": tf.constant([files[i] for i in indices], tf.string)}
    if self._with_labels:
      records["label"] = tf.constant(self._classes.labels[split][indices], tf.int32)
    return tf.data.Dataset.from_tensor_slices(records)

  def decode(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image, ok = tf.numpy_function(lambda p: folder.decode_file(p, self._channels), [record["path"]],
                                  (tf.uint8, tf.bool), stateful=False)
    image.set_shape((None, None, self._channels))
    ok.set_shape(())
    out = {"image": image, "ok": ok}
    if self._with_labels:
      out["label"] = record["label"]
    return out


def _data_dir(cfg: Any) -> str | None:
  return os.path.expanduser(cfg.data_dir) if cfg.data_dir else None


def make_source(cfg: Any, *, with_labels: bool = False) -> TfdsSource | FolderSource:
  """The source `cfg.source` names ('mnist5k' and 'tfds' share the TFDS reader)."""
  if cfg.source in ("mnist5k", "tfds"):
    return TfdsSource(cfg, with_labels=with_labels)
  if cfg.source == "image_folder":
    return FolderSource(cfg, with_labels=with_labels)
  raise ConfigError(f"config.data.source = {cfg.source!r} is not allowed: 'mnist5k', 'tfds' or 'image_folder'")
