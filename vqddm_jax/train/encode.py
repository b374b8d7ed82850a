"""`--mode=encode`: the training and held-out images as code maps, once, under `workdir/codes/`.

The tokenizer is the final VQ-VAE of the pipeline: the ReFiT checkpoint when ReFiT is enabled, otherwise
stage 1 (EMA parameters, restored read-only). Re-running skips the work when the stored maps were made from
the same checkpoint; a missing or mismatching checkpoint fails with a message naming it.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from vqddm_jax import data, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.train import vqvae as stage1


def tokenizer_source(config: Any, workdir: str) -> tuple[str, int | None]:
  """(checkpoint directory, codebook size override) of the VQ-VAE whose codes stage 2 models."""
  refit = config.get("refit")
  if refit is not None and refit.enabled:
    return os.path.join(workdir, "refit", "checkpoints"), int(refit.num_codes)
  return stage1.stage_dirs(workdir)["checkpoints"], None


def restore_tokenizer(config: Any, workdir: str) -> tuple[Any, Any, int, str]:
  """(model, EMA params, step, directory) of the final VQ-VAE."""
  directory, k = tokenizer_source(config, workdir)
  model, params, step = stage1.restore_ema_params(config, directory, codebook_size=k)
  return model, params, step, directory


def encode_split(model: Any, rparams: Any, cfg_data: Any, split: str, batch_size: int) -> np.ndarray:
  """All code maps of `split` on this host, in the pipeline's deterministic order: `i32[N, h, w]`."""
  p_encode = parallel.pmap_eval(
      lambda p, x: model.apply({"params": p}, x, method=type(model).encode_to_indices))
  total = -(-data.num_examples(cfg_data, split) // parallel.process_count())
  out, done, t0, last_log = [], 0, time.perf_counter(), 0.0
  for batch in data.eval_batches(cfg_data, split=split, global_batch_size=batch_size,
                                 num_shards=parallel.local_device_count()):
    codes = parallel.unshard(p_encode(rparams, parallel.to_devices(batch["image"])))
    keep = parallel.unshard(batch["mask"])
    out.append(codes[keep])
    done += int(keep.sum())
    now = time.perf_counter() - t0
    if now - last_log > 10 or done >= total:
      last_log = now
      rate = done / max(now, 1e-9)
      logging.info("encode %s: %d/%d images (%.0f images/s, ETA %.0fs)", split, done, total, rate,
                   max(total - done, 0) / max(rate, 1e-9))
  return np.concatenate(out).astype(np.int32)


def encode_dataset(config: Any, workdir: str) -> bool:
  """Encodes the train and held-out splits (skipped when already stored from the same checkpoint)."""
  model, params, step, directory = restore_tokenizer(config, workdir)
  store = codes_lib.codes_dir(workdir, parallel.process_index(), parallel.process_count())
  wanted = {"source": directory, "step": step, "codebook_size": int(model.codebook_size),
            "splits": [config.data.train_split, config.data.eval_split]}
  meta = codes_lib.read_meta(store)
  if meta is not None and all(meta.get(k) == v for k, v in wanted.items()):
    logging.info("code maps under %s are up to date (%s step %d): skipping", store, directory, step)
    return True
  data.prepare(config.data)
  rparams = parallel.replicate(params)
  splits = {s: encode_split(model, rparams, config.data, s, config.encode.batch_size)
            for s in dict.fromkeys(wanted["splits"])}
  if os.path.exists(store):  # Stale maps from another checkpoint: replace them whole.
    shutil.rmtree(store)
  os.makedirs(store)
  codes_lib.write_codes(store, splits, wanted)
  logging.info("stored %s code maps under %s", {s: c.shape for s, c in splits.items()}, store)
  return True
