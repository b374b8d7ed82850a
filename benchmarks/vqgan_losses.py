"""Stage 1 on a small RGB folder, MSE only against L1 + LPIPS + PatchGAN; optionally ReFiT's learning rate.

    python benchmarks/vqgan_losses.py --out=/tmp/vqgan_bench                 # the two stage-1 runs
    python benchmarks/vqgan_losses.py --out=/tmp/vqgan_bench --refit         # + ReFiT at two learning rates

The images are crops of the two photographs scikit-learn ships (`sklearn.datasets.load_sample_images`:
a temple in China and a flower, 427×640 each), written as PNGs to `<out>/images/{train,test}/`; held-out
crops come from the middle fifth of each photograph's width and train crops from the rest, so nothing held
out was seen in training. Each run is the project's own stage (`stages.train_vqvae.run`, `stages.refit.run`)
on its own work directory under `<out>/`, so the reconstruction grids are the stage's `images/recon_<step>.png`
(held-out originals in the top rows, reconstructions below).

Prints `name=value` lines per run: held-out reconstruction MSE, LPIPS (VGG16) and FD_VGG16 (Fréchet distance
of the spatially pooled relu5_3 features of reconstructions against the originals), codebook usage, wall time
and the grid's path; with `--refit`, the same before and after a fine-tune at the authors' rate (2e-6) and at
the paper configs' rate (4.5e-6 × batch).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for the images and the runs' work directories")
  p.add_argument("--size", type=int, default=32, help="crop side in pixels (64: about 4x the time)")
  p.add_argument("--train_crops", type=int, default=2000)
  p.add_argument("--test_crops", type=int, default=128)
  p.add_argument("--steps", type=int, default=250)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--disc_start", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.0, help="both Adams' rate (0: 4.5e-6 × batch × 4)")
  p.add_argument("--refit", action="store_true", help="also fine-tune with ReFiT at two learning rates")
  p.add_argument("--refit_steps", type=int, default=100)
  p.add_argument("--host_devices", type=int, default=2, help="XLA CPU devices to make of the cores")
  return p.parse_args(argv)


def make_folder(root: pathlib.Path, size: int, train: int, test: int) -> None:
  """Writes random size×size crops of scikit-learn's two photographs, scaled by size/64 or half that (a
  crop covers 64×64 or 128×128 pixels of the photograph whatever `size` is)."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_sample_images
  rng = np.random.default_rng(0)
  photos = load_sample_images().images
  # Held out: the middle fifth of each photograph's width (the temple, the flower); trained on the rest.
  stripes = {"train": ((0.0, 0.4), (0.6, 1.0)), "test": ((0.4, 0.6),)}
  for split, count in (("train", train), ("test", test)):
    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      photo = Image.fromarray(photos[i % len(photos)])
      scale = size / 64 * rng.choice([1.0, 0.5])
      photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
      lo, hi = stripes[split][rng.integers(len(stripes[split]))]
      x0, x1 = int(lo * photo.width), int(hi * photo.width) - size
      x, y = rng.integers(x0, x1 + 1), rng.integers(0, photo.height - size + 1)
      photo.crop((x, y, x + size, y + size)).save(root / split / f"{i:05d}.png")


def make_config(args: argparse.Namespace, folder: pathlib.Path, gan: bool):
  """A small f4 VQ-VAE (8×8 codes of 32×32 crops, K = 256); `gan` switches on the VQGAN losses."""
  from vqddm_jax import config_schema
  c = config_schema.base_config()
  c.data.update(source="image_folder", image_folder=str(folder), image_size=args.size, channels=3,
                resize="center_crop", train_split="train", eval_split="test", shuffle_buffer=2_000)
  c.vqvae.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=32, codebook_size=256,
                 groups=8)
  lr = args.lr or 4.5e-6 * args.batch * 4  # taming's rate scaled by the batch, ×4 for a few hundred steps
  c.vqvae_train.update(batch_size=args.batch, num_steps=args.steps, optim=config_schema.gan_optim(lr),
                       ema_decay=0.98, log_every=50, checkpoint_every=args.steps, image_every=args.steps,
                       eval_every=args.steps, eval_examples=0)
  if gan:
    c.vqvae_train.update(recon_loss="l1", perceptual_weight=1.0, disc_weight=0.8, disc_start=args.disc_start,
                         disc_optim=config_schema.gan_optim(lr))
  c.refit.update(num_codes=128, num_features=4_000, kmeans_iters=50, batch_size=args.batch,
                 num_steps=args.refit_steps, ema_decay=0.9, log_every=25, checkpoint_every=args.refit_steps,
                 image_every=args.refit_steps, eval_every=args.refit_steps, recon_loss="l1",
                 perceptual_weight=1.0, disc_weight=0.8, disc_start=0)
  return config_schema.validate_config(c)


def heldout_figures(config, tokenizer) -> dict[str, float]:
  """MSE, mean LPIPS and FD_VGG16 of the tokenizer's held-out reconstructions (clipped to [-1, 1])."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vqddm_jax import data, parallel
  from vqddm_jax.evaluation import feature_metrics
  from vqddm_jax.models import lpips
  weights = lpips.load_lpips_weights()
  distance = jax.jit(lambda x, y: lpips.lpips_distance(weights, x, y))
  features = jax.jit(lambda x: lpips.vgg16_global_features(weights["VGG16_0"], x))
  recon = jax.jit(lambda p, x: jnp.clip(tokenizer.model.apply({"params": p}, x)[0], -1, 1))
  sq, dist, real, fake = [], [], [], []
  for batch in data.eval_batches(config.data, split=config.data.eval_split, global_batch_size=32,
                                 num_shards=parallel.local_device_count()):
    x = parallel.unshard(batch["image"])[parallel.unshard(batch["mask"])]
    y = np.asarray(recon(tokenizer.params, x))
    sq.append(np.mean((y - x) ** 2, axis=(1, 2, 3)))
    dist.append(np.asarray(distance(x, y)))
    real.append(np.asarray(features(x)))
    fake.append(np.asarray(features(y)))
  fd = feature_metrics.frechet_distance(*feature_metrics.feature_statistics(np.concatenate(real)),
                                        *feature_metrics.feature_statistics(np.concatenate(fake)))
  return {"mse": float(np.concatenate(sq).mean()), "lpips": float(np.concatenate(dist).mean()),
          "fd_vgg16": float(fd)}


def _report(name: str, figures: dict, extra: dict) -> None:
  for key, value in dict(figures, **extra).items():
    print(f"{name}_{key}={value:.5g}" if isinstance(value, float) else f"{name}_{key}={value}", flush=True)


def stage1(args, folder, gan: bool) -> tuple:
  import json

  from vqddm_jax import restore
  from vqddm_jax.stages import train_vqvae
  from vqddm_jax.workdir import Workdir
  name = "gan" if gan else "mse"
  config, workdir = make_config(args, folder, gan), Workdir(pathlib.Path(args.out) / name)
  start = time.time()
  train_vqvae.run(config, workdir)
  tokenizer = restore.restore_vqvae(config, workdir, "vqvae")
  usage = json.loads(workdir.vqvae.eval_json.read_text())["usage"]
  _report(f"stage1_{name}", heldout_figures(config, tokenizer),
          {"usage": usage, "wall_s": round(time.time() - start, 1),
           "grid": str(workdir.vqvae.image(args.steps))})
  return config, workdir


def refit_at(args, config, source, lr: float, label: str) -> None:
  """ReFiT from the stage 1 of `source` (copied) with both Adams at `lr`."""
  import dataclasses
  import shutil

  from vqddm_jax import checkpointing, config_schema, restore
  from vqddm_jax.stages import refit
  from vqddm_jax.workdir import Workdir
  workdir = Workdir(pathlib.Path(args.out) / f"refit_{label}")
  if not workdir.vqvae.root.exists():
    shutil.copytree(str(source.vqvae.root), str(workdir.vqvae.root))
  config = config.copy_and_resolve_references()
  config.refit.update(optim=config_schema.gan_optim(lr), disc_optim=config_schema.gan_optim(lr))
  start = time.time()
  refit.run(config, workdir)
  after = restore.restore_vqvae(config, workdir, "refit", codebook_size=config.refit.num_codes)
  # Checkpoint 0 of ReFiT holds the rebuilt codebook with stage 1's decoder: the starting point.
  ckpt = checkpointing.Checkpointer(workdir.refit.checkpoints, read_only=True)
  try:
    rebuilt = ckpt.restore_item("ema_params", after.params, step=0)
  finally:
    ckpt.close()
  before = heldout_figures(config, dataclasses.replace(after, params=rebuilt))
  _report(f"refit_{label}_rebuilt", before, {})
  _report(f"refit_{label}_finetuned", heldout_figures(config, after),
          {"lr": lr, "wall_s": round(time.time() - start, 1), "grid": str(workdir.refit.image(
              args.refit_steps))})


def main(argv=None) -> None:
  args = _args(argv)
  if args.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  folder = pathlib.Path(args.out) / "images"
  if not (folder / "test").exists():
    make_folder(folder, args.size, args.train_crops, args.test_crops)
  stage1(args, folder, gan=False)
  config, workdir = stage1(args, folder, gan=True)
  if args.refit:
    # Before: the rebuilt codebook with the stage-1 decoder (the "rebuilt" row of refit/report.json).
    for lr, label in ((2e-6, "lr2e-6"), (4.5e-6 * args.batch, "lr_paper")):
      refit_at(args, config, workdir, lr, label)


if __name__ == "__main__":
  main()
