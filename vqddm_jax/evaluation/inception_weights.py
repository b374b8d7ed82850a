"""Converting pytorch-fid's FID Inception weights into this project's .npz (layout: `inception_layout`).

The package `vqddm_jax.evaluation` does not import this module: it is also a command line, which `python -m`
runs as `__main__` after importing the package.

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
from typing import Mapping

import numpy as np

from vqddm_jax.errors import MissingInputError, UserError
from vqddm_jax.evaluation import inception, inception_layout

_BN_SUFFIXES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


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
  flat = convert_state_dict(read_torch_or_npz(state_dict_path))
  expected = inception_layout.with_optional(flat, inception.variable_shapes(), inception_layout.FC_SHAPES)
  inception_layout.check_layout(flat, expected, state_dict_path)
  return inception_layout.save_npz(inception_layout.unflatten(flat), out_path)


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
