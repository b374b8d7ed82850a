"""Whole-file reads and writes on `etils.epath` paths (local or `gs://`): JSON, text, PNG, NPZ and NPY.

Writes are atomic: the bytes go to a temporary sibling first, which is then renamed, so a reader (another host,
a rerun after a crash) never sees half a file. Arrays are read with `allow_pickle=False`.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """An epath for a local path (`~` expanded, made absolute) or a URI (`gs://...`, kept as it is)."""
  text = os.fspath(path)
  # `~` arrives unexpanded when the shell did not see it (quoted, or after `--workdir=`): without this it
  # would name a folder `~` in the current directory.
  return epath.Path(text if "://" in text else os.path.abspath(os.path.expanduser(text)))


def write_bytes(path: epath.Path, data: bytes) -> epath.Path:
  """Writes `data` whole: to a temporary sibling first, then renamed, so readers never see half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)
  return path


def read_json(path: epath.Path) -> Any | None:
  """The JSON value in `path`, or None when the file does not exist."""
  return json.loads(path.read_text()) if path.exists() else None


def write_json(path: epath.Path, value: Any) -> epath.Path:
  return write_bytes(path, (json.dumps(value, indent=1, default=float) + "\n").encode())


def write_text(path: epath.Path, text: str) -> epath.Path:
  return write_bytes(path, text.encode())


def write_png(path: epath.Path, picture: np.ndarray) -> epath.Path:
  """Writes a `u8[H, W, C]` picture (C = 1 or 3) as PNG."""
  from PIL import Image  # Only writers of pictures need it.
  buf = io.BytesIO()
  Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(buf, format="PNG")
  return write_bytes(path, buf.getvalue())


def write_npz(path: epath.Path, **arrays: np.ndarray) -> epath.Path:
  """Writes named arrays as a compressed `.npz`."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return write_bytes(path, buf.getvalue())


def read_npz(path: epath.Path) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file, loaded eagerly."""
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def write_npy(path: epath.Path, array: np.ndarray) -> epath.Path:
  buf = io.BytesIO()
  np.save(buf, array)
  return write_bytes(path, buf.getvalue())


def read_npy(path: epath.Path) -> np.ndarray:
  return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def same_record(path: epath.Path, record: Mapping[str, Any], key: str | None = None) -> bool:
  """True when `path` holds a JSON object (or one under `key` of it) whose entries named in `record` equal
  it (JSON round trip)."""
  stored = read_json(path)
  if key is not None:
    stored = stored.get(key) if isinstance(stored, dict) else None
  wanted = json.loads(json.dumps(record, default=float))
  return isinstance(stored, dict) and all(stored.get(k) == v for k, v in wanted.items())
