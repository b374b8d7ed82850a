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
exact on one host. Also counted as bad files, never a crash: dangling symlinks, symlink loops (a file link
that resolves to itself, a folder link back to one of its own parent folders), folders that cannot be listed,
and images over `MAX_PIXELS` pixels.

16-bit greyscale PNGs (PIL modes 'I;16', 'I;16B', 'I;16L', 'I') are scaled to 8 bits, round(x * 255 / 65535),
rather than clipped as PIL's `convert` would (which turns all but the darkest 0.4 % of a 0..65535 ramp into
255); 48-bit RGB and 64-bit RGBA PNGs are already read by PIL as 8 bits per channel (the high byte).

Class folders (`config.data.class_folders`, `class_folders` below): as torchvision's ImageFolder, an image's
class is the first sub-folder of its path below its split root, and the sorted class names are numbered
0..C-1. The names come from the train split alone, so a label means the same in every split and on every host
(which list the same files); an image with no class folder, or an eval image in a class the train split
lacks, is a `ConfigError` rather than a silent guess.

`MAX_PIXELS` is PIL's default decompression-bomb limit (2**30 / 12 = 89,478,485 pixels, about 9459 x 9459). A
file over it is refused at listing, with its size, before any pixel is decoded: at the limit one RGB image
is 268 MB decoded and 1 GB as the float32 copy the resize works on, per parallel decode. Images are opened
without PIL's own check, which warns through the `warnings` module (an exception under `-W error`) and cannot
be filtered safely from the decoding threads; ours gives the same verdict with the file's size as the reason.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import os
import threading

import numpy as np
from absl import logging
from PIL import Image, JpegImagePlugin, PngImagePlugin

from vqddm_jax.errors import ConfigError

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 89_478_485  # Width x height above which a file is refused (PIL's default; see the module doc).
# 16-bit greyscale modes (a PNG's 'I' holds 0..65535 too): scaled to 8 bits by `_to_8_bits`.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
# PIL modes that give exactly `channels` channels after a conversion that loses no more than the low byte.
_MODES = {1: ("L", "1") + _SIXTEEN_BIT, 3: ("RGB", "P", "CMYK", "YCbCr")}
# Greyscale and alpha modes an RGB config converts as torchvision does (grey repeated, alpha dropped); counted.
_CONVERTED_TO_RGB = ("L", "1", "LA", "F", "RGBA", "RGBa", "PA") + _SIXTEEN_BIT
# The PIL readers of the two accepted formats, by the first bytes of the file.
_READERS = ((b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
            (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile))
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


def _open(path: str) -> Image.Image:
  """Opens a PNG or JPEG file (header only) without PIL's decompression-bomb check; other formats through
  `Image.open`, only to name them in the reason they are refused."""
  with open(path, "rb") as f:
    prefix = f.read(8)
  for magic, reader in _READERS:
    if prefix.startswith(magic):
      return reader(path)
  return Image.open(path)


def _too_large(im: Image.Image) -> str | None:
  w, h = im.size
  return f"{w}×{h} pixels, over the limit of {MAX_PIXELS} pixels" if w * h > MAX_PIXELS else None


def inspect_file(path: str, channels: int) -> tuple[str | None, bool]:
  """(why `path` is not a usable image with `channels` channels or None, whether it is a greyscale/alpha file
  that decoding converts to RGB). Reads the header and the last KiB only; no pixel data is decoded."""
  try:
    size = os.path.getsize(path)
    if size == 0:
      return "empty file", False
    with _open(path) as im:
      fmt, mode, too_large = im.format, im.mode, _too_large(im)
    if fmt not in _END_MARKERS:
      return f"format {fmt}, expected PNG or JPEG", False
    if too_large:
      return too_large, False
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


def _unreachable(path: str, error: OSError) -> str:
  """The reason a listed path cannot be opened: a dangling link, a link loop or another OS error."""
  if os.path.islink(path) and error.errno == errno.ENOENT:
    return f"dangling symlink to {os.readlink(path)}"
  if error.errno == errno.ELOOP:
    return "symlink loop (the link resolves to itself)"
  return f"{type(error).__name__}: {error}"


def _vet(paths: list[str], channels: int) -> tuple[list[str], int]:
  """The paths that pass `check_file`, in the given order, and how many of them are converted to RGB;
  reports the others."""
  keys, unreachable = [], {}
  for p in paths:
    try:
      st = os.stat(p)
    except OSError as e:
      unreachable[p] = _unreachable(p, e)
      keys.append((p, -1, -1, channels))
      continue
    keys.append((p, st.st_size, st.st_mtime_ns, channels))
  todo = [k for k in keys if k not in _CHECKED and k[0] not in unreachable]
  if todo:
    # I/O bound (open + two small reads per file): threads hide the latency of network disks.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
      for key, result in zip(todo, pool.map(lambda k: inspect_file(k[0], channels), todo)):
        _CHECKED[key] = result
  good, converted = [], 0
  for key in keys:
    reason, to_rgb = (unreachable[key[0]], False) if key[0] in unreachable else _CHECKED[key]
    if reason is None:
      good.append(key[0])
      converted += to_rgb
    else:
      BAD_FILES.report(key[0], reason)
  return good, converted


def _find_images(root: str) -> list[str]:
  """Relative POSIX paths of every PNG/JPEG (any case) under `root`, sorted.

  Folder links are followed, except one back to a folder on its own path from `root` (a loop, which would
  list the same files again at ever deeper paths): it is reported as a bad file, as is a folder that cannot
  be listed. File links are listed whatever they point to; `_vet` reports the dangling ones and the loops.
  """
  found = []

  def visit(folder: str, ancestors: frozenset[tuple[int, int]]) -> None:
    try:
      with os.scandir(folder) as it:
        entries = list(it)
    except OSError as e:
      BAD_FILES.report(folder, f"cannot list folder: {type(e).__name__}: {e.strerror}")
      return
    for entry in entries:
      try:
        is_dir = entry.is_dir()  # Follows links; False for a dangling link.
      except OSError:  # A loop of links (ELOOP): not a folder; `_vet` reports it if it has an image name.
        is_dir = False
      if is_dir:
        st = entry.stat()
        if (st.st_dev, st.st_ino) in ancestors:
          BAD_FILES.report(entry.path, f"symlink loop: a link back to its parent folder "
                                       f"{os.path.realpath(entry.path)}")
        else:
          visit(entry.path, ancestors | {(st.st_dev, st.st_ino)})
      elif entry.name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(entry.path, root).replace(os.sep, "/"))

  st = os.stat(root)
  visit(root, frozenset({(st.st_dev, st.st_ino)}))
  return sorted(found)


def _held_out(relpath: str, fraction: float) -> bool:
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """Usable files of an image folder per split (absolute paths, sorted by relative path), and the folder
  each split's paths start from (`root/<split>` with split sub-folders, else `root`)."""
  splits: dict[str, list[str]]
  split_roots: dict[str, str]


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
    split_roots = sub
  else:
    everything = _find_images(root)
    held = [_held_out(r, holdout_fraction) for r in everything]
    rel = {train_split: [r for r, h in zip(everything, held) if not h],
           eval_split: [r for r, h in zip(everything, held) if h]}
    split_roots = {train_split: root, eval_split: root}
  vetted = {s: _vet([os.path.join(root, r) for r in rs], channels) for s, rs in rel.items()}
  splits = {s: v[0] for s, v in vetted.items()}
  logging.info("Image folder %s: %s usable images; %d bad files skipped in this process so far.", root,
               {s: len(v) for s, v in splits.items()}, BAD_FILES.count)
  converted = sum(v[1] for v in vetted.values())
  if converted:
    logging.info("Image folder %s: converted %d greyscale/RGBA files to RGB (grey repeated, alpha dropped).",
                 root, converted)
  from vqddm_jax import agreement  # Lazily (JAX): on multi-host jobs every host must list the same files.
  agreement.check_same_files(f"image folder listing of {root}", splits, root)
  return FolderListing(splits, split_roots)


@dataclasses.dataclass(frozen=True)
class FolderClasses:
  """The class folders of an image folder: `names` sorted (a name's index is its label) and, per split,
  `labels[split]: i32[n]` aligned with `FolderListing.splits[split]`."""
  names: list[str]
  labels: dict[str, np.ndarray]


def class_folders(listing: FolderListing, *, train_split: str) -> FolderClasses:
  """Labels each listed image by its class folder, as torchvision's ImageFolder does.

  An image's class is the first sub-folder of its path below its split root (deeper folders belong to it);
  the classes are the train split's class folder names in sorted order, indexed 0..C-1.

  Raises:
    ConfigError: an image lies directly in a split root (no class folder), or another split has images in a
      class folder the train split does not have (its index would be undefined).
  """
  found = {s: [_class_folder(p, listing.split_roots[s]) for p in paths] for s, paths in listing.splits.items()}
  loose: dict[str, list[str]] = {}  # Split root -> its loose images (both splits share one without sub-folders).
  for split, folders in found.items():
    root = listing.split_roots[split]
    loose.setdefault(root, []).extend(os.path.basename(p) for p, f in zip(listing.splits[split], folders)
                                      if f is None)
  for root, names in loose.items():
    if names:
      raise ConfigError(
          f"config.data.class_folders = True needs every image in a class sub-folder of {root}, but "
          f"{len(names)} image(s) lie directly in it ({_few(sorted(names))}): move them into a class folder, "
          "or set config.data.class_folders = False")
  names = sorted(set(found[train_split]))
  index = {name: i for i, name in enumerate(names)}
  for split, folders in found.items():
    unknown = sorted(set(folders) - index.keys())
    if unknown:
      hint = (" (the hash holdout can put all of a small class's images in the held-out share: add images "
              "or lower config.data.holdout_fraction)"
              if listing.split_roots[split] == listing.split_roots[train_split] else "")
      raise ConfigError(
          f"config.data.class_folders = True: split {split!r} of {listing.split_roots[split]} has images in "
          f"class folder(s) {_few(unknown)} that the train split {train_split!r} does not have (its "
          f"{len(names)} classes: {_few(names)}); labels are indices into the train split's class folders, so "
          f"every class needs training images{hint}")
  labels = {s: np.asarray([index[f] for f in folders], np.int32) for s, folders in found.items()}
  return FolderClasses(names, labels)


def _class_folder(path: str, split_root: str) -> str | None:
  """The first folder of `path` below `split_root`, or None for a file directly in it."""
  parts = os.path.relpath(path, split_root).split(os.sep)
  return parts[0] if len(parts) > 1 else None


def _few(names: list[str], shown: int = 5) -> str:
  more = f", ... ({len(names)} in all)" if len(names) > shown else ""
  return ", ".join(repr(n) for n in names[:shown]) + more


def _to_8_bits(im: Image.Image) -> Image.Image:
  """A 16-bit greyscale image as mode 'L', round(x * 255 / 65535); other images unchanged."""
  if im.mode not in _SIXTEEN_BIT:
    return im
  x = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
  return Image.fromarray(((x * 255 + 32767) // 65535).astype(np.uint8))  # u8[h, w] -> mode 'L'.


def decode_file(path: bytes, channels: int) -> tuple[np.ndarray, bool]:
  """Decodes one vetted file with PIL: (u8[h, w, channels], True), or (u8[1, 1, channels], False)."""
  name = path.decode("utf-8")
  try:
    with _open(name) as im:
      too_large = _too_large(im)  # Checked again: the file may have been replaced since it was listed.
      if too_large:
        raise ValueError(too_large)
      im.load()  # Forces a full decode so corrupt data raises here, not later.
      if not _accepts(im.mode, channels):
        raise ValueError(f"mode {im.mode} cannot give {channels} channel(s)")
      if channels == 3 and im.mode == "P":
        # The same colours as P -> RGB, without PIL's warning about palette transparency stored as bytes.
        im = im.convert("RGBA")
      im = _to_8_bits(im).convert("L" if channels == 1 else "RGB")
      array = np.asarray(im, dtype=np.uint8)
    return array.reshape(array.shape[:2] + (channels,)), True
  except Exception as e:  # pylint: disable=broad-except  # Any failure means "skip this file".
    BAD_FILES.report(name, f"decoding failed: {type(e).__name__}: {e}")
    return np.zeros((1, 1, channels), np.uint8), False
