"""Validation of the `config.data` section.

Cheap and I/O-free apart from checking that a user-given image folder exists, so `main` can call it on load
and stop a bad run before any TensorFlow pipeline or model is built.
"""
from __future__ import annotations

import os
from typing import Any

from vqddm_jax.errors import ConfigError

SOURCES = ("mnist5k", "tfds", "image_folder")
RESIZE_MODES = ("pad", "center_crop")
CHANNELS = (1, 3)

# Field -> type every config must define (`config_schema.base_config` defines all of them).
_FIELD_TYPES: dict[str, type] = {
    "source": str, "tfds_name": str, "data_dir": str, "manual_dir": str, "image_folder": str,
    "image_key": str, "train_split": str, "eval_split": str, "image_size": int, "channels": int,
    "resize": str, "shuffle_buffer": int, "prefetch": int, "holdout_fraction": float,
}


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.data.{field} = {value!r} is not allowed: {allowed}")


def _get(cfg: Any, field: str) -> Any:
  if field not in cfg:
    raise ConfigError(f"config.data.{field} is missing (the config file must define it)")
  return cfg[field]


def _check_types(cfg: Any) -> None:
  for field, kind in _FIELD_TYPES.items():
    value = _get(cfg, field)
    if kind is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
      # bool is an int subclass; `channels=True` is a typo, not a channel count.
      ok = isinstance(value, int) and not isinstance(value, bool)
    else:
      ok = isinstance(value, kind)
    if not ok:
      _fail(field, value, f"must be of type {kind.__name__}")


def validate_data_config(cfg: Any) -> None:
  """Checks the `config.data` section; raises on the first bad field.

  Args:
    cfg: the `config.data` ConfigDict (or any mapping with the same fields).

  Raises:
    ValueError: naming the field (`config.data.resize`), its value and what is allowed.
  """
  _check_types(cfg)
  if cfg["source"] not in SOURCES:
    _fail("source", cfg["source"], "one of " + ", ".join(map(repr, SOURCES)))
  if cfg["resize"] not in RESIZE_MODES:
    _fail("resize", cfg["resize"], "one of " + ", ".join(map(repr, RESIZE_MODES)))
  if cfg["channels"] not in CHANNELS:
    _fail("channels", cfg["channels"], "1 (greyscale) or 3 (RGB)")
  if cfg["image_size"] < 1:
    _fail("image_size", cfg["image_size"], "a positive number of pixels")
  if cfg["shuffle_buffer"] < 1:
    _fail("shuffle_buffer", cfg["shuffle_buffer"], "an int >= 1 (1 disables the buffer shuffle)")
  if cfg["prefetch"] < 0:
    _fail("prefetch", cfg["prefetch"], "an int >= 0 (host batches prefetched; 0 = none)")
  if not 0.0 < cfg["holdout_fraction"] < 1.0:
    _fail("holdout_fraction", cfg["holdout_fraction"], "a fraction strictly between 0 and 1")
  for field in ("image_key", "train_split", "eval_split"):
    if not cfg[field].strip():
      _fail(field, cfg[field], "a non-empty string")
  if cfg["train_split"] == cfg["eval_split"]:
    # Scoring held-out metrics on the training data is a pitfall of the original code (docs/method.md §6).
    _fail("eval_split", cfg["eval_split"], "a split different from data.train_split")
  _validate_source(cfg)


def _validate_source(cfg: Any) -> None:
  source = cfg["source"]
  if source == "tfds" and not cfg["tfds_name"].strip():
    _fail("tfds_name", cfg["tfds_name"], "a TFDS name such as 'celeb_a' when data.source == 'tfds'")
  if source == "mnist5k":
    if cfg["channels"] != 1:
      _fail("channels", cfg["channels"], "1 for data.source == 'mnist5k' (greyscale digits)")
    if cfg["image_key"] != "image":
      _fail("image_key", cfg["image_key"], "'image' for data.source == 'mnist5k'")
  if source == "image_folder":
    folder = cfg["image_folder"]
    if not folder.strip():
      _fail("image_folder", folder, "the root folder of the images when data.source == 'image_folder'")
    if not os.path.isdir(os.path.expanduser(folder)):
      _fail("image_folder", folder, "an existing folder (it does not exist or is not a folder)")
