"""Host input pipelines: infinite, exactly resumable training batches and finite, padded eval passes.

Every host batch is already split for the local devices: `image: f32[num_shards, per_shard, S, S, C]` in
[-1, 1], NHWC, with per_shard = global_batch_size / process_count / num_shards.

Resume design. Each epoch is a separate `tf.data` pipeline seeded by (seed, epoch): shuffle the encoded
records (TFDS: file order + shuffle buffer; folders: a full permutation of the file list), number them,
decode, drop files that fail to decode, batch with drop_remainder. A position is
`{'epoch': e, 'batch': b, 'offset': o}` for the next batch, where o counts the encoded records of epoch e
consumed so far. Resuming rebuilds epoch e and skips o records *before* decoding, so a resume deep into a
large epoch reads records but decodes nothing it skips, and yields exactly what an uninterrupted iterator
would (o == b * per_host unless image files failed to decode).

Several hosts. Every host walks the same numbered stream of encoded records and decodes only its own share
of each global batch: record i of an epoch belongs to host (i mod B) div b, for a global batch of B records
and b = B / hosts per host. So the global batch of every step, in device order, is the one a single host with
all the devices would see: results do not depend on how many hosts run the job, and one position (a multiple
of B) fits every host. Each epoch uses whole global batches only, and a file that fails to decode is kept
(as the blank image its decoder returns, and logged) rather than dropped, so that no host falls out of step.
"""
from __future__ import annotations

import atexit
import math
import weakref
from typing import Any, Iterator

import numpy as np
from absl import logging

from vqddm_jax import parallel
from vqddm_jax.data import mnist5k
from vqddm_jax.data.config import validate_data_config
from vqddm_jax.data.preprocess import preprocess
from vqddm_jax.data.sources import make_source
from vqddm_jax.data.tf_host import tf

AUTOTUNE = tf.data.AUTOTUNE
# Iterators not yet closed. At interpreter exit, TF would destroy them while their worker threads are inside
# a Python decode call (image folders) that can no longer take the GIL, and the process would hang; closing
# them from an atexit hook, while Python still runs, avoids that.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  for it in list(_OPEN):
    it.close()


def per_shard_batch_size(global_batch_size: int, num_shards: int, process_count: int) -> int:
  """global_batch_size / process_count / num_shards; raises ValueError when it does not divide."""
  if global_batch_size < 1 or num_shards < 1:
    raise ValueError(f"batch size {global_batch_size} and num_shards {num_shards} must be positive")
  if global_batch_size % (process_count * num_shards):
    raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} host(s) x "
                     f"{num_shards} local devices = {process_count * num_shards}")
  return global_batch_size // (process_count * num_shards)


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
  # Two independent 31-bit seeds per (seed, epoch): file order and shuffle buffer (or folder permutation).
  a, b = np.random.SeedSequence([seed, epoch]).generate_state(2) >> 1
  return int(a), int(b)


def _options() -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True  # Exact resume needs the same order on every rebuild.
  # No autotuning. Its background thread sleeps longer and longer between tuning rounds (to tens of seconds
  # once a pipeline has run a while), and destroying an iterator waits for that thread to wake: dropping
  # each epoch's iterator stalled training 13-36 s per epoch, ~1.5 of the default stage 1's 6 minutes on 2
  # cores. Without it, AUTOTUNE'd maps keep their starting parallelism (bounded by the core count); the
  # order, hence every batch, is the same either way.
  opts.autotune.enabled = False
  return opts


def _decode_fn(source, cfg):
  """record -> {'image': f32[S, S, C] in [-1, 1], 'ok': bool[], ('label': i32[])}."""

  def fn(record):
    ex = source.decode(record)
    ex["image"] = preprocess(ex["image"], size=cfg.image_size, mode=cfg.resize, channels=cfg.channels)
    return ex

  return fn


def _without_flag(ex):
  return {k: v for k, v in ex.items() if k != "ok"}


def _drop_failed(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples whose file failed to decode, then the 'ok' flag itself."""

  def decoded(ex):
    return ex["ok"]

  return ds.filter(decoded).map(_without_flag)


def _to_shards(num_shards: int, per_shard: int):
  def fn(batch):
    return {k: tf.reshape(v, (num_shards, per_shard) + tuple(v.shape[1:])) if k != "idx" else v
            for k, v in batch.items()}
  return fn


class TrainIterator:
  """Infinite iterator of host batches `{'image': f32[num_shards, per_shard, S, S, C]}` (+ 'label': i32).

  `position` is a JSON-able dict `{'epoch', 'batch', 'offset'}` of the *next* batch;
  `train_batches(..., position=it.position)` continues the same stream. After the last full batch of an
  epoch it still names that epoch (`batch` = batches per epoch); resuming from there moves on to the next.
  """

  def __init__(self, source: Any, cfg: Any, *, per_shard: int, num_shards: int, seed: int,
               process_index: int, process_count: int, position: dict | None):
    self._source, self._cfg, self._seed = source, cfg, seed
    self._per_shard, self._num_shards = per_shard, num_shards
    self._per_host = per_shard * num_shards
    self._hosts = (process_index, process_count)
    self._num_records = source.num_examples(cfg.train_split) if process_count > 1 else None
    pos = dict(position or {})
    try:
      self._epoch, self._batch = int(pos.get("epoch", 0)), int(pos.get("batch", 0))
      self._offset = int(pos.get("offset", self._batch * self._per_host))
    except (TypeError, ValueError):
      raise ValueError(f"bad input position {position!r}: expected int entries "
                       "'epoch', 'batch', 'offset'") from None
    if min(self._epoch, self._batch, self._offset) < 0:
      raise ValueError(f"bad input position {position!r}: negative entries")
    # Built now, not at the first `next`, so a missing data set fails where the iterator is made.
    self._it, self._fresh = self._build(), self._offset == 0
    self._yielded = 0  # Batches from the current build; 0 after a fresh epoch means no full batch fits.
    self._closed = False
    _OPEN.add(self)

  @property
  def position(self) -> dict[str, int]:
    return {"epoch": self._epoch, "batch": self._batch, "offset": self._offset}

  def _build(self) -> Iterator[dict[str, np.ndarray]]:
    cfg = self._cfg
    ds = self._source.train_records(cfg.train_split, seeds=_epoch_seeds(self._seed, self._epoch),
                                    shuffle_buffer=cfg.shuffle_buffer)
    pi, pc = self._hosts
    if pc > 1:  # Whole global batches only; this host's share of each (see the module docstring).
      global_batch = self._per_host * pc
      ds = ds.take(self._num_records // global_batch * global_batch)
    ds = ds.enumerate().skip(self._offset)
    if pc > 1:
      ds = ds.filter(lambda i, r: (i % global_batch) // self._per_host == pi)
    decode = _decode_fn(self._source, cfg)
    ds = ds.map(lambda i, r: dict(decode(r), idx=i), num_parallel_calls=AUTOTUNE)
    ds = _drop_failed(ds) if pc == 1 else ds.map(_without_flag)
    ds = ds.batch(self._per_host, drop_remainder=True)
    ds = ds.map(_to_shards(self._num_shards, self._per_shard), num_parallel_calls=AUTOTUNE)
    if cfg.prefetch:
      ds = ds.prefetch(cfg.prefetch)
    return ds.with_options(_options()).as_numpy_iterator()

  def close(self) -> None:
    """Stops the background pipeline now; `position` stays valid for a later resume."""
    self._it, self._closed = None, True

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise StopIteration
    while True:
      if self._it is None:
        self._it, self._yielded, self._fresh = self._build(), 0, self._offset == 0
      try:
        batch = next(self._it)
      except StopIteration:
        if self._fresh and not self._yielded:
          raise ValueError(f"the training split {self._cfg.train_split!r} gives this host fewer than "
                           f"{self._per_host} usable examples (one host batch)") from None
        self._it, self._epoch, self._batch, self._offset = None, self._epoch + 1, 0, 0
        continue
      self._yielded += 1
      self._batch += 1
      self._offset = self._next_offset(int(batch.pop("idx")[-1]))
      return batch

  def _next_offset(self, last: int) -> int:
    """The record after this host's last one; on several hosts the first of the next global batch."""
    if self._hosts[1] == 1:
      return last + 1
    global_batch = self._per_host * self._hosts[1]
    return (last // global_batch + 1) * global_batch


class EvalIterator:
  """A finite iterator over prebuilt eval batches; `close()` stops its background pipeline early."""

  def __init__(self, ds: tf.data.Dataset):
    self._it = ds.as_numpy_iterator()
    _OPEN.add(self)

  def close(self) -> None:
    self._it = None

  def __iter__(self) -> EvalIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise StopIteration
    try:
      return next(self._it)
    except StopIteration:
      self._it = None
      raise


def train_batches(cfg: Any, *, global_batch_size: int, num_shards: int, seed: int,
                  position: dict | None = None, with_labels: bool = False,
                  process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
  """The infinite, shuffled, exactly resumable training stream of this host.

  Args:
    cfg: the `config.data` section.
    global_batch_size: examples per step over all hosts and devices.
    num_shards: local devices; each host batch is `[num_shards, per_shard, ...]`.
    seed: base seed; epoch e is shuffled by (seed, e).
    position: a `TrainIterator.position` to continue from; None = the start.
    with_labels: also yield 'label': i32[num_shards, per_shard] (TFDS sets with a 'label' feature; image
      folders with `class_folders`); a ValueError for a source without labels.
    process_index, process_count: this host and the number of hosts (default: from JAX; tests simulate hosts).

  Returns:
    A `TrainIterator` yielding `{'image': f32[num_shards, per_shard, S, S, C]}` in [-1, 1].
  """
  pi, pc = parallel.this_host(process_index, process_count)
  per_shard = per_shard_batch_size(global_batch_size, num_shards, pc)
  source = make_source(cfg, with_labels=with_labels)
  return TrainIterator(source, cfg, per_shard=per_shard, num_shards=num_shards, seed=seed,
                       process_index=pi, process_count=pc, position=position)


def eval_batches(cfg: Any, *, split: str, global_batch_size: int, num_shards: int,
                 max_examples: int | None = None, with_labels: bool = False,
                 process_index: int | None = None,
                 process_count: int | None = None) -> EvalIterator:
  """One deterministic pass over `split` (no shuffle), each example exactly once over all hosts.

  Args:
    cfg: the `config.data` section.
    split: a split name (TFDS slicing such as 'train[29000:]' allowed for TFDS sources).
    global_batch_size, num_shards: as for `train_batches`.
    max_examples: if given, only this many examples in total (an even share per host).
    with_labels: also yield 'label': i32[num_shards, per_shard] (-1 on padding).
    process_index, process_count: as for `train_batches`.

  Returns:
    An `EvalIterator` of `{'image': f32[num_shards, per_shard, S, S, C], 'mask': bool[num_shards, per_shard]}`;
    the last batches are padded (zeros, mask False). With several hosts, every host yields the same number
    of batches, so a cross-host collective per batch cannot hang.
  """
  pi, pc = parallel.this_host(process_index, process_count)
  per_shard = per_shard_batch_size(global_batch_size, num_shards, pc)
  per_host = per_shard * num_shards
  source = make_source(cfg, with_labels=with_labels)
  ds = source.eval_records(split, process_index=pi, process_count=pc)
  if max_examples is not None:
    if max_examples < 1:
      raise ValueError(f"max_examples = {max_examples} must be positive (or None for the whole split)")
    mine = parallel.host_slice(max_examples, process_index=pi, process_count=pc, remainder="first")
    ds = ds.take(mine.stop - mine.start)
  ds = ds.map(_decode_fn(source, cfg), num_parallel_calls=AUTOTUNE)
  ds = _drop_failed(ds).map(lambda ex: dict(ex, mask=tf.constant(True)))
  pad = {k: tf.zeros(v.shape, v.dtype) for k, v in ds.element_spec.items()}
  if "label" in pad:
    pad["label"] = tf.constant(-1, tf.int32)
  pad_ds = tf.data.Dataset.from_tensors(pad).repeat()
  if pc == 1:
    # per_host - 1 padding examples complete the last batch; drop_remainder discards the rest.
    ds = ds.concatenate(pad_ds.take(per_host - 1))
  else:
    n = source.num_examples(split)
    n = n if max_examples is None else min(n, max_examples)
    num_batches = math.ceil(math.ceil(n / pc) / per_host)
    ds = ds.concatenate(pad_ds).take(num_batches * per_host)
  ds = ds.batch(per_host, drop_remainder=True).map(_to_shards(num_shards, per_shard))
  if cfg.prefetch:
    ds = ds.prefetch(cfg.prefetch)
  return EvalIterator(ds.with_options(_options()))


def class_names(cfg: Any) -> list[str] | None:
  """The names of the classes the pipelines' `label` indexes, in index order, or None for unlabelled data.

  MNIST-5k: '0'..'9'; a TFDS data set: its `label` feature's ClassLabel names (None without one); an image
  folder: its class folder names in sorted order with `config.data.class_folders` (else None), taken from
  the train split (which lists the folder). Call it once the data are prepared: some TFDS builders (cifar10)
  learn their names while preparing and report '0', '1', ... before.
  """
  validate_data_config(cfg)
  return make_source(cfg).class_names


def num_examples(cfg: Any, split: str) -> int:
  """Examples in `split` over all hosts (image folders: usable files after the pre-check)."""
  return make_source(cfg).num_examples(split)


def first_images(cfg: Any, split: str, num: int) -> np.ndarray:
  """The first `num` images of the whole `split` (on every host), in the order of the encode stage's code
  maps: `f32[num, S, S, C]` in [-1, 1]."""
  out, ndev = [], parallel.local_device_count()
  for batch in eval_batches(cfg, split=split, global_batch_size=ndev * 8, num_shards=ndev, max_examples=num,
                            process_index=0, process_count=1):
    out.append(parallel.unshard(batch["image"])[parallel.unshard(batch["mask"])])
  return np.concatenate(out)[:num]


def prepare(cfg: Any) -> dict[str, int]:
  """Makes sure the data exist; returns the example counts of the train and eval splits.

  MNIST-5k is built under `data_dir` once (a few seconds, no network; on multi-host jobs process 0 builds
  it first, so a shared data_dir is built once). A TFDS data set is only checked: if it is not prepared this
  raises `DataNotPreparedError` at once with the `tfds build` command that prepares it; nothing is
  downloaded.

  Raises:
    ValueError: bad config fields, unknown data set / split, empty split.
    DataNotPreparedError: the TFDS data set is not under data_dir.
  """
  validate_data_config(cfg)
  if cfg.source == "mnist5k":
    # Process 0 builds first; on a shared data_dir the others then find it built (else build their own).
    if parallel.is_main_process():
      mnist5k.build(cfg.data_dir)
    parallel.barrier("data: MNIST-5k built")
    mnist5k.build(cfg.data_dir)
  source = make_source(cfg)
  if cfg.source == "tfds":
    source.require_prepared()
  counts = {split: source.num_examples(split) for split in (cfg.train_split, cfg.eval_split)}
  for split, n in counts.items():
    if n == 0:
      raise ValueError(f"split {split!r} of {source.name} has no usable examples")
  logging.info("Data %s: %s examples.", source.name, counts)
  return counts
