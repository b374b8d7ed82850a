"""Input pipelines: MNIST-5k (embedded), TFDS data sets by name, image folders; stored code maps (`codes`).

Public API (all take the `config.data` section):
  validate_data_config(cfg)                         -> None, or ConfigError naming the field
  prepare(cfg)                                      -> {split: count}; builds MNIST-5k once, checks TFDS
  train_batches(cfg, *, global_batch_size, num_shards, seed, position=None, with_labels=False)
                                                    -> TrainIterator (`.position`)
  eval_batches(cfg, *, split, global_batch_size, num_shards, max_examples=None, with_labels=False)
                                                    -> iterator of padded batches ('label' -1 on padding)
  first_images(cfg, split, num)                     -> the first `num` images of a split on this host
  num_examples(cfg, split)                          -> examples in the split over all hosts
  class_names(cfg)                                  -> the label's class names in index order, or None

Names are resolved on first use: `validate_data_config` (the config schema's) imports no TensorFlow, the
pipelines do.
"""
import importlib

_PUBLIC = {
    "validate_data_config": "config", "DataNotPreparedError": "sources", "TrainIterator": "pipeline",
    "class_names": "pipeline",
    "eval_batches": "pipeline", "first_images": "pipeline", "num_examples": "pipeline",
    "per_shard_batch_size": "pipeline", "prepare": "pipeline", "train_batches": "pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name in _PUBLIC:
    return getattr(importlib.import_module(f"vqddm_jax.data.{_PUBLIC[name]}"), name)
  raise AttributeError(f"module 'vqddm_jax.data' has no attribute {name!r}")
