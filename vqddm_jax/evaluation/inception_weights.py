"""The weights file of the FID Inception network: its .npz layout, and conversion from pytorch-fid.

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
`FC_SHAPES` the optional classifier.

Obtaining the weights (needs network access once, anywhere): download pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (GitHub project mseitzer/pytorch-fid, release "fid_weights"; it is the
TF FID graph of 2015-12-05 converted to PyTorch), then, with this project installed (no PyTorch needed):

  python -m vqddm_jax.evaluation.inception_weights \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

and pass `--config.eval.inception_weights=inception_fid.npz`. Where PyTorch is at hand,
`np.savez('sd.npz', **{k: v.numpy() for k, v in torch.load(PTH).items()})` gives a state-dict .npz that
`--pth=sd.npz` converts the same way.

Conversion (`convert_state_dict`): `X.conv.weight` (OIHW) → `params/X/conv/kernel` (HWIO),
`X.bn.weight` → `params/X/bn/scale`, `X.bn.bias` → `params/X/bn/bias`, `X.bn.running_mean` →
`batch_stats/X/bn/mean`, `X.bn.running_var` → `batch_stats/X/bn/var`, with X's dots turned into '/';
`fc.weight` (1008×2048) → `params/fc/kernel` (transposed), `fc.bias` → `params/fc/bias`;
`num_batches_tracked` and any `AuxLogits` are dropped.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Any, Mapping

import numpy as np

from vqddm_jax.errors import MissingInputError, UserError

FORMAT = "vqddm_jax.fid_inception.v1"
_HOW_TO = ("produce it from pytorch-fid's pt_inception-2015-12-05-6726825d.pth with "
           "`python -m vqddm_jax.evaluation.inception_weights --pth=PTH --out=NPZ` "
           "(see vqddm_jax/evaluation/inception_weights.py; nothing is downloaded by this project)")
# The 2015 graph's classifier layer (1008 outputs), which the Inception Score reads.
FC_SHAPES = {"params/fc/kernel": (2048, 1008), "params/fc/bias": (1008,)}
_BN_SUFFIXES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


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
                            f"vqddm_jax/evaluation/inception_weights.py; {_HOW_TO}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path!r} is not a readable .npz of FID Inception weights ({e}); {_HOW_TO}") from e
  fmt = arrays.pop("__format__", None)
  if fmt is None or str(fmt) != FORMAT:
    raise ValueError(f"{path!r} has format {None if fmt is None else str(fmt)!r}, expected {FORMAT!r} "
                     f"(was it converted? a raw state-dict .npz must go through the converter); {_HOW_TO}")
  _check_layout(arrays, _with_optional(arrays, expected_shapes, optional_shapes), path)
  return unflatten({k: np.asarray(v, np.float32) for k, v in arrays.items()})


def _with_optional(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                   optional: Mapping[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
  """`expected`, plus the optional arrays when the file holds any of them (then it must hold all)."""
  optional = optional or {}
  return {**expected, **optional} if set(optional) & set(arrays) else dict(expected)


def _check_layout(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
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


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid / torchvision Inception3 state dict → flat Flax layout (f32; mapping in the module doc).

  Args:
    state_dict: {torch name: array}, e.g. from `torch_pickle.read_state_dict`.

  Returns:
    {flat key: f32 array}; not yet checked against the network (see `convert_pytorch_fid_weights`).

  Raises:
    ValueError: a key that is neither a BasicConv2d parameter nor one of the dropped ones.
  """
  out = {}
  for name, value in state_dict.items():
    parts = name.split(".")
    if parts[0] == "AuxLogits" or parts[-1] == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    if name == "fc.weight" and value.ndim == 2:
      out["params/fc/kernel"] = np.ascontiguousarray(value.T)
    elif name == "fc.bias":
      out["params/fc/bias"] = value
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
      out["params/" + "/".join(parts[:-2]) + "/conv/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_SUFFIXES:
      collection, leaf = _BN_SUFFIXES[parts[-1]]
      out[f"{collection}/" + "/".join(parts[:-2]) + f"/bn/{leaf}"] = value
    else:
      raise ValueError(f"unexpected entry {name!r} {value.shape} in the state dict: not an Inception-v3 "
                       "BasicConv2d parameter (is this pytorch-fid's pt_inception-2015-12-05 file?)")
  return out


def read_torch_or_npz(path: str) -> dict[str, np.ndarray]:
  """A state dict from a torch.save file (read without PyTorch) or from an .npz of {torch name: array}."""
  if not os.path.isfile(path):
    raise MissingInputError(f"no file at {path!r} (expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                            "or an .npz of its state dict)")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      is_npz = all(n.endswith(".npy") for n in zf.namelist())
    if is_npz:
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
  from vqddm_jax.evaluation import torch_pickle  # pylint: disable=g-import-not-at-top
  return torch_pickle.read_state_dict(path)


def convert_pytorch_fid_weights(state_dict_path: str, out_path: str) -> str:
  """Converts pytorch-fid's Inception weights into this project's .npz layout.

  Args:
    state_dict_path: `pt_inception-2015-12-05-6726825d.pth` itself (zip or legacy torch.save format, read
      without PyTorch), or an .npz of its state dict ({torch name: array}).
    out_path: the .npz to write (parent directories are created).

  Returns:
    `out_path`, after checking every key and shape against the Flax network.

  Raises:
    FileNotFoundError: `state_dict_path` does not exist (a MissingInputError).
    ValueError: the input is not the FID Inception state dict; a `safe_pickle.WeightsFileError` (also a
      UserError) when the file is refused: not a torch.save, a global that could run code, bad tensor geometry.
  """
  from vqddm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top  (it imports this module)
  flat = convert_state_dict(read_torch_or_npz(state_dict_path))
  _check_layout(flat, _with_optional(flat, inception.variable_shapes(), FC_SHAPES), state_dict_path)
  return save_npz(unflatten(flat), out_path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vqddm_jax.evaluation.inception_weights",
      description="Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz of its state "
                  "dict) into the .npz that --config.eval.inception_weights expects. Needs no PyTorch.")
  parser.add_argument("--pth", required=True, help="input: the .pth file, or an .npz of its state dict")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  try:
    out = convert_pytorch_fid_weights(args.pth, args.out)
  except UserError as e:  # A refused or missing input file: one line, no traceback (as argparse does).
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
