"""`--mode=inpaint`: global-context completion of held-out images (METHOD.md §3.7), no retraining.

The held-out images' code maps (from `workdir/codes/`) are the known z_0; a mask says which code positions are
known. The reverse process runs from noise and, after every step, overwrites the known positions with a sample
of q(z_{t-1} | z_0^known), so the unknown positions are generated in the context of all known ones anywhere
in the map. Output under `workdir/inpaint/<mask>/`: `grid.png` (rows of masked input / completion /
original) and `inpaint.npz` (mask, known codes, completed codes, images).
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from vqddm_jax import data, diffusion, metrics, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.sample import decode_codes, device_indices, device_key, restore_prior, run_chunks
from vqddm_jax.train import encode
from vqddm_jax.train import prior as stage2

NAMED_MASKS = ("left_half", "top_half", "center")
_RANDOM = re.compile(r"^random:(0(\.\d+)?|1(\.0+)?)$")


def check_mask_spec(spec: str) -> None:
  """Raises ValueError unless `spec` is a named mask, `random:FRACTION` or an existing `.png` file."""
  if spec in NAMED_MASKS or _RANDOM.match(spec):
    return
  if spec.lower().endswith(".png"):
    if not os.path.isfile(spec):
      raise ValueError(f"config.inpaint.mask = {spec!r}: no such mask PNG file")
    return
  raise ValueError(f"config.inpaint.mask = {spec!r} is not allowed: one of {', '.join(NAMED_MASKS)}, "
                   "'random:FRACTION' (FRACTION in [0, 1] of the code positions hidden) or a PNG path "
                   "(white = known pixels)")


def code_mask(spec: str, num: int, code_shape: tuple[int, int], image_size: int,
              seed: int) -> np.ndarray:
  """`bool[num, h, w]`, True where the code is KNOWN, for a mask spec (see `check_mask_spec`)."""
  check_mask_spec(spec)
  h, w = code_shape
  mask = np.ones((h, w), bool)
  if spec == "left_half":
    mask[:, w // 2:] = False
  elif spec == "top_half":
    mask[h // 2:, :] = False
  elif spec == "center":
    mask[h // 4:h - h // 4, w // 4:w - w // 4] = False
  elif spec.startswith("random:"):
    hidden = float(spec.split(":", 1)[1])
    return np.random.default_rng(seed).random((num, h, w)) >= hidden
  else:
    pixels = np.asarray(Image.open(spec).convert("L").resize((image_size, image_size), Image.NEAREST))
    f = image_size // h
    # A code is known only when every pixel of its f×f patch is known (white).
    mask = (pixels.reshape(h, f, w, f) > 127).all(axis=(1, 3))
  return np.broadcast_to(mask, (num, h, w)).copy()


def inpaint_code_maps(model: Any, rparams: Any, sched: diffusion.Schedule, *, parametrization: str,
                      key: jax.Array, mask: np.ndarray, known: np.ndarray,
                      num_sampling_steps: int | None, chunk: int) -> np.ndarray:
  """Completes `known: i32[N, h, w]` outside `mask: bool[N, h, w]` on all local devices (N divisible)."""
  ts = diffusion.sampling_timesteps(sched.num_steps, num_sampling_steps)
  mask_d, known_d = parallel.to_devices(parallel.shard(mask)), parallel.to_devices(parallel.shard(known))

  def chunk_fn(params, z, m, z0, key_ts):
    key, ts_chunk = key_ts
    return diffusion.inpaint_chunk(device_key(key), z, ts_chunk,
                                   stage2.logits_fn_for(model, params, parametrization), sched, m, z0)

  p_chunk = parallel.pmap_with_axes(chunk_fn, in_axes=(0, 0, 0, 0, None))

  z = parallel.to_devices(np.asarray(jax.vmap(
      lambda d, m, z0: diffusion.inpaint_init(jax.random.fold_in(key, d), m, z0, sched))(
          device_indices(), jnp.asarray(parallel.shard(mask)), jnp.asarray(parallel.shard(known)))))
  z = run_chunks(lambda z, ts_chunk: p_chunk(rparams, z, mask_d, known_d, (key, ts_chunk)), z, ts,
                 chunk, "inpainting")
  return parallel.unshard(z)


def first_images(config: Any, split: str, num: int) -> np.ndarray:
  """The first `num` images of `split` on this host, in the order their code maps were stored:
  `f32[num, H, W, C]` in [-1, 1]."""
  out = []
  for batch in data.eval_batches(config.data, split=split,
                                 global_batch_size=parallel.local_device_count() * 8,
                                 num_shards=parallel.local_device_count(), max_examples=num):
    out.append(parallel.unshard(batch["image"])[parallel.unshard(batch["mask"])])
  return np.concatenate(out)[:num]


def run_inpaint(config: Any, workdir: str, *, sample_steps: int | None = None) -> dict[str, Any]:
  """Inpaints `config.inpaint.num_images` held-out images; returns paths and figures."""
  icfg = config.inpaint
  store = codes_lib.codes_dir(workdir, parallel.process_index(), parallel.process_count())
  meta = codes_lib.read_meta(store)
  if meta is None:
    raise FileNotFoundError(f"no code maps under {store}: run --mode=encode first")
  k = int(meta["codebook_size"])
  ndev = parallel.local_device_count()
  num = -(-icfg.num_images // ndev) * ndev
  known = codes_lib.load_codes(store, config.data.eval_split)[:num]
  if len(known) < num:
    raise ValueError(f"config.inpaint.num_images = {icfg.num_images}: only {len(known)} held-out maps")
  code_shape = tuple(known.shape[1:])
  mask = code_mask(icfg.mask, num, code_shape, config.data.image_size, config.seed)
  denoiser, prior_params, prior_step = restore_prior(config, workdir, k, code_shape)
  vq_model, vq_params, _, _ = encode.restore_tokenizer(config, workdir)
  steps = icfg.steps if sample_steps is None else sample_steps
  completed = inpaint_code_maps(
      denoiser, parallel.replicate(prior_params), stage2.build_schedule(config, k),
      parametrization=config.diffusion.parametrization, key=jax.random.key(icfg.seed), mask=mask,
      known=known, num_sampling_steps=steps or None, chunk=config.sample.chunk_steps)
  kept = bool(np.all(completed[mask] == known[mask]))
  if not kept:
    raise AssertionError("inpainting changed known codes")
  images = decode_codes(vq_model, vq_params, completed, config.sample.decode_batch_size)
  originals = first_images(config, config.data.eval_split, num)
  f = config.data.image_size // code_shape[0]
  pixel_mask = np.repeat(np.repeat(mask, f, axis=1), f, axis=2)[..., None]
  masked = np.where(pixel_mask, originals, 0.0)
  n = min(num, 8)
  rows = np.concatenate([masked[:n], images[:n], originals[:n]])
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(icfg.mask))
  out_dir = os.path.join(workdir, "inpaint", name)
  grid = metrics.save_png(os.path.join(out_dir, "grid.png"), metrics.image_grid(rows, ncol=n))
  npz = os.path.join(out_dir, "inpaint.npz")
  np.savez_compressed(npz, mask=mask, known=known, codes=completed, images=images,
                      originals=originals)
  logging.info("inpainted %d held-out images (mask %s, %.0f%% of codes known, prior step %d): %s",
               num, icfg.mask, 100 * mask.mean(), prior_step, grid)
  return {"grid": grid, "npz": npz, "known_fraction": float(mask.mean()), "known_codes_kept": kept}
