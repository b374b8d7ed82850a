"""One process of tests/test_multihost_metrics.py: streams its share of an image set and of a folder's
training split through a toy feature network, merges with the other process, sums float64 values float32
cannot hold and gathers int64 ones past 2**31 (the held-out figures' path), and writes what it holds.

Usage: python tests/multihost_metrics_child.py PROCESS_ID PORT IMAGE_FOLDER OUT_DIR
"""
from __future__ import annotations

import sys

import ml_collections
import numpy as np

from vqddm_jax import config_schema, parallel
from vqddm_jax.evaluation import feature_net, reference_stats, streamed

SET_SIZE, CHUNK, KEEP = 37, 5, 25


def toy_net() -> feature_net.FeatureNet:
  """Per-image features and logits from element-wise maths only, so a row never depends on its batch."""
  def apply(images):
    x = np.asarray(images, np.float32)
    feats = np.concatenate([x.mean((1, 2)), (x ** 2).mean((1, 2)), x.max((1, 2))], axis=1)
    return feats.astype(np.float32), (feats[:, :4] * 3).astype(np.float32)
  return feature_net.FeatureNet("toy", "TOY", "channel means, squares, maxima", "0" * 64, 9, apply,
                                num_classes=4)


def image_set() -> np.ndarray:
  """f32[SET_SIZE, 8, 8, 3] in [-1, 1], the same in every process."""
  return np.random.default_rng(7).uniform(-1, 1, (SET_SIZE, 8, 8, 3)).astype(np.float32)


def wide_values(process_id: int) -> dict[str, np.ndarray]:
  """What each process adds up: 1 + 1e-12 over the two (float32 keeps 1), 1e300 (inf in float32), and
  values float32 rounds."""
  return {"loss": np.float64(1.0 if process_id == 0 else 1e-12),
          "sums": np.array([1e300, np.pi * (process_id + 1), -1 / 3, 1 + 2.0**-40], np.float64)}


def wide_ints(process_id: int) -> np.ndarray:
  return np.array([2**40 + process_id, -2**62 - process_id], np.int64)


def folder_config(folder: str) -> ml_collections.ConfigDict:
  config = config_schema.base_config()
  config.data.update(source="image_folder", image_folder=folder, channels=3, image_size=16,
                     resize="center_crop", shuffle_buffer=1, prefetch=1)
  return config


def main(process_id: int, port: int, folder: str, out_dir: str) -> None:
  distributed = config_schema.base_config().distributed
  distributed.update(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                     process_id=process_id, initialization_timeout=60)
  parallel.initialize_distributed(distributed)
  net, images = toy_net(), image_set()
  mine = parallel.host_slice(SET_SIZE)
  lo, hi = mine.start, mine.stop
  chunks = ((s, images[s:min(s + CHUNK, hi)]) for s in range(lo, hi, CHUNK))
  got = streamed.stream(net, chunks, SET_SIZE, keep=KEEP)
  ref = reference_stats.compute(folder_config(folder).data, net, batch_size=3)
  wide = parallel.sum_over_processes(wide_values(process_id))
  np.savez(f"{out_dir}/{process_id}.npz", lo=lo, hi=hi, count=got.moments.count, mean=got.moments.mean,
           scatter=got.moments.scatter, kept=got.kept, is_counts=got.scores.counts,
           prob_sums=got.scores.prob_sums, neg_entropy_sums=got.scores.neg_entropy_sums,
           ref_mu=ref.mu, ref_sigma=ref.sigma, ref_count=ref.count, wide_loss=wide["loss"],
           wide_sums=wide["sums"], wide_ints=parallel.gather_processes(wide_ints(process_id)))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
