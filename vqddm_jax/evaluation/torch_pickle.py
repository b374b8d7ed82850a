"""Reads a PyTorch state-dict file (`torch.save` of a dict of tensors) into NumPy arrays without PyTorch.

Both on-disk formats of `torch.save` are supported:
- zip (the default since PyTorch 1.6): `<name>/data.pkl` is a pickle whose tensors refer to storages by key,
  and each storage is the raw little-endian bytes of `<name>/data/<key>`;
- legacy (before 1.6, or `_use_new_zipfile_serialization=False`): four pickles in a row (magic number,
  protocol version, system info, the object), then a pickled list of storage keys, then for each key an
  int64 element count and the raw bytes.

The unpickler resolves only the handful of globals a state dict needs (tensor rebuild functions, storage
types, OrderedDict) and refuses everything else, so reading an untrusted file cannot run code.
"""
from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands for `torch.FloatStorage` etc.: only its element type matters."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat typed buffer; filled when its bytes are read (after the pickle in the legacy format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.data: np.ndarray | None = None


class _LazyTensor:
  """A strided view of a storage, materialised once the storage holds its data."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def materialise(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise ValueError("a tensor refers to a storage whose data the file does not contain")
    if not self.size:
      return data[self.offset].copy()
    itemsize = data.dtype.itemsize
    end = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if end > data.shape[0]:
      raise ValueError(f"tensor of size {self.size} runs past its storage ({data.shape[0]} elements)")
    return np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride]).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: irrelevant for weights.
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickler that knows tensors and storages and nothing else outside the standard containers."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a plain state dict")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: the same plus view metadata (None here).
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views (pre-1.0 PyTorch files) are not supported")
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      self._storages[key] = _Storage(storage_type.dtype, numel)
    return self._storages[key]


def _materialise(obj: Any) -> dict[str, np.ndarray]:
  if not isinstance(obj, dict):
    raise ValueError(f"the file holds a {type(obj).__name__}, not a state dict")
  out = {}
  for name, value in obj.items():
    if isinstance(value, _LazyTensor):
      out[str(name)] = value.materialise()
  return out


def _read_zip(path: str) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ValueError(f"{path}: a zip file but not a torch.save archive (no single data.pkl)")
    prefix = pkl[0][:-len("data.pkl")]
    storages: dict[str, _Storage] = {}
    with zf.open(pkl[0]) as f:
      obj = _Unpickler(f, storages).load()
    for key, storage in storages.items():
      raw = zf.read(f"{prefix}data/{key}")
      storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"), count=storage.numel)
  return _materialise(obj)


def _read_legacy(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # Anything that does not even start with a pickle.
      raise ValueError(f"{path}: not a PyTorch file (neither a zip archive nor a legacy torch.save)") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch file (bad magic number)")
    pickle.load(f)  # Protocol version.
    pickle.load(f)  # System info (endianness, type sizes); PyTorch only writes little-endian files.
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(f, storages).load()
    for key in pickle.load(f):
      storage = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f"{path}: storage {key} is truncated or inconsistent")
      storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
  return _materialise(obj)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save`d state dict, as NumPy arrays, without importing PyTorch.

  Args:
    path: a `.pth` / `.pt` file written by `torch.save(state_dict, path)` (zip or legacy format).

  Returns:
    {name: array} in the file's order, with the tensors' dtypes; non-tensor entries are dropped.

  Raises:
    ValueError: the file is not a torch.save of a plain state dict.
  """
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  return _read_legacy(path)
