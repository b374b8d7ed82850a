"""A short hash of the code a process runs, so that the hosts of one job can check they all run the same code."""
from __future__ import annotations

import hashlib
import pathlib

# The repository root: the folder that holds the `vqddm_jax` package, `configs/` and `requirements.txt`.
ROOT = pathlib.Path(__file__).resolve().parent.parent


def code_files(root: pathlib.Path | str | None = None) -> list[pathlib.Path]:
  """The files the version covers: `vqddm_jax/**/*.py`, `configs/*.py`, `requirements.txt`, sorted by path."""
  root = pathlib.Path(root or ROOT)
  files = [*(root / "vqddm_jax").rglob("*.py"), *(root / "configs").glob("*.py"), root / "requirements.txt"]
  return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def code_version(root: pathlib.Path | str | None = None) -> str:
  """First 12 hex digits of a sha256 over the relative paths and bytes of `code_files(root)`."""
  root = pathlib.Path(root or ROOT)
  digest = hashlib.sha256()
  for path in code_files(root):
    data = path.read_bytes()
    # Path and length frame each file, so moving bytes between files or renaming one changes the hash.
    digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
    digest.update(data)
  return digest.hexdigest()[:12]
