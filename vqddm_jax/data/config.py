"""Validation of the `config.data` section, in the dialect every section uses (`config_checks`).

Cheap and I/O-free apart from checking that a user-given image folder exists, so `main` can call it on load
and stop a bad run before any TensorFlow pipeline or model is built. The choices are `vqddm_jax.choices`'.
"""
from __future__ import annotations

import os
from typing import Any

from vqddm_jax import choices
from vqddm_jax.config_checks import (check_bool, check_choice, check_float, check_int, check_str, fail,
                                     field_value)


def validate_data(config: Any) -> None:
  """Checks the `data` section of a whole config; raises on the first bad field.

  Args:
    config: the config (a ConfigDict, or nested mappings with the same fields).

  Raises:
    ConfigError: a `ValueError` naming the field (`config.data.resize`), its value and what is allowed.
  """
  check_choice(config, "data.source", choices.DATA_SOURCES)
  check_choice(config, "data.resize", choices.RESIZE_MODES)
  check_choice(config, "data.channels", choices.IMAGE_CHANNELS)
  check_int(config, "data.image_size", 1)
  check_int(config, "data.shuffle_buffer", 1)  # 1 disables the buffer shuffle.
  check_int(config, "data.prefetch", 0)  # Host batches prefetched; 0 = none.
  check_float(config, "data.holdout_fraction", 0.0, 1.0, low_open=True, high_open=True)
  for name in ("image_key", "train_split", "eval_split"):
    check_str(config, f"data.{name}")
  eval_split = field_value(config, "data.eval_split")
  if eval_split == field_value(config, "data.train_split"):
    # Scoring held-out metrics on the training data is a pitfall of the original code (docs/method.md §6).
    fail("data.eval_split", eval_split, "a split different from data.train_split")
  _validate_source(config)
  _validate_class_folders(config)


def validate_data_config(section: Any) -> None:
  """`validate_data` of the `config.data` section alone (what the pipelines check on entry)."""
  validate_data({"data": section})


def _validate_source(config: Any) -> None:
  """The fields a data source needs."""
  source = field_value(config, "data.source")
  if source == "tfds":
    check_str(config, "data.tfds_name", "a TFDS name such as 'celeb_a' when data.source == 'tfds'")
  if source == "mnist5k":
    channels, image_key = field_value(config, "data.channels"), field_value(config, "data.image_key")
    if channels != 1:
      fail("data.channels", channels, "1 for data.source == 'mnist5k' (greyscale digits)")
    if image_key != "image":
      fail("data.image_key", image_key, "'image' for data.source == 'mnist5k'")
  if source == "image_folder":
    check_str(config, "data.image_folder",
              "the root folder of the images when data.source == 'image_folder'")
    folder = field_value(config, "data.image_folder")
    if not os.path.isdir(os.path.expanduser(folder)):
      fail("data.image_folder", folder, "an existing folder (it does not exist or is not a folder)")


def _validate_class_folders(config: Any) -> None:
  """`data.class_folders`: a bool, True only for image folders (other sources label from their data set)."""
  if "class_folders" not in field_value(config, "data"):
    return  # A config stored by older code (W/config.json) has no such field: it means False.
  check_bool(config, "data.class_folders")
  source = field_value(config, "data.source")
  if field_value(config, "data.class_folders") and source != "image_folder":
    fail("data.class_folders", True, f"False for data.source == {source!r} (class folders label image folders "
         "only; 'mnist5k' and 'tfds' sources take labels from the data set's 'label' feature)")
