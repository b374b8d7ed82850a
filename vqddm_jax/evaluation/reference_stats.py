"""Reference statistics for FID: the feature mean and covariance of a whole training split, computed once.

Papers compare 10k-50k samples with the statistics of the full training set. Those statistics are computed
here in one streamed pass over the split (`moments.py`: float64, one batch of features held at a time), on
multi-host jobs each host over its share, merged exactly. They are stored in an `.npz`:

  mu      f64[F]     mean of the features
  sigma   f64[F, F]  unbiased covariance
  count   i64[]      images the statistics are made of
  record  str        JSON: format, feature network, the fingerprint of its weights, data set, split, image size,
                     channels, resize mode, the split's size when computed, and `count`

A file is only used when its record matches the current run (`check_record`): statistics from another
feature network, data set, split or image size would give a meaningless distance, so a mismatch is an error
that names what differs, never a silent fallback.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np
from absl import logging
from etils import epath

from vqddm_jax import parallel
from vqddm_jax import files as files_lib
from vqddm_jax.errors import ConfigError, MismatchError
from vqddm_jax.evaluation import moments as moments_lib
from vqddm_jax.evaluation import streamed
from vqddm_jax.evaluation.feature_net import FeatureNet

FORMAT = "vqddm_jax.reference_stats.v1"
# What must match between a statistics file and the run that uses it (the record also holds `count`).
CHECKED = ("format", "feature_network", "feature_weights", "dataset", "split", "image_size", "channels",
           "resize", "split_size")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Loaded or computed statistics: mu f64[F], sigma f64[F, F], and the record (see the module doc)."""
  mu: np.ndarray
  sigma: np.ndarray
  record: dict

  @property
  def count(self) -> int:
    return int(self.record["count"])


def dataset_name(data_cfg: Any) -> str:
  """'mnist5k', 'tfds:<name>' or 'image_folder:<absolute path>'."""
  if data_cfg.source == "tfds":
    return f"tfds:{data_cfg.tfds_name}"
  if data_cfg.source == "image_folder":
    return f"image_folder:{os.path.abspath(os.path.expanduser(data_cfg.image_folder))}"
  return str(data_cfg.source)


def data_record(data_cfg: Any, network_key: str) -> dict:
  """The entries of `wanted_record` known without building the network or reading the data."""
  return {"format": FORMAT, "feature_network": network_key, "dataset": dataset_name(data_cfg),
          "split": data_cfg.train_split, "image_size": data_cfg.image_size, "channels": data_cfg.channels,
          "resize": data_cfg.resize}


def wanted_record(data_cfg: Any, net: FeatureNet, split_size: int) -> dict:
  """The record a statistics file must have to serve this data config and feature network."""
  # Keys keep the order of the files written before `data_record` existed (the first two come first).
  return {"format": FORMAT, "feature_network": net.key, "feature_weights": net.fingerprint,
          **data_record(data_cfg, net.key), "split_size": int(split_size)}


def stats_path(given: str, cache: epath.Path) -> epath.Path:
  """The statistics file of a run: the user's `config.eval.reference_stats` when given, else the cache."""
  return files_lib.as_path(given) if given else cache


def check_record(stored: dict, wanted: dict, *, path: Any, given: bool) -> None:
  """Raises unless the stored record matches on every `CHECKED` entry.

  Raises:
    ConfigError: `given` (the file came from config.eval.reference_stats) and it does not match.
    MismatchError: the work directory's own cache does not match (it was made with another config).
  """
  diff = {k: (stored.get(k), wanted[k]) for k in CHECKED if stored.get(k) != wanted[k]}
  if not diff:
    return
  what = "; ".join(f"{k}: {a!r} in the file, {b!r} in this run" for k, a, b in
                   ((k, *v) for k, v in diff.items()))
  if given:
    raise ConfigError(f"config.eval.reference_stats = {str(path)!r} does not match this run ({what}): pass "
                      "statistics computed for this data set and feature network (--mode=reference_stats "
                      "writes them), or '' to compute them in the work directory")
  raise MismatchError(f"the reference statistics {path} do not match this run ({what}): the work directory "
                      "was evaluated with another config; remove that file to recompute them")


def save(path: epath.Path, stats: ReferenceStats) -> epath.Path:
  return files_lib.write_npz(path, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count),
                               record=np.array(json.dumps(stats.record, sort_keys=True)))


def load(path: epath.Path) -> ReferenceStats:
  """Reads a statistics file; ConfigError when it is not one."""
  try:
    arrays = files_lib.read_npz(path)
    record = json.loads(str(arrays["record"]))
    stats = ReferenceStats(np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64),
                           record)
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f"{path} is not a reference statistics file written by --mode=reference_stats "
                      f"({type(e).__name__}: {e})") from e
  if record.get("format") != FORMAT or stats.sigma.shape != stats.mu.shape * 2:
    raise ConfigError(f"{path} is not a reference statistics file of format {FORMAT!r}")
  return stats


def split_batches(data_cfg: Any, split: str, batch_size: int,
                  max_examples: int | None = None) -> Iterator[np.ndarray]:
  """This host's share of `split`, as batches f32[n, S, S, C] in [-1, 1] (padding dropped)."""
  from vqddm_jax import data  # Lazily: the data package imports TensorFlow.
  for batch in data.eval_batches(data_cfg, split=split, global_batch_size=batch_size * parallel.process_count(),
                                 num_shards=1, max_examples=max_examples):
    images = batch["image"].reshape((-1,) + batch["image"].shape[2:])
    yield images[batch["mask"].reshape(-1)]


def compute(data_cfg: Any, net: FeatureNet, *, batch_size: int = 250) -> ReferenceStats:
  """Statistics of the whole training split `data_cfg.train_split` in `net`'s feature space.

  Args:
    data_cfg: the `config.data` section.
    net: the feature network.
    batch_size: images per batch on each host.
  """
  from vqddm_jax import data  # Lazily: the data package imports TensorFlow.
  split_size = data.num_examples(data_cfg, data_cfg.train_split)
  total, seen = moments_lib.empty(net.dim), 0
  for images in split_batches(data_cfg, data_cfg.train_split, batch_size):
    if len(images):
      total = moments_lib.add_chunk(total, net.features(images))
      seen += len(images)
      if seen // 5000 != (seen - len(images)) // 5000:
        logging.info("reference statistics: %d of %d images", seen, split_size)
  total = streamed.merge_moments(total)
  record = dict(wanted_record(data_cfg, net, split_size), count=total.count)
  return ReferenceStats(total.mean, total.covariance(), record)


def load_or_compute(data_cfg: Any, net: FeatureNet, *, cache: epath.Path, given: str = "",
                    batch_size: int = 250) -> ReferenceStats:
  """The statistics from `given` (a user's file) or from the work directory's `cache`, else computed now
  and written to `cache` (by process 0).

  Raises:
    ConfigError: `given` does not match this run (or is not a statistics file).
    MismatchError: `cache` does not match this run.
  """
  from vqddm_jax import data  # Lazily: the data package imports TensorFlow.
  path = stats_path(given, cache)
  if path.exists():
    stats = load(path)
    check_record(stats.record, wanted_record(data_cfg, net, data.num_examples(data_cfg, data_cfg.train_split)),
                 path=path, given=bool(given))
    logging.info("reference statistics: %s (%d images of %s)", path, stats.count, stats.record["dataset"])
    return stats
  logging.info("reference statistics: computing them over the training split (once; cached in %s)", cache)
  stats = compute(data_cfg, net, batch_size=batch_size)
  if parallel.is_main_process():
    save(cache, stats)
  return stats
