"""Name maps from a PyTorch state dict onto a Flax parameter tree, and the check that every name fits.

A map is a list of `Entry`s (Flax path, torch name, layout), built by walking our module's structure the way it
creates its parameters. `apply` checks it against the state dict and against our model's parameter shapes
(`jax.eval_shape` of its init): every tensor of the file is mapped or explicitly ignored, every parameter of
the model has a tensor, and every tensor has the shape the model needs in PyTorch's layout; otherwise one
`WeightsFileError` lists the missing, unexpected and mis-shaped names.

Layouts (PyTorch -> Flax): Conv2d OIHW -> HWIO; Linear [out, in] -> Dense [in, out]; a 1x1 Conv2d used as a
Dense -> `w[:, :, 0, 0].T`; ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out] flipped in space (PyTorch
convolves the stride-dilated input with the flipped kernel, flax's `transpose_kernel=False` with the kernel as
is); a [1] scalar parameter -> a 0-d one; GroupNorm `weight` is the `scale`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from vqddm_jax.safe_pickle import WeightsFileError

# Names quoted in an error message, per kind of problem.
_QUOTED = 8


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a tensor becomes a Flax array: `convert(tensor)`, and the PyTorch shape a Flax shape needs."""
  name: str
  convert: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[tuple], tuple]


SAME = Layout("same", lambda w: w, lambda s: tuple(s))
CONV = Layout("conv", lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))
LINEAR = Layout("linear", lambda w: w.T, lambda s: (s[1], s[0]))
CONV1X1_AS_DENSE = Layout("1x1 conv as dense", lambda w: w[:, :, 0, 0].T, lambda s: (s[1], s[0], 1, 1))
CONV_TRANSPOSE = Layout("transposed conv", lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
                        lambda s: (s[2], s[3], s[0], s[1]))
SCALAR = Layout("scalar", lambda w: w.reshape(()), lambda s: (1,))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str  # Flax path joined with '/', e.g. 'encoder/ResnetBlock_0/conv1/kernel'.
  torch: str  # e.g. 'encoder.down.0.block.0.conv1.weight'.
  layout: Layout = SAME


class NameMap:
  """Collects entries for the parameters our model has (`expected`), so optional ones (a 1x1 shortcut where
  the widths differ) are mapped exactly where our model creates them."""

  def __init__(self, expected: Mapping[str, Any]):
    self.expected = expected
    self.entries: list[Entry] = []

  def add(self, path: str, torch: str, layout: Layout = SAME) -> None:
    self.entries.append(Entry(path, torch, layout))

  def has(self, flax_prefix: str) -> bool:
    return any(p.startswith(flax_prefix + "/") for p in self.expected)

  def conv(self, flax: str, torch: str, layout: Layout = CONV) -> None:
    """A convolution or dense layer: kernel <- weight, and bias <- bias where our layer has one."""
    self.add(f"{flax}/kernel", f"{torch}.weight", layout)
    if f"{flax}/bias" in self.expected:
      self.add(f"{flax}/bias", f"{torch}.bias")

  def norm(self, flax: str, torch: str) -> None:
    self.add(f"{flax}/scale", f"{torch}.weight")
    self.add(f"{flax}/bias", f"{torch}.bias")


@dataclasses.dataclass
class Conversion:
  """What a converter made of a state dict."""
  fields: dict  # The model's config section (`config.vqvae` / `config.prior` keys).
  record: dict  # What else building the model needs (data channels and image size; K and T).
  params: Any  # Our parameter tree, float32 NumPy.
  names: NameMap  # Flax path <- torch name, for the report.
  ignored: list  # Torch names deliberately left out.
  notes: list  # Where the fields not in the shapes came from, for the report.


def flat_shapes(params: Any) -> dict[str, tuple]:
  """{'a/b/kernel': shape} of a parameter tree of arrays or `jax.ShapeDtypeStruct`s."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _head(items: list[str]) -> str:
  return ", ".join(items[:_QUOTED]) + (f", … (+{len(items) - _QUOTED})" if len(items) > _QUOTED else "")


def apply(state: Mapping[str, np.ndarray], names: NameMap, *, source: str, what: str,
          ignored: Iterable[str] = ()) -> dict:
  """Our parameter tree (float32 NumPy) from `state` through `names`, after checking every name and shape.

  Args:
    state: {torch name: array} of the file (`lightning_ckpt.read_checkpoint`).
    names: the map, built for our model's parameters `names.expected` ({flax path: shape}).
    source: the file, for messages.
    what: what the file should hold, for messages (e.g. "taming-transformers VQGAN").
    ignored: torch names deliberately left out (e.g. the training losses' networks).

  Raises:
    WeightsFileError: tensors missing, unexpected or of the wrong shape or dtype; the one-line message lists
      them (PyTorch names and shapes).
  """
  mapped = {e.path for e in names.entries}
  if mapped != set(names.expected) or len(mapped) != len(names.entries):  # Our map is wrong: a bug, not input.
    unmapped, unknown = sorted(set(names.expected) - mapped)[:5], sorted(mapped - set(names.expected))[:5]
    raise AssertionError(f"name map of {what} does not cover our model: unmapped {unmapped}, unknown {unknown}")
  used = {e.torch for e in names.entries} | set(ignored)
  missing = [e.torch for e in names.entries if e.torch not in state]
  extra = [k for k in state if k not in used]
  wrong = []
  for e in names.entries:
    if e.torch in state:
      want, got = e.layout.torch_shape(names.expected[e.path]), np.shape(state[e.torch])
      if got != want or state[e.torch].dtype.kind != "f":
        wrong.append(f"{e.torch} {got} {state[e.torch].dtype} (need {want} float)")
  if missing or extra or wrong:
    raise WeightsFileError(
        f"{source}: not the {what} its shapes describe: {len(missing)} missing [{_head(missing)}]; "
        f"{len(extra)} unexpected [{_head(extra)}]; {len(wrong)} with the wrong shape [{_head(wrong)}]")
  flat = {tuple(e.path.split("/")): np.array(e.layout.convert(state[e.torch]), dtype=np.float32, order="C")
          for e in names.entries}
  return traverse_util.unflatten_dict(flat)


def require(state: Mapping[str, np.ndarray], name: str, ndim: int, *, source: str, what: str) -> tuple:
  """The shape of tensor `name`, which the config inference reads; refuses the file when it is absent."""
  if name not in state or np.ndim(state[name]) != ndim:
    found = "absent" if name not in state else f"of shape {np.shape(state[name])}"
    raise WeightsFileError(f"{source}: not a {what}: tensor {name!r} is {found} (a {ndim}-d tensor is needed; "
                           f"the file's first names: {_head(list(state))})")
  return tuple(np.shape(state[name]))


def count(state: Mapping[str, Any], pattern: Callable[[int], str]) -> int:
  """How many consecutive indices i = 0, 1, ... have some name starting with `pattern(i)`."""
  n = 0
  while any(k.startswith(pattern(n)) for k in state):
    n += 1
  return n
