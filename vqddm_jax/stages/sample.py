"""`--mode=sample`: sample code maps with the prior, decode them with the tokenizer, save them.

Writes `workdir/samples/<prior step>/samples_S<steps>_n<N>_seed<seed>.png` (a grid; `_tau<τ>` before the
suffix when `config.sample.temperature` is not 1), `.npz` (codes i32[N,h,w], images
f32[N,H,W,C] in [-1, 1]) and `.json` (what made them). `config.sample.steps` (or `--sample_steps`) = 0 runs all
T reverse steps, S < T a strided subset. Done while a newer prior or tokenizer checkpoint has not appeared.
"""
from __future__ import annotations

import time
from typing import Any

import jax
from absl import logging

from vqddm_jax import generation, parallel
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def inputs(config: Any, workdir: Workdir) -> dict | None:
  """The checkpoints and settings the samples are made from (None while a checkpoint is missing)."""
  models = generation.current_record(config, workdir)
  scfg = config.sample
  return None if models is None else dict(models, num_samples=scfg.num_samples, seed=scfg.seed,
                                          steps=scfg.steps or config.diffusion.num_steps)


def _files(workdir: Workdir, record: dict) -> Any:
  return workdir.samples(record["prior_step"], record["steps"], num_samples=record["num_samples"],
                         seed=record["seed"], temperature=record["temperature"])


def record_file(config: Any, workdir: Workdir, record: dict) -> Any:
  del config
  return _files(workdir, record).record


def run(config: Any, workdir: Workdir) -> StageResult:
  """Samples `config.sample.num_samples` images."""
  scfg = config.sample
  gen = generation.load_generator(config, workdir)  # Names what is missing, if anything.
  record = inputs(config, workdir)
  steps = record["steps"]
  per_device = -(-scfg.num_samples // parallel.device_count())
  t0 = time.perf_counter()
  codes = generation.sample_code_maps(
      gen, parallel.replicate(gen.prior.params), key=jax.random.key(scfg.seed), per_device=per_device,
      num_sampling_steps=scfg.steps or None, chunk=scfg.chunk_steps)[:scfg.num_samples]
  seconds = time.perf_counter() - t0
  images = generation.decode_codes(gen.tokenizer, codes, scfg.decode_batch_size)
  files = _files(workdir, record)
  if parallel.is_main_process():
    files_lib.write_png(files.png, images_lib.image_grid(images))
    files_lib.write_npz(files.npz, codes=codes, images=images)
    files_lib.write_json(files.record, dict(record, seconds=seconds))
  logging.info("%d samples with %d reverse steps in %.1fs: %s and %s", len(codes), steps, seconds,
               files.png, files.npz)
  return StageResult("sample", True, (str(files.png), str(files.npz)))
