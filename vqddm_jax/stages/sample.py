"""`--mode=sample`: sample code maps with the prior (and the AR prior, when enabled), decode them, save them.

Writes `workdir/samples/<prior step>/samples_S<steps>_n<N>_seed<seed>.png` (a grid; `_tau<τ>` before the
suffix when `config.sample.temperature` is not 1), `.npz` (codes i32[N,h,w], images f32[N,H,W,C] in [-1, 1])
and `.json` (what made them). `config.sample.steps` (or `--sample_steps`) = 0 runs all T reverse steps, S < T a
strided subset. With `config.ar_train.enabled`, the AR prior's samples of the same count and seed go beside
them: `workdir/samples/ar/<AR step>/samples_n<N>_seed<seed>[_tau<τ>][_k<k>][_p<p>].*` (`config.ar_sample`).
Each set is done while a newer checkpoint of its prior or the tokenizer has not appeared. A class-conditional
prior samples `sample.class_labels` in turn (default every class), in blocks of one class (the grid has one row
per class), guided at `sample.guidance_scale` (`_s<s>[_y<labels>]` in the name; the labels in the `.npz`).
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from absl import logging

from vqddm_jax import ar_generation, generation, parallel, stages
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def outputs(config: Any, workdir: Workdir) -> list[tuple[Any, dict]] | None:
  """(record file, record now) of the diffusion prior's samples and, when enabled, the AR prior's (None while
  a checkpoint is missing)."""
  scfg = config.sample
  models = generation.current_record(config, workdir)
  if models is None:
    return None
  record = dict(models, num_samples=scfg.num_samples, seed=scfg.seed,
                steps=scfg.steps or config.diffusion.num_steps)
  found = [(_files(workdir, record).record, record)]
  if config.ar_train.enabled:
    ar = generation.ar_record(config, workdir)
    if ar is None:
      return None
    ar = dict(ar, num_samples=scfg.num_samples, seed=scfg.seed)
    found.append((_ar_files(workdir, ar).record, ar))
  return found


def _files(workdir: Workdir, record: dict) -> Any:
  return workdir.samples(record["prior_step"], record["steps"], num_samples=record["num_samples"],
                         seed=record["seed"], temperature=record["temperature"],
                         guidance_scale=record.get("guidance_scale"),
                         class_labels=tuple(record.get("class_labels", ())))


def sample_labels(config: Any) -> tuple[np.ndarray | None, int | None]:
  """A conditional prior's label of each of the `sample.num_samples` samples, `i32[N]`, in blocks of one class
  (`sample.class_labels` in turn, or every class), and the block length (the grid's columns: one row per
  class); (None, None) for an unconditional prior."""
  classes = tuple(config.sample.class_labels) or tuple(range(config.prior.num_classes))
  if not classes:
    return None, None
  per_class = -(-config.sample.num_samples // len(classes))
  return np.repeat(np.asarray(classes, np.int32), per_class)[:config.sample.num_samples], per_class


def _ar_files(workdir: Workdir, record: dict) -> Any:
  return workdir.ar_samples(record["ar_step"], num_samples=record["num_samples"], seed=record["seed"],
                            temperature=record["temperature"], top_k=record["top_k"], top_p=record["top_p"])


def run(config: Any, workdir: Workdir) -> StageResult:
  """Samples `config.sample.num_samples` images with each prior whose samples are not current."""
  scfg = config.sample
  gen = generation.load_generator(config, workdir)  # Names what is missing, if anything.
  per_device = -(-scfg.num_samples // parallel.device_count())
  labels, per_class = sample_labels(config)
  written = []
  for _, record in stages.outputs_to_make(outputs(config, workdir)):
    t0 = time.perf_counter()
    if "ar_step" in record:
      codes = ar_generation.sample_code_maps(gen, parallel.replicate(gen.ar.params),
                                             key=jax.random.key(scfg.seed), per_device=per_device)
      files = _ar_files(workdir, record)
    else:
      codes = generation.sample_code_maps(
          gen, parallel.replicate(gen.prior.params), key=jax.random.key(scfg.seed), per_device=per_device,
          num_sampling_steps=scfg.steps or None, chunk=scfg.chunk_steps, labels=labels)
      files = _files(workdir, record)
    seconds = time.perf_counter() - t0
    conditional = labels is not None and "ar_step" not in record
    written += _save(config, gen, files, codes[:scfg.num_samples], dict(record, seconds=seconds),
                     labels if conditional else None, per_class if conditional else None)
  return StageResult("sample", True, tuple(written))


def _save(config: Any, gen: generation.Generator, files: Any, codes: np.ndarray, record: dict,
          labels: np.ndarray | None = None, ncol: int | None = None) -> list[str]:
  images = generation.decode_codes(gen.tokenizer, codes, config.sample.decode_batch_size)
  if parallel.is_main_process():
    files_lib.write_png(files.png, images_lib.image_grid(images, ncol=ncol))
    files_lib.write_npz(files.npz, codes=codes, images=images, **({} if labels is None else {"labels": labels}))
    files_lib.write_json(files.record, record)
  logging.info("%d samples in %.1fs: %s and %s", len(codes), record["seconds"], files.png, files.npz)
  return [str(files.png), str(files.npz)]
