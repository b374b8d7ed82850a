"""Weights files never run code: a payload in any pickle of any format is refused with one error naming the file.

A payload is an object whose reduction is `os.mkdir(marker)`: a plain `pickle.load` creates the marker folder.
It is put in each pickle the readers see (the five of a legacy torch.save, the zip format's data.pkl, the LPIPS
.ckpt), and each test asserts that the error names the file and that the marker does not exist. Torch files are
written without PyTorch: fake `torch` modules make pickle emit torch's globals. Tensor geometry (offsets, sizes,
strides, storage byte counts) is checked in both formats.
"""
from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from vqddm_jax import safe_pickle
from vqddm_jax.errors import UserError
from vqddm_jax.evaluation import torch_pickle
from vqddm_jax.models import lpips as lpips_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAGIC = 0x1950A86A20F9469CFC6C
STORAGE = np.arange(24, dtype=np.float32)  # Storage "0" of every test file: 24 float32 elements.


class _Payload:
  """Creates the folder `marker` when a plain unpickler reads it (a portable stand-in for os.system)."""

  def __init__(self, marker: pathlib.Path):
    self.marker = str(marker)

  def __reduce__(self):
    return os.mkdir, (self.marker,)


Tensor = collections.namedtuple("Tensor", "offset size stride")  # A view of STORAGE.
_StorageRef = collections.namedtuple("_StorageRef", "key numel")


@pytest.fixture
def write_torch(monkeypatch):
  """write(path, state, *, legacy, numel=24, replace={}): a torch.save file of `state` without PyTorch.

  `state` maps names to `Tensor`s (views of STORAGE, declared with `numel` elements) or to anything else;
  `replace` maps a legacy pickle ("magic", "protocol", "sysinfo", "keys") or "data.pkl" to the object pickled
  in its place.
  """
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
  monkeypatch.setitem(sys.modules, "torch", torch_mod)
  monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

  def dump(f, obj, legacy, numel):
    class P(pickle.Pickler):
      def persistent_id(self, o):
        if isinstance(o, _StorageRef):
          return ("storage", torch_mod.FloatStorage, o.key, "cpu", o.numel) + ((None,) if legacy else ())
        return None

      def reducer_override(self, o):
        if isinstance(o, Tensor):
          return _rebuild_tensor_v2, (_StorageRef("0", numel), *o, False, collections.OrderedDict())
        return NotImplemented

    P(f, protocol=2).dump(obj)

  def write(path, state, *, legacy, numel=24, replace=None):
    replace = replace or {}
    if legacy:
      with open(path, "wb") as f:
        for name, header in (("magic", MAGIC), ("protocol", 1001), ("sysinfo", {"little_endian": True})):
          pickle.dump(replace.get(name, header), f, protocol=2)
        dump(f, state, legacy, numel)
        keys = replace.get("keys", ["0"])
        pickle.dump(keys, f, protocol=2)
        if keys:  # The bytes of storage "0" (the only one), once.
          f.write(struct.pack("<q", numel) + STORAGE.tobytes())
    else:
      with zipfile.ZipFile(path, "w") as zf:
        with zf.open("archive/data.pkl", "w") as f:
          if "data.pkl" in replace:
            pickle.dump(replace["data.pkl"], f, protocol=2)
          else:
            dump(f, state, legacy, numel)
        zf.writestr("archive/data/0", STORAGE.tobytes())
        zf.writestr("archive/version", "3\n")
    return str(path)

  return write


def _assert_one_error_naming(info, path, *words):
  message = str(info.value)
  assert isinstance(info.value, UserError) and "\n" not in message, message
  assert message.startswith(f"{path}: "), message
  for word in words:
    assert word in message, message


@pytest.mark.parametrize("legacy, position, words", [
    (True, "magic", "legacy torch.save magic number"),
    (True, "protocol", "legacy torch.save protocol version"),
    (True, "sysinfo", "legacy torch.save system info"),
    (True, "object", "state dict (4th pickle)"),
    (True, "keys", "legacy torch.save storage keys"),
    (False, "object", "state dict (archive/data.pkl)"),
    (False, "data.pkl", "state dict (archive/data.pkl)"),
])
def test_torch_payload_in_any_pickle_never_runs(tmp_path, write_torch, legacy, position, words):
  marker = tmp_path / "marker"
  state = {"w": Tensor(0, (4, 6), (6, 1))}
  if position == "object":
    state["evil"] = _Payload(marker)
  path = write_torch(tmp_path / "evil.pth", state, legacy=legacy,
                     replace={} if position == "object" else {position: _Payload(marker)})
  with pytest.raises(safe_pickle.RefusedGlobalError) as info:
    torch_pickle.read_state_dict(path)
  _assert_one_error_naming(info, path, "refusing to load", words, f"global {os.mkdir.__module__}.mkdir")
  assert not marker.exists()


def test_lpips_payload_never_runs_even_with_a_matching_checksum(tmp_path, monkeypatch):
  marker, path = tmp_path / "marker", tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": _Payload(marker)}}}, protocol=4))
  # As if the pinned checksum were the payload's (a compromised pin): the unpickler is the last defence.
  monkeypatch.setattr(lpips_lib, "WEIGHTS_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
  with pytest.raises(safe_pickle.RefusedGlobalError) as info:
    lpips_lib.load_lpips_weights(path)
  _assert_one_error_naming(info, path, "LPIPS weights pickle", "mkdir")
  assert not marker.exists()


def test_cli_refuses_payload_with_one_line_and_exit_2(tmp_path, write_torch):
  marker, out = tmp_path / "marker", tmp_path / "out.npz"
  path = write_torch(tmp_path / "evil.pth", {}, legacy=True, replace={"magic": _Payload(marker)})
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  run = subprocess.run([sys.executable, "-m", "vqddm_jax.evaluation.inception_weights", f"--pth={path}",
                        f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr
  assert "Traceback" not in run.stderr and run.stdout == ""
  assert run.stderr.strip().splitlines()[-1].startswith(
      f"python -m vqddm_jax.evaluation.inception_weights: error: {path}: refusing to load"), run.stderr
  assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("offset, size, stride, words", [
    (-1, (4,), (1,), "negative"),
    (3, (4,), (-1,), "negative"),
    (0, (2,), (-2**40,), "negative"),  # Crashed the old reader (SIGSEGV).
    (0, (-1,), (1,), "negative"),
    (22, (4,), (1,), "reaches element 25 of a storage of 24"),
    (0, (3,), (12,), "reaches element 24"),
    (0, (2,), (2**63,), "reaches element"),  # Bytes = stride × 4 overflows int64.
    (0, (2**40, 2**40), (0, 0), "more than its storage's 24"),  # Element count beyond any memory.
    (24, (), (), "reaches element 24"),  # A 0-d tensor just past the end.
    (0, (2, 3), (1,), "equal length"),
    (0, (2.5,), (1,), "int"),
], ids=["neg-offset", "neg-stride", "huge-neg-stride", "neg-size", "past-end", "stride-past-end",
        "stride-overflow", "count-overflow", "scalar-past-end", "rank-mismatch", "float-size"])
def test_bad_tensor_geometry_is_refused(tmp_path, write_torch, legacy, offset, size, stride, words):
  path = write_torch(tmp_path / "bad.pth", {"ok": Tensor(0, (24,), (1,)), "bad": Tensor(offset, size, stride)},
                     legacy=legacy)
  with pytest.raises(safe_pickle.WeightsFileError) as info:
    torch_pickle.read_state_dict(path)
  _assert_one_error_naming(info, path, "tensor 'bad'", words)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("numel, words", [
    (30, "bytes"),  # More elements declared than bytes present.
    (10, "bytes"),  # Fewer: the extra bytes would be silently dropped.
    (-1, "element count -1"),
])
def test_storage_size_must_match_its_bytes(tmp_path, write_torch, legacy, numel, words):
  path = write_torch(tmp_path / "bad.pth", {"w": Tensor(0, (2,), (1,))}, legacy=legacy, numel=numel)
  with pytest.raises(safe_pickle.WeightsFileError) as info:
    torch_pickle.read_state_dict(path)
  _assert_one_error_naming(info, path, words)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_edge_views_inside_the_storage_still_read(tmp_path, write_torch, legacy):
  state = {"empty": Tensor(24, (0, 3), (3, 1)),           # No element: offset may equal the storage size.
           "row": Tensor(20, (1, 4), (10**30, 1)),        # A size-1 dimension's stride never moves.
           "last": Tensor(23, (), ()),
           "t": Tensor(0, (4, 6), (1, 4))}                # A transposed view.
  sd = torch_pickle.read_state_dict(write_torch(tmp_path / "ok.pth", state, legacy=legacy))
  assert sd["empty"].shape == (0, 3) and sd["empty"].dtype == np.float32
  np.testing.assert_array_equal(sd["row"], [[20, 21, 22, 23]])
  assert sd["last"] == 23 and sd["last"].shape == ()
  np.testing.assert_array_equal(sd["t"], STORAGE.reshape(6, 4).T)


def test_legacy_storage_list_must_match_the_tensors(tmp_path, write_torch):
  for keys, words in ((["0", "0"], "not a list of distinct strings"), (["7"], "no tensor declares"),
                      ([], "whose bytes the file does not contain")):
    path = write_torch(tmp_path / "bad.pth", {"w": Tensor(0, (2,), (1,))}, legacy=True, replace={"keys": keys})
    with pytest.raises(safe_pickle.WeightsFileError) as info:
      torch_pickle.read_state_dict(path)
    _assert_one_error_naming(info, path, words)


# The restricted unpickler itself: every opcode that names a global, persistent ids, broken pickles.
@pytest.mark.parametrize("opcode", ["GLOBAL", "INST", "STACK_GLOBAL"])
def test_load_refuses_globals_not_in_the_table(tmp_path, opcode):
  marker = tmp_path / "marker"
  blob = {"GLOBAL": b"cos\nmkdir\n(V%s\ntR." % str(marker).encode(),  # Protocol 0.
          "INST": b"(V%s\nios\nmkdir\n." % str(marker).encode(),
          "STACK_GLOBAL": pickle.dumps(_Payload(marker), protocol=4)}[opcode]
  with pytest.raises(safe_pickle.RefusedGlobalError, match=r"^f\.pkl: refusing to load the header: .*mkdir"):
    safe_pickle.load(io.BytesIO(blob), path="f.pkl", what="header")
  assert not marker.exists()
  pickle.loads(blob)  # The same bytes do run under a plain unpickler.
  assert marker.is_dir()


def test_load_refuses_extension_codes_too():
  code = 0x7FFF1234
  copyreg.add_extension(os.mkdir.__module__, "mkdir", code)
  try:
    blob = pickle.dumps(os.mkdir, protocol=2)
    assert b"\x84" in blob  # EXT4: the global is named by a number from the extension registry.
    with pytest.raises(safe_pickle.RefusedGlobalError, match="mkdir"):
      safe_pickle.load(io.BytesIO(blob), path="f.pkl", what="header")
  finally:
    copyreg.remove_extension(os.mkdir.__module__, "mkdir", code)


def test_load_resolves_the_table_and_refuses_unhandled_persistent_ids():
  blob = pickle.dumps(collections.OrderedDict(a=[1, (2, "x")]), protocol=2)
  got = safe_pickle.load(io.BytesIO(blob), path="f", what="w",
                         allowed={("collections", "OrderedDict"): collections.OrderedDict})
  assert got == collections.OrderedDict(a=[1, (2, "x")]) and type(got) is collections.OrderedDict

  class P(pickle.Pickler):
    def persistent_id(self, obj):
      return "id-1" if obj == "ref" else None
  buf = io.BytesIO()
  P(buf, protocol=2).dump(["ref"])
  with pytest.raises(safe_pickle.WeightsFileError, match="f: cannot read the w: it holds a persistent id"):
    safe_pickle.load(io.BytesIO(buf.getvalue()), path="f", what="w")
  assert safe_pickle.load(io.BytesIO(buf.getvalue()), path="f", what="w", persistent_load=str.upper) == ["ID-1"]


@pytest.mark.parametrize("blob", [b"", b"hello", pickle.dumps(list(range(100)), protocol=2)[:-20]],
                         ids=["empty", "not-a-pickle", "truncated"])
def test_load_broken_pickle_is_one_error_naming_the_file(blob):
  with pytest.raises(safe_pickle.WeightsFileError, match=r"^f\.pkl: cannot read the w: not a readable pickle") as info:
    safe_pickle.load(io.BytesIO(blob), path="f.pkl", what="w")
  assert isinstance(info.value, (UserError, pickle.UnpicklingError, ValueError)) and "\n" not in str(info.value)


def test_big_endian_zip_is_refused(tmp_path, write_torch):
  path = write_torch(tmp_path / "be.pth", {"w": Tensor(0, (2,), (1,))}, legacy=False)
  with zipfile.ZipFile(path, "a") as zf:
    zf.writestr("archive/byteorder", "big")
  with pytest.raises(safe_pickle.WeightsFileError) as info:
    torch_pickle.read_state_dict(path)
  _assert_one_error_naming(info, path, "big-endian")
