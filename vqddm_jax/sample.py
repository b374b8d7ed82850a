"""`--mode=sample`: restore the EMA parameters of both stages (read-only), sample code maps, decode, save.

Writes `workdir/samples/<prior step>/samples_S<steps>.png` (a grid) and `.npz` (codes i32[N,h,w], images
f32[N,H,W,C] in [-1, 1]). Samples are drawn on all local devices, each from `fold_in(key, device index)`, in
chunks of reverse steps with a progress line per chunk; the same seed gives the same samples.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqddm_jax import checkpointing, diffusion, metrics, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.train import encode
from vqddm_jax.train import prior as stage2


def restore_prior(config: Any, workdir: str, num_classes: int, code_shape: tuple[int, int]
                  ) -> tuple[Any, Any, int]:
  """(denoiser, EMA params, step) of the latest stage-2 checkpoint, restored read-only."""
  model = stage2.build_denoiser(config, num_classes)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1,) + code_shape, jnp.int32), jnp.ones((1,), jnp.int32)))["params"]
  params, step = checkpointing.restore_latest_ema(stage2.stage_dirs(workdir)["checkpoints"], abstract,
                                                   missing_hint="run --mode=train_prior first")
  return model, params, step


def device_key(key: jax.Array) -> jax.Array:
  """Inside pmap: this device's sampling key, fold_in(key, global device index)."""
  return jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))


def run_chunks(p_chunk: Any, z: Any, ts: np.ndarray, chunk: int, what: str) -> Any:
  """Runs `z = p_chunk(z, ts[i : i + chunk + 1])` over the descending steps `ts`, logging progress."""
  t0 = time.perf_counter()
  steps_total = len(ts) - 1
  for start in range(0, steps_total, chunk):
    z = p_chunk(z, jnp.asarray(ts[start:start + chunk + 1]))
    done = min(start + chunk, steps_total)
    z.block_until_ready()
    elapsed = time.perf_counter() - t0
    logging.info("%s: %d/%d reverse steps (t = %d), %.1fs, ETA %.0fs", what, done, steps_total,
                 int(ts[done]), elapsed, elapsed / done * (steps_total - done))
  return z


def device_indices() -> jnp.ndarray:
  """Global indices of this host's devices (what `lax.axis_index` gives inside pmap)."""
  n = parallel.local_device_count()
  return jnp.arange(n) + parallel.process_index() * n


def sample_code_maps(model: Any, rparams: Any, sched: diffusion.Schedule, *, parametrization: str,
                     key: jax.Array, per_device: int, code_shape: tuple[int, int],
                     num_sampling_steps: int | None, chunk: int) -> np.ndarray:
  """Ancestral (or strided) sampling on every local device: `i32[devices * per_device, h, w]`."""
  k = sched.num_classes
  ts = diffusion.sampling_timesteps(sched.num_steps, num_sampling_steps)

  def chunk_fn(params, z, key, ts_chunk):
    logits_fn = stage2.logits_fn_for(model, params, parametrization)
    return diffusion.reverse_chunk(device_key(key), z, ts_chunk, logits_fn, sched)

  p_chunk = parallel.pmap_with_axes(chunk_fn, in_axes=(0, 0, None, None))

  # z_T per device from fold_in(fold_in(key, global device index), 0), as `diffusion.sample` draws it.
  z = parallel.to_devices(np.asarray(jax.vmap(lambda d: diffusion.uniform_codes(
      jax.random.fold_in(jax.random.fold_in(key, d), 0), (per_device,) + tuple(code_shape), k))(
          device_indices())))
  z = run_chunks(lambda z, ts_chunk: p_chunk(rparams, z, key, ts_chunk), z, ts, chunk, "sampling")
  return parallel.unshard(z)


def run_sample(config: Any, workdir: str, *, sample_steps: int | None = None) -> dict[str, Any]:
  """Samples `config.sample.num_samples` images; returns paths and the wall time."""
  scfg = config.sample
  steps = scfg.steps if sample_steps is None else sample_steps
  steps = None if steps in (0, None) else int(steps)
  store = codes_lib.codes_dir(workdir, parallel.process_index(), parallel.process_count())
  meta = codes_lib.read_meta(store)
  if meta is None:
    raise FileNotFoundError(f"no code maps under {store}: run --mode=encode first")
  num_classes = int(meta["codebook_size"])
  code_shape = tuple(codes_lib.load_codes(store, config.data.eval_split).shape[1:])
  denoiser, prior_params, prior_step = restore_prior(config, workdir, num_classes, code_shape)
  vq_model, vq_params, _, _ = encode.restore_tokenizer(config, workdir)
  sched = stage2.build_schedule(config, num_classes)
  ndev = parallel.local_device_count()
  per_device = -(-scfg.num_samples // ndev)
  t0 = time.perf_counter()
  codes = sample_code_maps(denoiser, parallel.replicate(prior_params), sched,
                           parametrization=config.diffusion.parametrization,
                           key=jax.random.key(scfg.seed), per_device=per_device,
                           code_shape=code_shape, num_sampling_steps=steps,
                           chunk=scfg.chunk_steps)[:scfg.num_samples]
  sample_seconds = time.perf_counter() - t0
  images = decode_codes(vq_model, vq_params, codes, scfg.decode_batch_size)
  label = f"S{steps or sched.num_steps}"
  out_dir = os.path.join(workdir, "samples", str(prior_step))
  os.makedirs(out_dir, exist_ok=True)
  grid = metrics.save_png(os.path.join(out_dir, f"samples_{label}.png"), metrics.image_grid(images))
  npz = os.path.join(out_dir, f"samples_{label}.npz")
  np.savez_compressed(npz, codes=codes, images=images)
  logging.info("%d samples with %s reverse steps in %.1fs: %s and %s", len(codes),
               steps or sched.num_steps, sample_seconds, grid, npz)
  return {"grid": grid, "npz": npz, "seconds": sample_seconds, "steps": steps or sched.num_steps}


def decode_codes(model: Any, params: Any, codes: np.ndarray, batch_size: int) -> np.ndarray:
  """Images `f32[N, H, W, C]` in [-1, 1] for code maps `i32[N, h, w]`, in host batches."""
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=type(model).decode_indices))
  return np.concatenate([np.asarray(decode(params, jnp.asarray(codes[i:i + batch_size])))
                         for i in range(0, len(codes), batch_size)])
