"""Reads a PyTorch state-dict file (`torch.save` of a dict of tensors) into NumPy arrays without PyTorch.

Both on-disk formats of `torch.save` are supported:
- zip (the default since PyTorch 1.6): `<name>/data.pkl` is a pickle whose tensors refer to storages by key,
  and each storage is the raw little-endian bytes of `<name>/data/<key>`;
- legacy (before 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row (magic number,
  protocol version, system info, the object, the list of storage keys), then for each key an int64 element
  count and the raw bytes.

Every one of those pickles goes through `vqddm_jax.safe_pickle`: the headers may refer to no global at all,
the object only to the tensor-rebuild functions, the storage types and OrderedDict, so reading an untrusted
file cannot run code. Tensor geometry is checked before any byte is copied: offsets, sizes and strides must be
non-negative ints, a view must stay inside its storage and hold no more elements than it, and each storage's
bytes must be exactly its declared element count. Any failure is one `safe_pickle.WeightsFileError` naming the
file. A caller reading a file that holds more than a state dict (`convert.lightning_ckpt`: a Lightning
checkpoint) widens the table, supplies stand-ins for other globals and picks the state dict out of the object;
then only the picked tensors' storages are read.
"""
from __future__ import annotations

import collections
import math
import os
import struct
import zipfile
import zlib
from typing import Any, Callable, Mapping

import numpy as np

from vqddm_jax import safe_pickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

# Named tuples, so that a BUILD opcode in the pickle cannot change them after they were made.
_StorageType = collections.namedtuple("_StorageType", "name dtype")  # Stands for torch.FloatStorage etc.
_Storage = collections.namedtuple("_Storage", "key dtype numel")  # Bytes come later (reader.data[key]).
_LazyTensor = collections.namedtuple("_LazyTensor", "storage offset size stride")  # A strided view of one.


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: irrelevant for weights.
  return _LazyTensor(storage, storage_offset, size, stride)  # Checked in `_Reader.materialise`.


def _rebuild_parameter(data, *unused):
  del unused
  return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, np.dtype(t).newbyteorder("<")) for name, t in _STORAGE_DTYPES.items()},
}


def is_tensor(x: Any) -> bool:
  """Whether `x` is a tensor of the pickle being read (what a `read_state_dict` `pick` looks for)."""
  return isinstance(x, _LazyTensor)


def _is_int(x: Any) -> bool:
  return type(x) is int  # pylint: disable=unidiomatic-typecheck  (no bool, no float, no object with __index__)


class _Reader:
  """One file's storages (declared by the pickle, then filled with bytes) and its error messages."""

  def __init__(self, path: str, what: str = "state dict", allowed: Mapping[tuple[str, str], Any] | None = None,
               unknown: Callable[[str, str], Any] | None = None, pick: Callable[[Any], Any] | None = None):
    self.path, self.what, self.unknown, self.pick = path, what, unknown, pick
    self.allowed = {**_ALLOWED, **(allowed or {})}
    self.storages: dict[str, _Storage] = {}
    self.data: dict[str, np.ndarray] = {}

  def error(self, message: str) -> safe_pickle.WeightsFileError:
    return safe_pickle.WeightsFileError(f"{self.path}: {message}")

  def load(self, f, what: str) -> Any:
    """The pickle that holds the state dict (tensors refer to storages by persistent id)."""
    obj = safe_pickle.load(f, path=self.path, what=what, allowed=self.allowed,
                           persistent_load=self.persistent_load, unknown=self.unknown)
    if self.pick is None:
      return obj
    try:
      return self.pick(obj)
    except safe_pickle.Malformed as e:
      raise self.error(f"cannot read the {what}: {e}") from None

  def needed(self, obj: Any) -> set[str]:
    """The storage keys whose bytes are read: all for a plain state dict; with `pick` (a checkpoint that
    holds more than the weights: optimiser moments...), only those of the picked tensors."""
    if self.pick is None or not isinstance(obj, dict):
      return set(self.storages)
    return {t.storage.key for t in obj.values()
            if isinstance(t, _LazyTensor) and isinstance(t.storage, _Storage)}

  def persistent_load(self, pid: Any) -> _Storage:
    # zip: ('storage', type, key, location, numel); legacy: the same plus view metadata (None here).
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
      raise safe_pickle.Malformed(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if len(pid) == 6 and pid[5] is not None:
      raise safe_pickle.Malformed("storage views (pre-1.0 PyTorch files) are not supported")
    if not isinstance(storage_type, _StorageType):
      raise safe_pickle.Malformed(f"unsupported storage type {storage_type!r}")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
      raise safe_pickle.Malformed(f"storage key {key!r} with element count {numel!r}: expected a string and "
                                  "an int >= 0")
    storage = _Storage(key, storage_type.dtype, numel)
    if self.storages.setdefault(key, storage) != storage:
      raise safe_pickle.Malformed(f"storage {key!r} is declared twice, as {self.storages[key][1:]} and "
                                  f"{storage[1:]}")
    return storage

  def fill(self, key: str, raw: bytes) -> None:
    storage = self.storages[key]
    if len(raw) != storage.numel * storage.dtype.itemsize:
      raise self.error(f"storage {key!r} holds {len(raw)} bytes, but its pickle declares {storage.numel} "
                       f"{storage.dtype.name} elements ({storage.numel * storage.dtype.itemsize} bytes)")
    self.data[key] = np.frombuffer(raw, dtype=storage.dtype)

  def materialise(self, name: str, t: _LazyTensor) -> np.ndarray:
    """The array of tensor `name`, after checking that its view stays inside its storage's bytes."""
    storage, offset, size, stride = t
    if isinstance(size, list):
      size = tuple(size)
    if isinstance(stride, list):
      stride = tuple(stride)
    where = f"tensor {name!r:.80} (offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80})"
    if not isinstance(storage, _Storage):
      raise self.error(f"{where} refers to a {type(storage).__name__}, not a storage")
    if (not _is_int(offset) or not isinstance(size, tuple) or not isinstance(stride, tuple)
        or len(size) != len(stride) or not all(_is_int(v) for v in size + stride)):
      raise self.error(f"{where}: expected an int offset and int tuples of equal length for size and stride")
    if offset < 0 or any(v < 0 for v in size + stride):
      raise self.error(f"{where}: negative offsets, sizes and strides are refused")
    count = math.prod(size)
    # A view with more elements than its storage repeats some (a broadcast, never a weight): refusing it
    # bounds the memory a file can ask for by its own size.
    if count > storage.numel:
      raise self.error(f"{where} has {count} elements, more than its storage's {storage.numel}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride) if n > 1)  # Largest element index touched.
    if last >= storage.numel if count else offset > storage.numel:  # An empty view may start at the end.
      raise self.error(f"{where} reaches element {last} of a storage of {storage.numel} elements")
    data = self.data.get(storage.key)
    if data is None:
      raise self.error(f"{where} refers to storage {storage.key!r}, whose bytes the file does not contain")
    if count == 0:
      return np.zeros(size, storage.dtype)
    # Strides of dimensions of size 1 never move: 0 keeps numpy from multiplying a huge one into an overflow.
    strides = [s * storage.dtype.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
    return np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=strides).copy()

  def state_dict(self, obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
      raise self.error(f"the file holds a {type(obj).__name__}, not a state dict")
    return {str(name): self.materialise(str(name), value)
            for name, value in obj.items() if isinstance(value, _LazyTensor)}


def _read_zip(reader: _Reader) -> dict[str, np.ndarray]:
  path = reader.path
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
      if len(pkl) != 1:
        raise reader.error("a zip file but not a torch.save archive (no single data.pkl)")
      prefix = pkl[0][:-len("data.pkl")]
      if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
        raise reader.error(f"a big-endian torch.save ({prefix}byteorder); only little-endian files are read")
      with zf.open(pkl[0]) as f:
        obj = reader.load(f, f"{reader.what} ({pkl[0]})")
      needed = reader.needed(obj)
      for key, storage in reader.storages.items():
        if key not in needed:
          continue
        member = f"{prefix}data/{key}"
        if member not in names:
          raise reader.error(f"storage {key!r} has no member {member} in the archive")
        # Checked before reading, so a declared size cannot make us read (or decompress) more.
        if zf.getinfo(member).file_size != storage.numel * storage.dtype.itemsize:
          raise reader.error(f"storage {key!r} ({member}) holds {zf.getinfo(member).file_size} bytes, but "
                             f"its pickle declares {storage.numel} {storage.dtype.name} elements")
        reader.fill(key, zf.read(member))
  except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:  # Runtime: encrypted.
    raise reader.error(f"a damaged zip archive ({type(e).__name__}: {e})") from e
  return reader.state_dict(obj)


def _read_legacy(reader: _Reader) -> dict[str, np.ndarray]:
  path = reader.path

  def header(f, what: str) -> Any:
    return safe_pickle.load(f, path=path, what=f"legacy torch.save {what}")

  with open(path, "rb") as f:
    file_size = os.fstat(f.fileno()).st_size
    try:
      magic = header(f, "magic number (1st pickle)")
    except safe_pickle.RefusedGlobalError:
      raise
    except safe_pickle.WeightsFileError as e:  # Anything that does not even start with a pickle.
      raise reader.error("not a PyTorch file (neither a zip archive nor a legacy torch.save)") from e
    if not _is_int(magic) or magic != _LEGACY_MAGIC:
      raise reader.error("not a PyTorch file (bad magic number)")
    header(f, "protocol version (2nd pickle)")
    header(f, "system info (3rd pickle)")  # Endianness, type sizes; PyTorch only writes little-endian files.
    obj = reader.load(f, f"{reader.what} (4th pickle)")
    needed = reader.needed(obj)
    keys = header(f, "storage keys (5th pickle)")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
      raise reader.error(f"the storage keys (5th pickle) are not a list of distinct strings: {keys!r:.200}")
    for key in keys:
      storage = reader.storages.get(key)
      if storage is None:
        raise reader.error(f"the storage keys list {key!r}, which no tensor declares")
      head = f.read(8)
      numel = struct.unpack("<q", head)[0] if len(head) == 8 else None
      if numel != storage.numel or numel * storage.dtype.itemsize > file_size - f.tell():
        raise reader.error(f"storage {key!r} is truncated or inconsistent: its header says {numel} elements, "
                           f"its pickle {storage.numel}, and {file_size - f.tell()} bytes are left")
      if key in needed:
        reader.fill(key, f.read(numel * storage.dtype.itemsize))
      else:
        f.seek(numel * storage.dtype.itemsize, os.SEEK_CUR)
    if f.tell() != file_size:  # Bytes no storage declares: the element counts do not describe this file.
      raise reader.error(f"{file_size - f.tell()} bytes follow the last storage; the storages' element counts "
                         "do not match the file")
  return reader.state_dict(obj)


def read_state_dict(path: str, *, what: str = "state dict",
                    allowed: Mapping[tuple[str, str], Any] | None = None,
                    unknown: Callable[[str, str], Any] | None = None,
                    pick: Callable[[Any], Any] | None = None) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save`d state dict, as NumPy arrays, without importing PyTorch.

  Args:
    path: a `.pth` / `.pt` file written by `torch.save(state_dict, path)` (zip or legacy format).
    what: what the file holds, for messages.
    allowed: globals the pickle may use besides the tensor-rebuild ones (see `safe_pickle.load`).
    unknown: `safe_pickle.load`'s stand-in maker for other globals; None refuses them.
    pick: maps the unpickled object to the state dict inside it (a checkpoint holding more than weights);
      only the storages of the picked tensors are read. It raises `safe_pickle.Malformed` to refuse the file.

  Returns:
    {name: array} in the file's order, with the tensors' dtypes; non-tensor entries are dropped.

  Raises:
    safe_pickle.WeightsFileError (a UserError and a ValueError): the file is not a torch.save of a plain
      state dict, refers to anything that could run code, or describes tensors outside its storages.
  """
  reader = _Reader(path, what, allowed, unknown, pick)
  if zipfile.is_zipfile(path):
    return _read_zip(reader)
  return _read_legacy(reader)
