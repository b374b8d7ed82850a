"""Reads the weights of a PyTorch Lightning `.ckpt` (or a plain `torch.save`d state dict) without PyTorch.

A Lightning checkpoint is a `torch.save` of a dict: `state_dict` (the tensors), beside `epoch`, `global_step`,
`pytorch-lightning_version`, `optimizer_states`, `lr_schedulers`, `callbacks` (keyed by, or holding objects
of, Lightning's and the user's callback classes) and `hyper_parameters` (omegaconf containers, argparse
namespaces, ...). Those objects belong to classes this project does not have and must never import.

Safety argument (what reading an untrusted `.ckpt` can and cannot do):
- Every pickle is read by `vqddm_jax.safe_pickle.load` through `evaluation.torch_pickle`: no global is ever
  imported. Globals in the table (the tensor-rebuild functions, `collections.OrderedDict`, and the few
  constructors below, all replaced by our own code that builds plain data) resolve to our functions.
- Any other global (a callback class, `omegaconf.dictconfig.DictConfig`, but also `os.system`) resolves to a
  *stand-in*: a fresh class of this module, made from the two names alone, that holds data and runs nothing.
  The pickle may name it, use it as a dict key, and build an instance of it the way `__reduce_ex__(2)` does
  (NEWOBJ, `copyreg._reconstructor`, then BUILD / SETITEMS / APPENDS, which only store what they are given):
  that is how genuine checkpoints hold callback and hyper-parameter objects, so they still read.
- Calling a stand-in (REDUCE, or INST / OBJ with arguments) is what a payload must do to run anything (e.g.
  REDUCE on `os.system` or `builtins.eval`), and it is refused: the stand-in's metaclass raises
  `safe_pickle.RefusedCall`, and reading stops with one `RefusedGlobalError` naming the file and the global.
  Nothing the pickle names was imported, so nothing ran before the refusal either.
- Tensors are checked against their storages before any byte is copied (`torch_pickle`), and only the
  storages of `state_dict`'s tensors are read: optimiser moments stay on disk.

JAX-free: NumPy and the standard library only.
"""
from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np

from vqddm_jax import safe_pickle
from vqddm_jax.errors import MissingInputError
from vqddm_jax.evaluation import torch_pickle

# Top-level keys of a Lightning checkpoint; one of them besides `state_dict` tells it from any other dict.
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "optimizer_states", "callbacks",
                  "hyper_parameters", "lr_schedulers")


class _StandInMeta(type):
  """The metaclass of stand-ins: calling one (REDUCE, INST/OBJ with arguments) is refused."""

  def __call__(cls, *args, **kwargs):
    raise safe_pickle.RefusedCall(cls.global_name)

  def __repr__(cls) -> str:
    return f"<stand-in for {cls.global_name}>"


class StandIn(metaclass=_StandInMeta):
  """An object of a class outside the table, kept as inert data: what NEWOBJ's arguments, BUILD's state,
  SETITEMS' items and APPENDS' items were. It has no behaviour of the class it stands for."""
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, list=[])
    return obj

  def __setstate__(self, state: Any) -> None:
    self.__dict__["state"] = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.__dict__["items"][key] = value

  def append(self, value: Any) -> None:
    self.__dict__["list"].append(value)

  def extend(self, values: Any) -> None:
    self.__dict__["list"].extend(values)

  def __repr__(self) -> str:
    return f"<stand-in object of {type(self).global_name}>"


def _stand_in(module: str, name: str) -> type:
  """A fresh stand-in class for the global `module.name` (nothing is imported)."""
  return _StandInMeta(name, (StandIn,), {"global_name": f"{module}.{name}", "__module__": __name__})


def _reconstructor(cls: Any, base: Any, state: Any) -> StandIn:
  # copyreg._reconstructor(cls, base, state): what protocols 0 and 1 write for an object; only stand-in
  # classes are built, and neither `base` nor `cls` is called.
  del base
  if not isinstance(cls, _StandInMeta):
    raise safe_pickle.Malformed(f"copyreg._reconstructor of {cls!r:.80}, which is not an object's class")
  obj = StandIn.__new__(cls)
  obj.__setstate__(state)
  return obj


def _newobj(cls: Any, *args: Any) -> StandIn:
  # copyreg.__newobj__(cls, *args) as a REDUCE (protocols 0/1 of a __reduce_ex__ result): as NEWOBJ.
  if not isinstance(cls, _StandInMeta):
    raise safe_pickle.Malformed(f"copyreg.__newobj__ of {cls!r:.80}, which is not an object's class")
  return StandIn.__new__(cls, *args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
  # How protocol 2 (torch.save's) writes a `bytes`: _codecs.encode(str, 'latin1'). No other codec is looked up.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise safe_pickle.Malformed(f"_codecs.encode({type(text).__name__}, {encoding!r:.40}) is not a pickled "
                                "bytes")
  return text.encode("latin1")


def _defaultdict(*unused: Any) -> dict:
  # omegaconf pickles a defaultdict(dict) cache; the factory is never kept, so nothing can call it.
  return collections.defaultdict()


def _collection(kind: type) -> Any:
  def build(items: Any = ()) -> Any:
    if not isinstance(items, (list, tuple)):
      raise safe_pickle.Malformed(f"{kind.__name__}() of a {type(items).__name__}, not a list")
    return kind(items)
  return build


# The callables a Lightning checkpoint's pickle calls outside its tensors, each our own code building data.
# `__builtin__` is how protocol 2 spells `builtins` (the unpickler does not translate names it is asked for).
_CONSTRUCTORS = {
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("_codecs", "encode"): _encode,
    ("collections", "defaultdict"): _defaultdict,
    **{(m, n): _collection(k) for m in ("builtins", "__builtin__")
       for n, k in (("set", set), ("frozenset", frozenset))},
}


def _pick(obj: Any, info: dict) -> dict:
  """The state dict inside a checkpoint: its `state_dict` entry, or the object itself when it is one. Fills
  `info` with the checkpoint's plain entries (epoch, step, version) and the names of the others."""
  if not isinstance(obj, dict):
    raise safe_pickle.Malformed(f"it holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
  inner = obj.get("state_dict")
  if isinstance(inner, dict):
    info.update({k: v for k, v in obj.items() if k in LIGHTNING_KEYS and isinstance(v, (int, str))})
    info["other_entries"] = sorted(str(k) for k, v in obj.items() if k != "state_dict" and k not in info)
    return inner
  if any(torch_pickle.is_tensor(v) for v in obj.values()):
    return obj
  keys = ", ".join(repr(k) for k in list(obj)[:8])
  raise safe_pickle.Malformed(f"no 'state_dict' entry and no tensors at the top level (keys: {keys})")


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The tensors of a Lightning `.ckpt`'s `state_dict` (or of a plain state-dict file), without PyTorch.

  Args:
    path: a `torch.save` file (zip or legacy format) of a Lightning checkpoint dict or of a state dict.

  Returns:
    ({name: array} in the file's order, with the tensors' dtypes; {'epoch', 'global_step',
    'pytorch-lightning_version' where the file has them as plain values, 'other_entries': the names of the
    other top-level entries}; the second is empty for a plain state dict).

  Raises:
    FileNotFoundError: no file at `path` (a `MissingInputError`).
    safe_pickle.WeightsFileError: the file is refused (one line naming it): it calls a global outside the
      table (`RefusedGlobalError`), is not a torch.save of a checkpoint or state dict, or its tensors do not
      fit their storages.
  """
  if not os.path.isfile(path):
    raise MissingInputError(f"no checkpoint file at {path!r}: give the path of a PyTorch Lightning .ckpt "
                            "or a torch.save'd state dict")
  info: dict[str, Any] = {}
  weights = torch_pickle.read_state_dict(path, what="checkpoint", allowed=_CONSTRUCTORS, unknown=_stand_in,
                                         pick=lambda obj: _pick(obj, info))
  return weights, info
