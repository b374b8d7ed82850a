"""A short hash of the code a process runs, so that the hosts of one job can check they all run the same code.

`files_version` is the one hash of a set of files in the project: `code_version` applies it to the code a process
imports; `launch/tpu_vm.py` (which loads this file by its path, as it cannot import the package) applies it to
every file `sync` copies to a TPU worker, for the stamp in the worker's VERSION file. Standard library only.
"""
from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable

# The repository root: the folder that holds the `vqddm_jax` package, `configs/` and `requirements.txt`.
ROOT = pathlib.Path(__file__).resolve().parent.parent


def files_version(root: pathlib.Path | str, paths: Iterable[str]) -> str:
  """First 12 hex digits of a sha256 over the relative paths and bytes of `paths`, sorted by path.

  Args:
    root: the folder the paths are relative to.
    paths: POSIX paths relative to `root` (as `git ls-files` writes them), each of an existing file.
  """
  root = pathlib.Path(root)
  digest = hashlib.sha256()
  for path in sorted(paths):
    data = (root / path).read_bytes()
    # Path and length frame each file, so moving bytes between files or renaming one changes the hash.
    digest.update(f"{path}\0{len(data)}\0".encode())
    digest.update(data)
  return digest.hexdigest()[:12]


def code_files(root: pathlib.Path | str | None = None) -> list[pathlib.Path]:
  """The files the version covers: `vqddm_jax/**/*.py`, `configs/*.py`, `requirements.txt`, sorted by path."""
  root = pathlib.Path(root or ROOT)
  files = [*(root / "vqddm_jax").rglob("*.py"), *(root / "configs").glob("*.py"), root / "requirements.txt"]
  return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def code_version(root: pathlib.Path | str | None = None) -> str:
  """`files_version` of `code_files(root)`: what the processes of one job compare (main, preflight)."""
  root = pathlib.Path(root or ROOT)
  return files_version(root, [f.relative_to(root).as_posix() for f in code_files(root)])
