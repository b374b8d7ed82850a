"""Writes the golden files of tests/test_convert.py: peer networks with random weights and their outputs.

Needs PyTorch, einops, omegaconf and taming-transformers (`pip install torch einops omegaconf` and
`pip install taming-transformers-rom1504==0.0.6 --no-deps`) and the authors' `unet.py` from their repository
(anonymrelease/VQ-DDM, `DDM/model/unet.py`), whose folder --peer names. None of that is part of this project
or imported by it: this script is run by hand, in a separate environment, when the fixtures must change.

  python tools/make_parity_fixtures.py --peer=DIR_WITH_authors_ddm_unet.py [--out=tests/fixtures/parity]

Writes (about 1.5 MB):
- `taming_tiny.ckpt`: a taming VQGAN (ch 32, ch_mult (2, 1): a width change in both directions, so the 1x1
  shortcuts; 2 ResnetBlocks per level, attention at the 8x8 level, one down/upsampling, K 16, d 8, trained
  size 16) as a PyTorch Lightning checkpoint: `state_dict` (with stand-in `loss.*` tensors where taming keeps
  its LPIPS and discriminator), epoch / step / version, an Adam state, `callbacks` keyed by a class of this
  script and holding its objects, a set and bytes, and omegaconf `hyper_parameters`. The weights are drawn on
  the float16 grid and stored as float16 (half the size: the fixtures stay under 2 MB); every reference
  output is computed in float32 from those same values.
- `taming_tiny.yaml`: its model config in taming's layout.
- `taming_tiny_outputs.npz`: NHWC inputs `x16` [2,16,16,3] (its trained size) and `x32` [1,32,32,3] (another
  size, where taming places attention by the nominal size), and per input the pre-quantisation features
  `pre_quant*`, the code indices `codes*` (nearest codes, each at least 2e-4 ahead of the runner-up: 100
  times the features' float error) and the decoder's output on the codebook rows of those codes `dec*`.
  Reference outputs are computed in float64 from the stored weights (PyTorch's own float32 result is ~1e-5
  away from it after the decoder's 20-odd layers) and stored as float32.
- `authors_unet_tiny.pth`: the authors' `Unet(num_classes=16, dim=8, num_steps=4000, dim_mults=(1, 2))`
  state dict (float32), and `authors_unet_tiny_outputs.npz`: codes `z` [2,4,4], the step `t` (ours, 1..T),
  the time index their network was fed, `t - 1` (their sampler's convention), and the logits NHWC [3,2,4,4,16].
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch
from torch import nn

TAMING = dict(ch=32, out_ch=3, ch_mult=(2, 1), num_res_blocks=2, attn_resolutions=(8,), dropout=0.0,
              in_channels=3, resolution=16, z_channels=8, double_z=False)
EMBED_DIM, N_EMBED = 8, 16
UNET = dict(num_classes=16, dim=8, num_steps=4000, dim_mults=(1, 2))
STEPS = (1, 2000, 4000)  # Ours, t = 1..T; their network is fed t - 1.


class FixtureCheckpointCallback:
  """Stands for a Lightning callback class: the checkpoint's `callbacks` dict is keyed by such a class."""


class FixtureCallbackState:
  """An object of a class the converter cannot import (it lives in this script)."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _randomise(module: nn.Module, seed: int) -> None:
  """Draws the parameters PyTorch initialises to constants (GroupNorm, ReZero gains) too, so that every one
  of them changes the outputs."""
  g = torch.Generator().manual_seed(seed)
  modules = dict(module.named_modules())
  with torch.no_grad():
    for name, p in module.named_parameters():
      if isinstance(modules.get(name.rsplit(".", 1)[0]), nn.GroupNorm):
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith(".g"):
        p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))


class TinyVQModel(nn.Module):
  """taming's `VQModel` minus Lightning: the same submodule names, so the same state-dict names."""

  def __init__(self):
    super().__init__()
    # Imported here, so that --help works without taming installed.
    from taming.modules.diffusionmodules.model import Decoder, Encoder  # pylint: disable=g-import-not-at-top
    from taming.modules.vqvae.quantize import VectorQuantizer  # pylint: disable=g-import-not-at-top
    self.encoder, self.decoder = Encoder(**TAMING), Decoder(**TAMING)
    self.quantize = VectorQuantizer(N_EMBED, EMBED_DIM, beta=0.25)
    self.quant_conv = nn.Conv2d(TAMING["z_channels"], EMBED_DIM, 1)
    self.post_quant_conv = nn.Conv2d(EMBED_DIM, TAMING["z_channels"], 1)
    # Where taming keeps VQLPIPSWithDiscriminator: tiny stand-ins with its names, which the converter ignores.
    self.loss = nn.Module()
    self.loss.discriminator = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1))
    self.loss.perceptual_loss = nn.Module()
    self.loss.perceptual_loss.lin0 = nn.Conv2d(4, 1, 1, bias=False)

  def outputs(self, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Pre-quantisation features, codes and decoded images for NCHW `x`, as NHWC NumPy arrays."""
    h = self.quant_conv(self.encoder(x))
    flat = h.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
    d = torch.cdist(flat.double(), self.quantize.embedding.weight.double())
    best = torch.sort(d, dim=1).values
    margin = float((best[:, 1] - best[:, 0]).min())
    assert margin > 2e-4, f"a code is within {margin} of its runner-up: pick another seed"
    codes = d.argmin(1).reshape(h.shape[0], h.shape[2], h.shape[3])
    z_q = self.quantize.embedding(codes).permute(0, 3, 1, 2)
    dec = self.decoder(self.post_quant_conv(z_q))
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy().astype(np.float32)
    return {"pre_quant": nhwc(h), "codes": codes.numpy().astype(np.int32), "dec": nhwc(dec)}


def _lightning_checkpoint(model: TinyVQModel) -> dict:
  """The dict Lightning's `dump_checkpoint` writes (1.0-era layout, as taming's released checkpoints)."""
  state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
  adam = torch.optim.Adam([model.quantize.embedding.weight], lr=4.5e-6, betas=(0.5, 0.9))
  model.quantize.embedding.weight.grad = torch.ones_like(model.quantize.embedding.weight)
  adam.step()  # A real optimiser state (moments), which the converter must leave unread.
  ckpt = {
      "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
      "callbacks": {FixtureCheckpointCallback: {
          "monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
          "best_model_path": "logs/tiny/checkpoints/last.ckpt",
          "extra": FixtureCallbackState(seen={1, 2}, blob=b"\x00\x01", frozen=frozenset({3}))}},
      "optimizer_states": [adam.state_dict()], "lr_schedulers": [], "state_dict": state,
  }
  try:
    from omegaconf import OmegaConf  # pylint: disable=import-outside-toplevel
    ckpt["hyper_parameters"] = OmegaConf.create({"ddconfig": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in TAMING.items()},
                                                 "embed_dim": EMBED_DIM, "n_embed": N_EMBED})
  except ImportError:
    print("omegaconf not installed: the checkpoint has no hyper_parameters entry", file=sys.stderr)
  return ckpt


def _yaml() -> str:
  def value(v):
    return list(v) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v
  dd = "\n".join(f"      {k}: {value(v)}" for k, v in TAMING.items())
  return (f"model:\n  base_learning_rate: 4.5e-06\n  target: taming.models.vqgan.VQModel\n  params:\n"
          f"    embed_dim: {EMBED_DIM}\n    n_embed: {N_EMBED}\n    ddconfig:\n{dd}\n    lossconfig:\n"
          "      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator\n"
          "      params:\n        disc_conditional: false\n        disc_in_channels: 3\n"
          "        disc_start: 10000\n        disc_weight: 0.8\n        codebook_weight: 1.0\n")


def make_taming(out: str, seed: int) -> None:
  torch.manual_seed(seed)
  model = TinyVQModel()
  _randomise(model, seed)
  with torch.no_grad():
    # Codes on the features' scale (taming's uniform(-1/K, 1/K) start puts them all near 0, in a near-tie).
    model.quantize.embedding.weight.normal_(0.0, 0.25, generator=torch.Generator().manual_seed(seed + 2))
    for p in model.parameters():  # Onto the float16 grid, so the stored half weights are exactly these.
      p.copy_(p.half().float())
  model.eval()
  g = torch.Generator().manual_seed(seed + 1)
  arrays, exact = {}, copy.deepcopy(model).double()
  with torch.no_grad():
    for size, batch in ((16, 2), (32, 1)):
      x = torch.rand((batch, 3, size, size), generator=g) * 2 - 1
      arrays[f"x{size}"] = x.permute(0, 2, 3, 1).numpy()
      arrays.update({f"{k}{size}": v for k, v in exact.outputs(x.double()).items()})
  np.savez(os.path.join(out, "taming_tiny_outputs.npz"), **arrays)
  torch.save(_lightning_checkpoint(model), os.path.join(out, "taming_tiny.ckpt"))
  with open(os.path.join(out, "taming_tiny.yaml"), "w", encoding="utf-8") as f:
    f.write(_yaml())


def make_unet(out: str, peer: str, seed: int) -> None:
  sys.path.insert(0, peer)
  from authors_ddm_unet import Unet  # pylint: disable=import-outside-toplevel,import-error
  torch.manual_seed(seed)
  net = Unet(**UNET)
  _randomise(net, seed)
  net.eval().double()
  z = torch.randint(0, UNET["num_classes"], (2, 4, 4), generator=torch.Generator().manual_seed(seed + 1))
  fed = np.array(STEPS, np.float32) - 1
  # Their embedding rescales the index by / T * 4000, ours by * (4000 / T): equal only where that is exact.
  assert all(np.float32(np.float32(v / np.float32(UNET["num_steps"])) * np.float32(4000)) == v for v in fed)
  with torch.no_grad():
    logits = np.stack([net(torch.full((2,), float(v), dtype=torch.float64), z).permute(0, 2, 3, 1).numpy()
                       for v in fed])
  torch.save(net.float().state_dict(), os.path.join(out, "authors_unet_tiny.pth"))
  np.savez(os.path.join(out, "authors_unet_tiny_outputs.npz"), z=z.numpy().astype(np.int32),
           t=np.array(STEPS, np.int32), time_index=fed, logits=logits.astype(np.float32),
           num_steps=np.int32(UNET["num_steps"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--peer", required=True,
                      help="folder holding the authors' unet.py as authors_ddm_unet.py")
  parser.add_argument("--out",
                      default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "parity"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.set_num_threads(1)  # Reproducible float sums.
  make_taming(args.out, args.seed)
  make_unet(args.out, args.peer, args.seed)
  for name in sorted(os.listdir(args.out)):
    print(f"{name}: {os.path.getsize(os.path.join(args.out, name)):,} bytes")


if __name__ == "__main__":
  main()
