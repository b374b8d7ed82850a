"""The weights file of the FID Inception network: its .npz layout, written and read here.

Layout (`.npz`, written by `save_npz`, read by `load_npz` / `inception.load_inception`):
- one float32 array per variable, keyed by its Flax path joined with '/', collection first:
    params/<block>[/<branch>]/conv/kernel   f32[kh, kw, C_in, C_out]   (HWIO)
    params/<block>[/<branch>]/bn/scale      f32[C_out]
    params/<block>[/<branch>]/bn/bias       f32[C_out]
    batch_stats/<block>[/<branch>]/bn/mean  f32[C_out]
    batch_stats/<block>[/<branch>]/bn/var   f32[C_out]
  e.g. `params/Mixed_7c/branch3x3dbl_3a/conv/kernel`; block and branch names are torchvision's;
- optionally the 1008-way classifier the Inception Score needs: `params/fc/kernel` f32[2048, 1008] and
  `params/fc/bias` f32[1008] (FID never uses it; files converted without it still give FID);
- `__format__`: the string FORMAT.
`inception.variable_shapes()` lists every expected key with its shape: 94 conv+BN units × 5 = 470 arrays;
`FC_SHAPES` the optional classifier. `inception_weights` converts pytorch-fid's weights into this layout.

A leaf module (NumPy only): both the network (`inception`) and the converter (`inception_weights`, which
needs the network's shapes) import it, and neither imports the other's way back.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping

import numpy as np

FORMAT = "vqddm_jax.fid_inception.v1"
_HOW_TO = ("produce it from pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
           "`python -m vqddm_jax.evaluation.inception_weights --pth=PTH --out=NPZ` "
           "(see vqddm_jax/evaluation/inception_weights.py; nothing is downloaded by this project)")
# The 2015 graph's classifier layer (1008 outputs), which the Inception Score reads.
FC_SHAPES = {"params/fc/kernel": (2048, 1008), "params/fc/bias": (1008,)}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'params': {'A': {'conv': {'kernel': x}}}} → {'params/A/conv/kernel': x} (leaves unchanged)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_npz(variables: Mapping[str, Any], path: str) -> str:
  """Writes {'params', 'batch_stats'} in the layout above (float32); returns `path`."""
  arrays = {k: np.asarray(v, np.float32) for k, v in flatten(variables).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"  # np.savez appends .npz to names without it.
  np.savez(tmp, __format__=np.array(FORMAT), **arrays)
  os.replace(tmp, path)
  return path


def load_npz(path: str, expected_shapes: Mapping[str, tuple[int, ...]],
             optional_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
  """Reads and validates a weights file.

  Args:
    path: the .npz.
    expected_shapes: {flat key: shape}, e.g. `inception.variable_shapes()`.
    optional_shapes: {flat key: shape} of arrays the file may hold (all or none), e.g. `FC_SHAPES`.

  Returns:
    The nested variables {'params': ..., 'batch_stats': ...} of f32 NumPy arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not an .npz of this layout; the message lists missing, unexpected and mis-shaped keys.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights not found at {path!r}: expected a .npz in the layout of "
                            f"vqddm_jax/evaluation/inception_layout.py; {_HOW_TO}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path!r} is not a readable .npz of FID Inception weights ({e}); {_HOW_TO}") from e
  fmt = arrays.pop("__format__", None)
  if fmt is None or str(fmt) != FORMAT:
    raise ValueError(f"{path!r} has format {None if fmt is None else str(fmt)!r}, expected {FORMAT!r} "
                     f"(was it converted? a raw state-dict .npz must go through the converter); {_HOW_TO}")
  check_layout(arrays, with_optional(arrays, expected_shapes, optional_shapes), path)
  return unflatten({k: np.asarray(v, np.float32) for k, v in arrays.items()})


def with_optional(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                  optional: Mapping[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
  """`expected`, plus the optional arrays when the file holds any of them (then it must hold all)."""
  optional = optional or {}
  return {**expected, **optional} if set(optional) & set(arrays) else dict(expected)


def check_layout(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Raises ValueError, naming `what` and the missing, unexpected and mis-shaped keys, unless they match."""
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  wrong = sorted(f"{k}: {tuple(arrays[k].shape)} != {tuple(expected[k])}"
                 for k in set(arrays) & set(expected) if tuple(arrays[k].shape) != tuple(expected[k]))
  if missing or unexpected or wrong:
    def head(items):
      return ", ".join(items[:5]) + (f" … (+{len(items) - 5})" if len(items) > 5 else "")
    raise ValueError(f"{what}: not the FID Inception layout: {len(missing)} missing [{head(missing)}], "
                     f"{len(unexpected)} unexpected [{head(unexpected)}], {len(wrong)} with wrong shapes "
                     f"[{head(wrong)}]")
