"""A folder of PNG/JPEG images as a data source, robust to bad files.

Decoding uses PIL inside `tf.numpy_function`, mapped with parallel calls, rather than TF's decode ops:
- one library both vets a file and decodes it, so "usable" means the same thing at listing and at decoding;
- PIL reports each file's true mode and converts it with `convert('RGB')`, as torchvision's ImageFolder
  does: palette and CMYK files become RGB, greyscale is repeated to three channels and alpha is dropped. The
  greyscale and alpha files an RGB config converts are counted and logged ("converted N greyscale/RGBA files
  to RGB") instead of passing silently as they would through `tf.io.decode_image(channels=3)`. A greyscale
  config takes greyscale files only (an RGB file is not silently turned grey);
- a TF decode error aborts the whole `tf.data` pipeline (or, with `ignore_errors`, drops the file without
  telling us which one), while a Python exception here is caught, logged with the file name and counted;
- Pillow releases the GIL while decoding, so parallel calls decode on several cores.

Bad files are found in two places. A cheap pre-check at listing time (header via `Image.open`, which reads
no pixel data, plus the end-of-image marker in the file's last KiB, which catches truncated JPEG/PNG files)
removes zero-byte, non-image, truncated and (in a greyscale config) colour files before the split sizes and
epoch lengths are fixed. A file that passes the pre-check but still fails to decode (corrupt data mid-file) is
dropped from the stream at decoding time; `TrainIterator` tracks positions in listed files, so resume stays
exact on one host.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import threading

import numpy as np
from absl import logging
from PIL import Image

EXTENSIONS = (".png", ".jpg", ".jpeg")
# PIL modes that give exactly `channels` channels after a lossless conversion.
_MODES = {1: ("L", "1"), 3: ("RGB", "P", "CMYK", "YCbCr")}
# Greyscale and alpha modes an RGB config converts as torchvision does (grey repeated, alpha dropped); counted.
_CONVERTED_TO_RGB = ("L", "1", "LA", "I", "I;16", "F", "RGBA", "RGBa", "PA")
_TAIL_BYTES = 1024
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


class _BadFiles:
  """Counts and logs each bad file once per process (a file that fails every epoch is logged once)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._seen: set[str] = set()

  def report(self, path: str, reason: str) -> None:
    with self._lock:
      if path in self._seen:
        return
      self._seen.add(path)
      count = len(self._seen)
    logging.warning("Skipping bad image file %s (%s); %d bad image files skipped so far.", path, reason,
                    count)

  @property
  def count(self) -> int:
    with self._lock:
      return len(self._seen)


BAD_FILES = _BadFiles()
# (path, size, mtime_ns, channels) -> (reason the file is unusable or None, converted to RGB); rescans vet
# only changed files.
_CHECKED: dict[tuple[str, int, int, int], tuple[str | None, bool]] = {}


def _accepts(mode: str, channels: int) -> bool:
  return mode in _MODES[channels] or (channels == 3 and mode in _CONVERTED_TO_RGB)


def inspect_file(path: str, channels: int) -> tuple[str | None, bool]:
  """(why `path` is not a usable image with `channels` channels or None, whether it is a greyscale/alpha file
  that decoding converts to RGB). Reads the header and the last KiB only; no pixel data is decoded."""
  try:
    size = os.path.getsize(path)
    if size == 0:
      return "empty file", False
    with Image.open(path) as im:
      fmt, mode = im.format, im.mode
    if fmt not in _END_MARKERS:
      return f"format {fmt}, expected PNG or JPEG", False
    if not _accepts(mode, channels):
      return f"mode {mode} cannot give {channels} channel(s)", False
    with open(path, "rb") as f:
      f.seek(max(0, size - _TAIL_BYTES))
      if _END_MARKERS[fmt] not in f.read():
        return f"truncated {fmt} (no end-of-image marker)", False
  except Exception as e:  # pylint: disable=broad-except  # Any failure means "skip this file".
    return f"{type(e).__name__}: {e}", False
  return None, channels == 3 and mode in _CONVERTED_TO_RGB


def check_file(path: str, channels: int) -> str | None:
  """Returns why `path` is not a usable image with `channels` channels, or None if it looks fine."""
  return inspect_file(path, channels)[0]


def _vet(paths: list[str], channels: int) -> tuple[list[str], int]:
  """The paths that pass `check_file`, in the given order, and how many of them are converted to RGB;
  reports the others."""
  keys = []
  for p in paths:
    st = os.stat(p)
    keys.append((p, st.st_size, st.st_mtime_ns, channels))
  todo = [k for k in keys if k not in _CHECKED]
  if todo:
    # I/O bound (open + two small reads per file): threads hide the latency of network disks.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
      for key, result in zip(todo, pool.map(lambda k: inspect_file(k[0], channels), todo)):
        _CHECKED[key] = result
  good, converted = [], 0
  for key in keys:
    reason, to_rgb = _CHECKED[key]
    if reason is None:
      good.append(key[0])
      converted += to_rgb
    else:
      BAD_FILES.report(key[0], reason)
  return good, converted


def _find_images(root: str) -> list[str]:
  """Relative POSIX paths of every PNG/JPEG (any case) under `root`, sorted."""
  found = []
  for dirpath, _, filenames in os.walk(root, followlinks=True):
    for name in filenames:
      if name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(found)


def _held_out(relpath: str, fraction: float) -> bool:
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """Usable files of an image folder per split (absolute paths, sorted by relative path)."""
  splits: dict[str, list[str]]


def list_folder(root: str, *, train_split: str, eval_split: str, channels: int,
                holdout_fraction: float) -> FolderListing:
  """Lists and vets the images of `root` and assigns them to the two splits.

  If `root/<train_split>/` and `root/<eval_split>/` both exist, they are the splits. Otherwise every image
  under `root` is held out for `eval_split` when a hash of its relative path falls below `holdout_fraction`,
  so the assignment is fixed, independent of listing order, and stable when files are added.
  """
  root = os.path.abspath(os.path.expanduser(root))
  sub = {s: os.path.join(root, s) for s in (train_split, eval_split)}
  if all(os.path.isdir(d) for d in sub.values()):
    rel = {s: [os.path.join(s, r) for r in _find_images(d)] for s, d in sub.items()}
  else:
    everything = _find_images(root)
    held = [_held_out(r, holdout_fraction) for r in everything]
    rel = {train_split: [r for r, h in zip(everything, held) if not h],
           eval_split: [r for r, h in zip(everything, held) if h]}
  vetted = {s: _vet([os.path.join(root, r) for r in rs], channels) for s, rs in rel.items()}
  splits = {s: v[0] for s, v in vetted.items()}
  logging.info("Image folder %s: %s usable images; %d bad files skipped in this process so far.", root,
               {s: len(v) for s, v in splits.items()}, BAD_FILES.count)
  converted = sum(v[1] for v in vetted.values())
  if converted:
    logging.info("Image folder %s: converted %d greyscale/RGBA files to RGB (grey repeated, alpha dropped).",
                 root, converted)
  return FolderListing(splits)


def decode_file(path: bytes, channels: int) -> tuple[np.ndarray, bool]:
  """Decodes one vetted file with PIL: (u8[h, w, channels], True), or (u8[1, 1, channels], False)."""
  name = path.decode("utf-8")
  try:
    with Image.open(name) as im:
      im.load()  # Forces a full decode so corrupt data raises here, not later.
      if not _accepts(im.mode, channels):
        raise ValueError(f"mode {im.mode} cannot give {channels} channel(s)")
      if channels == 3 and im.mode == "P":
        # The same colours as P -> RGB, without PIL's warning about palette transparency stored as bytes.
        im = im.convert("RGBA")
      im = im.convert("L" if channels == 1 else "RGB")
      array = np.asarray(im, dtype=np.uint8)
    return array.reshape(array.shape[:2] + (channels,)), True
  except Exception as e:  # pylint: disable=broad-except  # Any failure means "skip this file".
    BAD_FILES.report(name, f"decoding failed: {type(e).__name__}: {e}")
    return np.zeros((1, 1, channels), np.uint8), False
