"""Generating with the autoregressive prior on every local device: sampling, and inpainting by its two protocols.

The AR prior reads a code map in raster order, so it samples position after position with a key/value cache
(one cached network call per code; `autoregressive.sample`). A raster-order model cannot condition on known
codes that come after an unknown one, so inpainting has two protocols (docs/comparison.md):
- 'prefix' (prefix-forced): walk the positions in raster order, write the known codes where known, sample the
  rest. The model's exact conditional for a raster-prefix mask (`top_half`); for other masks it ignores what
  is known further on until it gets there.
- 'reweight' (sample-then-reweight): N prefix-forced completions per image, each weighted by the probability the
  model gives the known codes after the first unknown one (one teacher-forced pass), one drawn by weight. It
  tends to the model's conditional as N grows; the effective sample size (ESS) says how far it is.
Each device draws from `fold_in(key, global device index)`, as the diffusion sampler does.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqddm_jax import autoregressive, generation, parallel
from vqddm_jax.generation import Generator, device_key

PROTOCOLS = ("prefix", "reweight")


def protocol_name(protocol: str, candidates: int) -> str:
  """The folder and row name of a protocol: 'ar_prefix', 'ar_reweight16'."""
  return f"ar_{protocol}" + (str(candidates) if protocol == "reweight" else "")


def _filter(gen: Generator) -> dict:
  s = gen.ar_sampling
  return {"temperature": float(s["temperature"]), "top_k": int(s["top_k"]), "top_p": float(s["top_p"])}


def sample_program(gen: Generator, per_device: int) -> Callable:
  """The pmapped `(rparams, key) -> i32[devices, per_device, L]` sampler of `gen`'s AR prior (one per
  generator and batch: every draw reuses its compilation)."""
  model, kwargs = gen.ar.model, _filter(gen)

  def fn(params, key):
    return autoregressive.sample(autoregressive.gpt_decoder(model, params), device_key(key), per_device,
                                 **kwargs)

  return generation.program_for(gen, ("ar_sample", per_device), lambda: parallel.pmap(fn, in_axes=(0, None)))


def sample_code_maps(gen: Generator, rparams: Any, *, key: jax.Array, per_device: int,
                     program: Callable | None = None) -> np.ndarray:
  """`i32[devices * per_device, h, w]`: every device's samples (all hosts', in device order, on every host)."""
  program = program or sample_program(gen, per_device)
  t0 = time.perf_counter()
  seq = program(rparams, key)
  seq.block_until_ready()
  logging.info("AR sampling: %d positions x %d maps per device in %.1fs", seq.shape[-1], per_device,
               time.perf_counter() - t0)
  codes = parallel.gather_rows(parallel.unshard(seq))
  return codes.reshape((len(codes),) + gen.code_shape)


def sample_in_chunks(gen: Generator, rparams: Any, *, key: jax.Array, num: int,
                     chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
  """`num` code maps, `chunk_size` at a time (rounded up to the global device count); chunk c draws with
  `fold_in(key, c)` (as `generation.sample_in_chunks`). Yields (start, i32[n, h, w])."""
  ndev = parallel.device_count()
  per_device = max(1, -(-min(chunk_size, num) // ndev))
  per_chunk = per_device * ndev
  program = sample_program(gen, per_device)
  for index, start in enumerate(range(0, num, per_chunk)):
    codes = sample_code_maps(gen, rparams, key=jax.random.fold_in(key, index), per_device=per_device,
                             program=program)
    yield start, codes[:min(per_chunk, num - start)]


def inpaint_code_maps(gen: Generator, rparams: Any, *, key: jax.Array, mask: np.ndarray, known: np.ndarray,
                      protocol: str) -> tuple[np.ndarray, dict]:
  """Completes `known: i32[N, h, w]` outside `mask: bool[N, h, w]` (True = known) by `protocol` on every device
  of every host (N divides by the global device count; all hosts get all N completions, in order).

  Returns:
    (i32[N, h, w] completions with the known codes kept, extras): for 'reweight', `ess: f32[N]` (the effective
    sample size of each image's N candidates) and `log_weight: f32[N]` (the chosen candidate's).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown AR inpainting protocol {protocol!r}: one of {PROTOCOLS}")
  model, kwargs, n = gen.ar.model, _filter(gen), int(gen.ar_sampling["candidates"])
  mine = parallel.host_slice(len(known))
  flat = lambda a: parallel.to_devices(parallel.shard(a[mine].reshape(len(a[mine]), -1)))  # noqa: E731
  mask_d, known_d = flat(mask), flat(known.astype(np.int32))

  def fn(params, k, m, key):
    decoder = autoregressive.gpt_decoder(model, params)
    if protocol == "prefix":
      codes = autoregressive.sample(decoder, device_key(key), k.shape[0], known=k, known_mask=m, **kwargs)
      return codes, jnp.ones((k.shape[0],)), jnp.zeros((k.shape[0],))
    return autoregressive.inpaint_reweighted(decoder, device_key(key), k, m, num_candidates=n, **kwargs)

  program = generation.program_for(gen, ("ar_inpaint", protocol),
                                   lambda: parallel.pmap(fn, in_axes=(0, 0, 0, None)))
  t0 = time.perf_counter()
  codes, ess, log_w = program(rparams, known_d, mask_d, key)
  codes.block_until_ready()
  logging.info("AR inpainting (%s): %d maps in %.1fs", protocol_name(protocol, n), len(known),
               time.perf_counter() - t0)
  gather = lambda a: parallel.gather_rows(parallel.unshard(a))  # noqa: E731
  codes = gather(codes).reshape(known.shape)
  extras = {} if protocol == "prefix" else {"ess": gather(ess), "log_weight": gather(log_w)}
  return codes, extras


def inpaint_heldout(config: Any, gen: Generator, num_images: int, protocol: str,
                    mask_spec: str | None = None) -> dict[str, np.ndarray]:
  """`generation.inpaint_heldout` with the AR prior's `protocol` (same images, same masks, same seed)."""
  key = jax.random.key(config.inpaint.seed)
  rparams = parallel.replicate(gen.ar.params)
  return generation.inpaint_heldout(
      config, gen, num_images, mask_spec=mask_spec,
      complete=lambda mask, known: inpaint_code_maps(gen, rparams, key=key, mask=mask, known=known,
                                                     protocol=protocol))
