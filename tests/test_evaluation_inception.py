"""FID Inception port: shapes (traced only), parameter count, weights file layout and conversion."""
from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.evaluation import inception, inception_layout, inception_weights, torch_pickle

# torchvision's Inception3 has 27,161,264 parameters; FID drops AuxLogits (3,326,696) and fc 2048→1000
# (2,049,000); the FID variants of the blocks change no shapes.
FID_INCEPTION_PARAMS = 27_161_264 - 3_326_696 - 2_049_000


@pytest.fixture(scope="module")
def shapes():
  return inception.variable_shapes()


@pytest.fixture(scope="module")
def random_flat(shapes):
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (3, 299, 299, 3), (1, 64, 48, 3)])
def test_feature_shape_from_any_image_size(shape, shapes):
  variables = inception_layout.unflatten(
      {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
  out = jax.eval_shape(lambda v, x: inception.InceptionV3().apply(v, inception.preprocess(x)),
                       variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == (shape[0], inception.FEATURES) and out.dtype == jnp.float32


def test_parameter_count_is_the_fid_inception(shapes):
  assert inception.count_parameters(shapes) == FID_INCEPTION_PARAMS == 21_785_568
  # 94 conv+BN units: a kernel, BN scale and bias each, and two running statistics.
  assert len(shapes) == 94 * 5
  assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Mixed_7c/branch3x3dbl_3a/conv/kernel"] == (1, 3, 384, 384)
  assert shapes["batch_stats/Mixed_6e/branch7x7dbl_5/bn/var"] == (192,)


def test_preprocess_resize_matches_align_corners_false():
  # Reference: PyTorch's bilinear interpolation with align_corners=False, written out from its definition.
  def torch_bilinear_1d(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1 - (src - i0))
    np.add.at(w, (np.arange(n_out), i1), src - i0)
    return w

  x = np.random.default_rng(1).uniform(-1, 1, (1, 7, 5, 1)).astype(np.float32)
  expected = np.einsum("ah,bw,nhwc->nabc", torch_bilinear_1d(7, 299), torch_bilinear_1d(5, 299), x)
  got = np.asarray(inception.preprocess(jnp.asarray(x)))
  assert got.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(got, np.repeat(expected, 3, axis=-1), atol=1e-5)


def test_fid_pools_ignore_padding():
  ones = jnp.ones((1, 5, 5, 2))
  np.testing.assert_array_equal(np.asarray(inception._avg_pool3(ones)), 1.0)


def test_missing_weights_path_raises(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz.*pt_inception-2015-12-05"):
    inception.load_inception(path)


def test_wrong_layout_raises(tmp_path, random_flat):
  path = str(tmp_path / "partial.npz")
  partial = dict(list(random_flat.items())[:10])
  np.savez(path, __format__=np.array(inception_layout.FORMAT), **partial)
  with pytest.raises(ValueError, match="460 missing"):
    inception.load_inception(path)
  raw = str(tmp_path / "raw.npz")
  np.savez(raw, a=np.zeros(3))
  with pytest.raises(ValueError, match="format None"):
    inception.load_inception(raw)


def test_npz_round_trip(tmp_path, random_flat):
  path = inception_layout.save_npz(inception_layout.unflatten(random_flat), str(tmp_path / "w.npz"))
  loaded = inception_layout.flatten(inception.load_inception(path))
  assert loaded.keys() == random_flat.keys()
  for k, v in random_flat.items():
    np.testing.assert_array_equal(loaded[k], v)


def _to_torch_names(flat):
  """The inverse of the documented conversion, written independently: Flax layout → torch state dict."""
  sd = collections.OrderedDict()
  bn = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  for key, value in flat.items():
    collection, *path, leaf = key.split("/")
    base = ".".join(path)
    if leaf == "kernel":
      sd[base + ".weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    else:
      sd[base + "." + bn[leaf]] = value
      if leaf == "var":
        sd[base + ".num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)
  sd["fc.bias"] = np.zeros((1008,), np.float32)
  return sd


def test_convert_state_dict_npz(tmp_path, random_flat):
  src = str(tmp_path / "sd.npz")
  np.savez(src, **_to_torch_names(random_flat))
  out = inception_weights.main(["--pth", src, "--out", str(tmp_path / "conv" / "fid.npz")])
  assert out == 0
  loaded = inception_layout.flatten(inception.load_inception(str(tmp_path / "conv" / "fid.npz")))
  for k, v in random_flat.items():
    np.testing.assert_array_equal(loaded[k], v)


def test_convert_rejects_foreign_state_dict(tmp_path):
  with pytest.raises(ValueError, match="unexpected entry 'layer1.0.conv1.weight'"):
    inception_weights.convert_state_dict({"layer1.0.conv1.weight": np.zeros((64, 64, 3, 3))})
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    inception_weights.convert_pytorch_fid_weights(str(tmp_path / "missing.pth"), str(tmp_path / "o.npz"))


# A writer of torch.save files without PyTorch: fake `torch` modules make pickle emit the same globals.
class _Storage:
  def __init__(self, key, data):
    self.key, self.data = key, data


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


@pytest.fixture
def fake_torch(monkeypatch):
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  storage_types = {}
  for name in ("FloatStorage", "LongStorage", "HalfStorage"):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch_mod, name, cls)
    storage_types[name] = cls
  monkeypatch.setitem(sys.modules, "torch", torch_mod)
  monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
  return _rebuild_tensor_v2, storage_types


def _pickler(file, fake_torch, legacy):
  rebuild, storage_types = fake_torch
  kind = {np.float32: "FloatStorage", np.int64: "LongStorage", np.float16: "HalfStorage"}

  class P(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        pid = ("storage", storage_types[kind[obj.data.dtype.type]], obj.key, "cpu", obj.data.size)
        return pid + (None,) if legacy else pid
      return None

    def reducer_override(self, obj):
      if isinstance(obj, _Tensor):
        return rebuild, (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
      return NotImplemented

  return P(file, protocol=2)


def _save(path, state, storages, fake_torch, legacy):
  if legacy:
    with open(path, "wb") as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      _pickler(f, fake_torch, legacy=True).dump(state)
      pickle.dump(sorted(s.key for s in storages), f, protocol=2)
      for s in sorted(storages, key=lambda s: s.key):
        f.write(struct.pack("<q", s.data.size) + s.data.tobytes())
  else:
    with zipfile.ZipFile(path, "w") as zf:
      with zf.open("archive/data.pkl", "w") as f:
        _pickler(f, fake_torch, legacy=False).dump(state)
      for s in storages:
        zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
      zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_pickle_reads_views_offsets_and_dtypes(tmp_path, fake_torch, legacy):
  a = _Storage("0", np.arange(24, dtype=np.float32))
  b = _Storage("1", np.array([7, -3], np.int64))
  h = _Storage("2", np.array([0.5, 1.5, 2.5], np.float16))
  state = collections.OrderedDict([
      ("w", _Tensor(a, 0, (2, 3, 4), (12, 4, 1))),
      ("w_t", _Tensor(a, 0, (4, 6), (1, 4))),         # A transposed view of the same storage.
      ("tail", _Tensor(a, 20, (4,), (1,))),            # An offset into it.
      ("n", _Tensor(b, 1, (), ())),                    # A 0-d tensor.
      ("half", _Tensor(h, 0, (3,), (1,))),
  ])
  path = str(tmp_path / "sd.pth")
  _save(path, state, [a, b, h], fake_torch, legacy)
  sd = torch_pickle.read_state_dict(path)
  assert list(sd) == ["w", "w_t", "tail", "n", "half"]
  np.testing.assert_array_equal(sd["w"], np.arange(24, dtype=np.float32).reshape(2, 3, 4))
  np.testing.assert_array_equal(sd["w_t"], np.arange(24, dtype=np.float32).reshape(6, 4).T)
  np.testing.assert_array_equal(sd["tail"], [20, 21, 22, 23])
  assert sd["n"] == -3 and sd["n"].dtype == np.int64
  assert sd["half"].dtype == np.float16


def test_torch_pickle_refuses_arbitrary_globals(tmp_path):
  path = str(tmp_path / "evil.pth")
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
    torch_pickle.read_state_dict(path)
  not_torch = tmp_path / "junk.pth"
  not_torch.write_bytes(b"hello")
  with pytest.raises(ValueError, match="not a PyTorch file"):
    torch_pickle.read_state_dict(str(not_torch))
