"""Numerical parity of the Flax FID Inception with pytorch-fid's, through real `torch.save` files.

The project never needs PyTorch; this check runs only where `torch`, `torchvision` and `pytorch-fid` are
importable and VQDDM_SLOW_TESTS is set (about 1-2 minutes of CPU). It builds pytorch-fid's network with
random weights whose BatchNorm statistics are calibrated on one batch (so activations stay in range through
all 94 layers), saves the state dict in both torch.save formats, converts each with the torch-free reader and
compares pool_3 features for grey 32×32 (upsampled), exact 299×299 and larger (downsampled) inputs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

if not os.environ.get("VQDDM_SLOW_TESTS"):
  pytest.skip("set VQDDM_SLOW_TESTS=1 (and install torch + pytorch-fid) for the parity check",
              allow_module_level=True)
torch = pytest.importorskip("torch")
pfi = pytest.importorskip("pytorch_fid.inception")

from vqddm_jax.evaluation import inception, inception_layout, inception_weights  # noqa: E402


def _random_fid_inception(monkeypatch):
  """pytorch-fid's InceptionV3 (pool_3 output) and its inner Inception3, with random calibrated weights."""
  torch.manual_seed(0)
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)  # Offline: no weights.
  with monkeypatch.context() as m:
    m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
    inner = pfi.fid_inception_v3()
  monkeypatch.setattr(pfi, "fid_inception_v3", lambda: inner)
  model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
  for m in inner.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # Cumulative average: one training batch sets the running statistics exactly.
      m.reset_running_stats()
      with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
  model.train()
  with torch.no_grad():
    model(torch.rand(6, 3, 299, 299))
  return model.eval(), inner


def test_flax_port_matches_pytorch_fid(tmp_path, monkeypatch):
  model, inner = _random_fid_inception(monkeypatch)
  paths = {"zip": str(tmp_path / "zip.pth"), "legacy": str(tmp_path / "legacy.pth")}
  torch.save(inner.state_dict(), paths["zip"])
  torch.save(inner.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
  converted = {}
  for fmt, path in paths.items():
    out = inception_weights.convert_pytorch_fid_weights(path, str(tmp_path / f"{fmt}.npz"))
    converted[fmt] = inception_layout.flatten(inception.load_inception(out))
  for key, value in converted["zip"].items():
    np.testing.assert_array_equal(converted["legacy"][key], value)
  variables = inception.load_inception(str(tmp_path / "zip.npz"))

  gen = torch.Generator().manual_seed(1)
  for shape in [(3, 1, 32, 32), (2, 3, 299, 299), (2, 3, 360, 330)]:
    x = torch.rand(shape, generator=gen)  # pytorch-fid's input range is [0, 1].
    with torch.no_grad():
      expected = model(x.expand(-1, 3, -1, -1))[0].reshape(shape[0], -1).numpy()
    got = inception.inception_features(variables, x.permute(0, 2, 3, 1).numpy() * 2 - 1, batch_size=2)
    assert got.shape == expected.shape == (shape[0], 2048)
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
