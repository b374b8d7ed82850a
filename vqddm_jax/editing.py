"""Editing held-out images with the diffusion prior on every device: mixes and re-noised maps denoised from t.

For pairs of held-out code maps (pair i = maps 2i and 2i+1, in stored order) and each step t of a grid:
- mix: both maps noised to t with q(z_t | z_0), each position taken from the first with probability λ (one
  row per λ of the grid; the authors' interpolation), then denoised from t;
- re-noise: each map alone noised to t, then denoised from t (a discrete counterpart of SDEdit).
t = 0 leaves the (mixed) maps as they are. Random draws: the noise of pair i (shared by its λ row, so that the
positions taken from the first map grow with λ) from fold_in(fold_in(fold_in(key, t), 0), i), image k's
re-noise from fold_in(fold_in(fold_in(key, t), 1), k), and the denoising from fold_in(fold_in(key, t), 2)
per device as `generation.sample_code_maps` draws: the same seed on as many devices gives the same edits.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqddm_jax import diffusion, generation, parallel
from vqddm_jax import files as files_lib
from vqddm_jax import images as images_lib
from vqddm_jax.errors import ConfigError


def t_steps(t_fractions: Sequence[float], num_steps: int) -> list[int]:
  """The steps t = round(fraction · T) of fractions of T (halves round up), in the given order."""
  return [int(np.floor(float(f) * num_steps + 0.5)) for f in t_fractions]


def heldout_pairs(gen: generation.Generator, num_pairs: int) -> np.ndarray:
  """The first 2N held-out code maps, `i32[2N, h, w]`: pair i is maps 2i and 2i+1.

  Raises:
    ConfigError: fewer than 2N held-out code maps (the message names config.edit.pairs).
  """
  codes = gen.heldout_codes[:2 * num_pairs]
  if len(codes) < 2 * num_pairs:
    have = len(gen.heldout_codes)
    raise ConfigError(f"config.edit.pairs = {num_pairs} is not allowed: it needs {2 * num_pairs} held-out code "
                      f"maps and the store holds {have}: at most {have // 2}")
  return np.asarray(codes, np.int32)


@jax.jit
def _noised_rows(key: jax.Array, codes: jnp.ndarray, t: jnp.ndarray, lambdas: jnp.ndarray,
                 sched: diffusion.Schedule) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(mixes i32[N, L, h, w], re-noised i32[2N, h, w]) of `codes: i32[2N, h, w]` at step t (see module doc)."""
  n = codes.shape[0] // 2
  mix_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 0), i))(jnp.arange(n))
  one_mix = lambda k, a, b, lam: diffusion.mix_at_step(k, a[None], b[None], t, lam, sched)[0]  # noqa: E731
  mixes = jax.vmap(lambda lam: jax.vmap(one_mix, (0, 0, 0, None))(mix_keys, codes[0::2], codes[1::2], lam))(
      lambdas)
  re_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(jnp.arange(2 * n))
  renoised = jax.vmap(lambda k, z: diffusion.renoise(k, z[None], t, sched)[0])(re_keys, codes)
  return jnp.swapaxes(mixes, 0, 1), renoised


def _denoise_program(gen: generation.Generator) -> Any:
  """The pmapped `(rparams, z, key, ts_chunk) -> z` of `diffusion.denoise_chunk` with `gen`'s prior: chunks
  padded to one length run in one compilation whatever t."""
  sched = gen.sched

  def chunk_fn(params, z, key, ts_chunk):
    return diffusion.denoise_chunk(generation.device_key(key), z, ts_chunk, gen.sampling_logits_fn(params),
                                   sched)

  return generation.program_for(gen, "edit", lambda: parallel.pmap(chunk_fn, in_axes=(0, 0, None, None)))


def denoise_rows(gen: generation.Generator, rparams: Any, rows: np.ndarray, *, key: jax.Array, t: int,
                 num_sampling_steps: int | None, chunk: int) -> np.ndarray:
  """Denoises `rows: i32[R, h, w]` (all at step t) to step 0 on every device of every host (each host takes its
  contiguous share of the rows, padded to a multiple of the device count); all hosts get all R, in order.

  Args:
    gen: the restored stages.
    rparams: the prior's EMA parameters replicated on the local devices.
    rows: the codes at step t.
    key: the denoising key (the transition out of step τ on device d: fold_in(fold_in(key, d), τ)).
    t: the step, 0..T; 0 returns `rows`.
    num_sampling_steps: None for every step from t, S for the strided subset (`diffusion.denoise_timesteps`).
    chunk: transitions per compiled call; every chunk is padded to it (one program for every t).
  """
  ts = diffusion.denoise_timesteps(gen.sched.num_steps, t, num_sampling_steps)
  if len(ts) == 1:
    return rows
  ts = np.concatenate([ts, np.zeros(-(len(ts) - 1) % chunk, np.int32)])  # (0, 0) transitions pass over.
  total = -(-len(rows) // parallel.device_count()) * parallel.device_count()
  padded = np.concatenate([rows, np.repeat(rows[:1], total - len(rows), axis=0)])
  z = parallel.to_devices(parallel.shard(padded[parallel.host_slice(total)]))
  p_chunk = _denoise_program(gen)
  z = generation.run_chunks(lambda z, ts_chunk: p_chunk(rparams, z, key, ts_chunk), z, ts, chunk,
                            f"editing from t = {t}")
  return parallel.gather_rows(parallel.unshard(z))[:len(rows)]


def edit_heldout(config: Any, gen: generation.Generator) -> dict[str, np.ndarray]:
  """Mixes and re-noises the first `2 · config.edit.pairs` held-out maps at each t of the grid; denoises them
  from t and decodes.

  Returns:
    {'codes': i32[2N,h,w] (the held-out maps), 'reconstructions': f32[2N,H,W,C], 't': i32[nt],
     't_fractions': f32[nt], 'lambdas': f32[L], 'mix_noised' / 'mix_codes': i32[nt,N,L,h,w],
     'mix_images': f32[nt,N,L,H,W,C], 'renoise_noised' / 'renoise_codes': i32[nt,2N,h,w],
     'renoise_images': f32[nt,2N,H,W,C]}; images in [-1, 1].

  Raises:
    ConfigError: too few held-out code maps for config.edit.pairs.
  """
  ecfg, sched = config.edit, gen.sched
  codes = heldout_pairs(gen, ecfg.pairs)
  ts, lambdas = t_steps(ecfg.t_fractions, sched.num_steps), np.asarray(ecfg.lambdas, np.float32)
  steps = ecfg.steps or None
  chunk = min(config.sample.chunk_steps,
              max(len(diffusion.denoise_timesteps(sched.num_steps, t, steps)) - 1 for t in ts) or 1)
  rparams, base = parallel.replicate(gen.prior.params), jax.random.key(ecfg.seed)
  noised, denoised = [], []
  for t in ts:
    mixes, renoised = map(np.asarray, _noised_rows(jax.random.fold_in(base, t), jnp.asarray(codes),
                                                   jnp.int32(t), jnp.asarray(lambdas), sched))
    rows = np.concatenate([mixes.reshape((-1,) + codes.shape[1:]), renoised])
    noised.append(rows)
    denoised.append(denoise_rows(gen, rparams, rows, key=jax.random.fold_in(jax.random.fold_in(base, t), 2),
                                 t=t, num_sampling_steps=steps, chunk=chunk))
  batch = config.sample.decode_batch_size
  out = np.stack(denoised)  # [nt, N·L + 2N, h, w]
  images = generation.decode_codes(gen.tokenizer, out.reshape((-1,) + codes.shape[1:]), batch)
  images = images.reshape(out.shape[:2] + images.shape[1:])
  n_mix, mix_shape = len(codes) // 2 * len(lambdas), (len(ts), len(codes) // 2, len(lambdas))
  noised = np.stack(noised)
  return {"codes": codes, "reconstructions": generation.decode_codes(gen.tokenizer, codes, batch),
          "t": np.asarray(ts, np.int32), "t_fractions": np.asarray(ecfg.t_fractions, np.float32),
          "lambdas": lambdas, "mix_noised": noised[:, :n_mix].reshape(mix_shape + codes.shape[1:]),
          "mix_codes": out[:, :n_mix].reshape(mix_shape + codes.shape[1:]),
          "mix_images": images[:, :n_mix].reshape(mix_shape + images.shape[2:]),
          "renoise_noised": noised[:, n_mix:], "renoise_codes": out[:, n_mix:],
          "renoise_images": images[:, n_mix:]}


def mix_grid(result: dict[str, np.ndarray]) -> np.ndarray:
  """`u8` picture: per pair a block of rows over t, columns image 1, λ from high to low, image 2 (a blank row
  between blocks)."""
  recon, images, lambdas = result["reconstructions"], result["mix_images"], result["lambdas"]
  order = np.argsort(-lambdas, kind="stable")  # Left to right: from image 1 (λ = 1) towards image 2.
  blank = np.ones((len(order) + 2,) + recon.shape[1:], np.float32)
  rows = []
  for i in range(images.shape[1]):
    for j in range(images.shape[0]):
      rows.append(np.concatenate([recon[2 * i:2 * i + 1], images[j, i, order], recon[2 * i + 1:2 * i + 2]]))
    rows.append(blank)
  return images_lib.image_grid(np.concatenate(rows[:-1]), ncol=len(order) + 2)


def renoise_grid(result: dict[str, np.ndarray]) -> np.ndarray:
  """`u8` picture: one row per image, its reconstruction then its re-noised-and-denoised version at each t."""
  recon, images = result["reconstructions"], result["renoise_images"]  # [2N, ...], [nt, 2N, ...]
  rows = np.concatenate([recon[:, None], np.swapaxes(images, 0, 1)], axis=1)
  return images_lib.image_grid(rows.reshape((-1,) + recon.shape[1:]), ncol=rows.shape[1])


def save_edits(workdir: Any, result: dict[str, np.ndarray], record: dict) -> None:
  """Writes `W/edit/`: mix.png, renoise.png, edit.npz and the record edit.json (last: it marks them done)."""
  files_lib.write_png(workdir.edit_mix_grid, mix_grid(result))
  logging.info("mixes of %d pairs at t = %s, λ = %s: %s", len(result["codes"]) // 2, result["t"].tolist(),
               result["lambdas"].tolist(), workdir.edit_mix_grid)
  files_lib.write_png(workdir.edit_renoise_grid, renoise_grid(result))
  logging.info("%d images re-noised to t = %s and denoised: %s", len(result["codes"]), result["t"].tolist(),
               workdir.edit_renoise_grid)
  files_lib.write_npz(workdir.edit_npz, **result)
  files_lib.write_json(workdir.edit_record, record)
