"""Input pipelines: MNIST-5k (embedded), TFDS data sets by name, image folders.

Public API (all take the `config.data` section):
  validate_data_config(cfg)                         -> None, or ValueError naming the field
  prepare(cfg)                                      -> {split: count}; builds MNIST-5k once, checks TFDS
  train_batches(cfg, *, global_batch_size, num_shards, seed, position=None) -> TrainIterator (`.position`)
  eval_batches(cfg, *, split, global_batch_size, num_shards, max_examples=None) -> iterator of padded batches
  num_examples(cfg, split)                          -> examples in the split over all hosts
  steps_per_epoch(cfg, *, global_batch_size, num_shards) -> training batches per epoch
"""
import tensorflow as tf

# TensorFlow only feeds the host pipeline: hide accelerators from it before anything initialises them, so
# it never reserves GPU memory that JAX needs.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere; nothing more we can do here.
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from vqddm_jax.data.config import validate_data_config
from vqddm_jax.data.pipeline import (TrainIterator, eval_batches, num_examples, per_shard_batch_size,
                                     prepare, steps_per_epoch, train_batches)
from vqddm_jax.data.sources import DataNotPreparedError

__all__ = [
    "DataNotPreparedError", "TrainIterator", "eval_batches", "num_examples", "per_shard_batch_size",
    "prepare", "steps_per_epoch", "train_batches", "validate_data_config",
]
