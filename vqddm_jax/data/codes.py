"""Code maps for stage 2: stored once as a real TFDS data set in the work directory, read back into memory.

Code maps are small (a 16×16 int32 map is 1 KiB: CelebA-HQ's 30k maps are 30 MiB), so stage 2 reads a split
into host memory once (every host the whole split) and draws global batches from per-epoch permutations seeded
by (seed, epoch); each host takes its own share of every global batch. That makes the stream exactly resumable
from `{'epoch', 'batch'}` at no cost, and the same whatever the number of hosts. Stores are read and written
through `etils.epath`, so they live on `gs://` as well as on local disk.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vqddm_jax import files as files_lib
from vqddm_jax import parallel
from vqddm_jax.data.tf_host import tf
from vqddm_jax.errors import ConfigError, MismatchError, MissingInputError

FEATURE = "codes"
LABEL = "label"  # Each map's class label, stored beside it when the images' source has labels.
META_FILE = "meta.json"


def read_meta(directory: epath.Path) -> dict | None:
  """What the store under `directory` was made from, or None when there is no complete store."""
  return files_lib.read_json(directory / META_FILE)


def write_codes(directory: epath.Path, splits: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                labels: Mapping[str, np.ndarray] | None = None, class_names: list[str] | None = None) -> None:
  """Stores `{split: i32[N, h, w]}` as a TFDS data set (order kept), then `meta.json` to mark it complete.

  Split names may carry TFDS slicing (`train[:29000]`); they are stored under sanitised names recorded in
  the meta file. `labels` (`{split: i32[N]}`, the images' classes) are stored as a second feature, and
  `class_names` (class index -> name, e.g. an image folder's class sub-folders) in the meta file.
  """
  shape = next(iter(splits.values())).shape[1:]
  spec = {FEATURE: tfds.features.Tensor(shape=tuple(shape), dtype=np.int32)}
  if labels is not None:
    spec[LABEL] = tfds.features.Tensor(shape=(), dtype=np.int32)
  names = {split: _safe_name(split) for split in splits}
  datasets = {names[s]: tf.data.Dataset.from_tensor_slices(
      {FEATURE: np.asarray(c, np.int32), **({LABEL: np.asarray(labels[s], np.int32)} if labels else {})})
      for s, c in splits.items()}
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name="codes", version="1.0.0", features=tfds.features.FeaturesDict(spec), split_datasets=datasets,
      data_dir=str(directory / "tfds"), disable_shuffling=True)
  full = dict(meta, split_names=names, builder_dir=str(epath.Path(builder.data_dir).relative_to(directory)),
              counts={s: int(len(c)) for s, c in splits.items()}, labels=labels is not None)
  if class_names is not None:
    full["class_names"] = list(class_names)
  files_lib.write_json(directory / META_FILE, full)  # Written last: its presence marks a complete store.


def require_meta(directory: epath.Path) -> dict:
  """`read_meta`, or MissingInputError when the encode stage has not stored code maps there yet."""
  meta = read_meta(directory)
  if meta is None:
    raise MissingInputError(f"no code maps under {directory}: run --mode=encode first")
  return meta


def _read_split(directory: epath.Path, split: str, meta: dict) -> dict[str, np.ndarray]:
  if split not in meta["split_names"]:
    raise ConfigError(f"split {split!r} is not among the stored code splits {sorted(meta['split_names'])} "
                      "(config.data.train_split / eval_split changed since encoding?)")
  builder = tfds.builder_from_directory(str(directory / meta["builder_dir"]))
  ds = builder.as_dataset(split=meta["split_names"][split], shuffle_files=False)
  parts = list(tfds.as_numpy(ds.batch(4096)))
  return {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in builder.info.features}


def _out_of_range(values: np.ndarray, n: int) -> int | None:
  """A value of `values` outside [0, n) (the smallest if one is negative, else the largest), or None."""
  if values.size and (values.min() < 0 or values.max() >= n):
    return int(values.min()) if values.min() < 0 else int(values.max())
  return None


def _checked_codes(directory: epath.Path, split: str, meta: dict, codes: np.ndarray) -> np.ndarray:
  k = int(meta["codebook_size"])
  bad = _out_of_range(codes, k)
  if bad is not None:
    # A negative code would wrap to the last one in a gather and read the AR prior's start row; a code >= K
    # would make every step that draws its map non-finite. Neither is a code of this store's tokenizer.
    raise MismatchError(f"the code maps of split {split!r} under {directory} hold code {bad}, outside [0, {k}) "
                        f"(K = codebook_size in {directory / META_FILE}): the store is damaged; remove "
                        f"{directory} and rerun --mode=encode")
  return codes


def load_codes(directory: epath.Path, split: str) -> np.ndarray:
  """All code maps of `split` from the store under `directory`: `i32[N, h, w]`, in stored order."""
  meta = require_meta(directory)
  return _checked_codes(directory, split, meta, _read_split(directory, split, meta)[FEATURE])


def load_labelled_codes(directory: epath.Path, split: str,
                        num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
  """`load_codes` and the maps' class labels `i32[N]` (read together) for a prior over `num_classes` classes
  (`config.prior.num_classes`); (`load_codes`, None) for an unconditional one (0).

  Raises:
    MissingInputError: the store holds no labels (the images' source has none, or it was encoded before
      labels were stored).
    MismatchError: a label outside [0, num_classes), or the store's class list is not num_classes long.
  """
  if not num_classes:
    return load_codes(directory, split), None
  meta = require_meta(directory)
  if not meta.get("labels"):
    raise MissingInputError(
        f"the code store {directory} holds no class labels, which config.prior.num_classes = {num_classes} "
        "needs: the data source must have labels (MNIST-5k, a TFDS set with a 'label' feature, or an image "
        "folder with config.data.class_folders = True); if it has, the store predates labels: remove "
        f"{directory} and rerun --mode=encode")
  names = meta.get("class_names")
  if names is not None and len(names) != num_classes:
    raise MismatchError(f"config.prior.num_classes = {num_classes}, but the images have {len(names)} classes "
                        f"({', '.join(map(str, names[:12]))}{', ...' if len(names) > 12 else ''}; "
                        f"{directory / META_FILE}): set config.prior.num_classes = {len(names)}")
  arrays = _read_split(directory, split, meta)
  bad = _out_of_range(arrays[LABEL], num_classes)
  if bad is not None:
    raise MismatchError(f"split {split!r} under {directory} holds class label {bad}, outside [0, {num_classes}) "
                        f"(config.prior.num_classes = {num_classes}): set it to the images' class count")
  return _checked_codes(directory, split, meta, arrays[FEATURE]), arrays[LABEL]


def _safe_name(split: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in split).strip("_") or "split"


class CodeBatches:
  """Infinite shuffled batches `{'codes': i32[num_shards, per_shard, h, w]}` (+ `'label': i32[num_shards,
  per_shard]` when given labels) with an exact `.position`.

  Every host holds all `codes` and draws the same global batch of `per_shard * num_shards * process_count`
  maps per step; host p keeps the p-th slice (its devices' share, in device order). With `max_maps` = N > 0
  only the first N maps in store order are ever drawn (`config.prior_train.max_code_maps`; the authors'
  LSUN-Church prior saw the first 31k); every host cuts the same prefix before drawing, so the subset is
  the same on every host and independent of the host count.

  Args:
    codes: i32[N, h, w], the whole training split in store order (the same array on every host).
    per_shard, num_shards: maps per device and this host's device count.
    seed: seeds the per-epoch permutations (with the epoch number).
    position: `{'epoch', 'batch'}` to resume from; None starts at the beginning.
    process_index, process_count: this host's index and the number of hosts.
    max_maps: draw only from `codes[:max_maps]`; 0 (or more than N) draws from all maps.
    labels: i32[N], each map's class label (drawn with it), or None.
  """

  def __init__(self, codes: np.ndarray, *, per_shard: int, num_shards: int, seed: int,
               position: Mapping[str, int] | None = None, process_index: int = 0, process_count: int = 1,
               max_maps: int = 0, labels: np.ndarray | None = None):
    if max_maps < 0:
      raise ValueError(f"max_maps must be >= 0 (0 = all maps), got {max_maps}")
    self._codes = codes[:max_maps] if max_maps else codes
    self._labels = None if labels is None else (labels[:max_maps] if max_maps else labels)
    self._per_shard, self._num_shards = per_shard, num_shards
    self._per_host = per_shard * num_shards
    self._process_index, self._global = process_index, self._per_host * process_count
    if len(self._codes) < self._global:
      raise ValueError(f"{len(self._codes)} code maps cannot fill one global batch of {self._global}")
    self._batches_per_epoch = len(self._codes) // self._global
    self._seed = seed
    position = position or {"epoch": 0, "batch": 0}
    self._epoch, self._batch = int(position["epoch"]), int(position["batch"])
    self._perm = self._permutation(self._epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._codes))

  @property
  def position(self) -> dict[str, int]:
    return {"epoch": self._epoch, "batch": self._batch}

  def __iter__(self) -> "CodeBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self._batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
      self._perm = self._permutation(self._epoch)
    start = self._batch * self._global + self._process_index * self._per_host
    idx = self._perm[start:start + self._per_host]
    self._batch += 1
    codes = self._codes[idx]
    batch = {FEATURE: codes.reshape((self._num_shards, self._per_shard) + codes.shape[1:])}
    if self._labels is not None:
      batch[LABEL] = self._labels[idx].reshape(self._num_shards, self._per_shard)
    return batch


def eval_code_batches(codes: np.ndarray, *, per_shard: int, num_shards: int,
                      max_examples: int | None = None, process_index: int = 0, process_count: int = 1,
                      labels: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over this host's contiguous share of `codes[:max_examples]`:
  `{'codes': i32[num_shards, per_shard, h, w], 'mask': bool[num_shards, per_shard]}` (+ `'label'`, i32, when
  `labels: i32[N]` are given), padded with code 0, label 0 and mask False so that every host yields the same
  number of batches (they run collectives together)."""
  if max_examples:
    codes = codes[:max_examples]
  rows = parallel.host_slice(len(codes), process_index=process_index, process_count=process_count,
                             remainder="blocks")
  mine_labels = None if labels is None else labels[:len(codes)][rows]
  per_host = per_shard * num_shards
  share = -(-len(codes) // process_count)  # the largest share: every host yields as many batches
  num_batches = -(-share // per_host)
  codes = codes[rows]
  for start in range(0, num_batches * per_host, per_host):
    chunk = codes[start:start + per_host]
    mask = np.zeros((per_host,), bool)
    mask[:len(chunk)] = True
    padded = np.zeros((per_host,) + codes.shape[1:], np.int32)
    padded[:len(chunk)] = chunk
    batch = {FEATURE: padded.reshape((num_shards, per_shard) + codes.shape[1:]),
             "mask": mask.reshape(num_shards, per_shard)}
    if mine_labels is not None:
      padded_labels = np.zeros((per_host,), np.int32)
      padded_labels[:len(chunk)] = mine_labels[start:start + per_host]
      batch[LABEL] = padded_labels.reshape(num_shards, per_shard)
    yield batch


def host_training_batches(codes: np.ndarray, *, global_batch_size: int, seed: int,
                          position: Mapping[str, int] | None, max_maps: int = 0,
                          labels: np.ndarray | None = None) -> CodeBatches:
  """The training iterator of this host for a prior's loop: `CodeBatches` with one shard per local device, each
  of the per-device share of `global_batch_size`, this host's part of every global batch."""
  return CodeBatches(codes, per_shard=parallel.per_device_batch_size(global_batch_size),
                     num_shards=parallel.local_device_count(), seed=seed, position=position,
                     process_index=parallel.process_index(), process_count=parallel.process_count(),
                     max_maps=max_maps, labels=labels)


def host_eval_batches(codes: np.ndarray, *, global_batch_size: int, max_examples: int = 0,
                      labels: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
  """`eval_code_batches` of this host's share of `codes[:max_examples]` (0 = all), one shard per local device."""
  return eval_code_batches(codes, per_shard=parallel.per_device_batch_size(global_batch_size),
                           num_shards=parallel.local_device_count(), max_examples=max_examples or None,
                           process_index=parallel.process_index(), process_count=parallel.process_count(),
                           labels=labels)
