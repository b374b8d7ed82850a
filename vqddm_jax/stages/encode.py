"""`--mode=encode`: the training and held-out images as code maps, once, in the work directory's code store.

The tokenizer is the final VQ-VAE of the pipeline: the ReFiT checkpoint when ReFiT is enabled, otherwise
stage 1 (EMA parameters, restored read-only). The store records which checkpoint made it; the stage is done
while that is still the latest one, and re-encodes (replacing the store whole) when it is not. On several
hosts each encodes its share of every split; process 0 gathers them in split order and writes the one store.
When the images' source has class labels (`data.class_names`), each map's label is stored with it and the class
names in the store's meta file (what a class-conditional prior trains on).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from absl import logging

from vqddm_jax import checkpointing, data, lineage, parallel, restore
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def wanted_record(config: Any, workdir: Workdir, step: int | None = None) -> dict:
  """What the store must have been made from: tokenizer stage and checkpoint step, K, splits."""
  stage, k = restore.tokenizer_stage(config)
  if step is None:
    step = checkpointing.latest_step(workdir.train(stage).checkpoints)
  return {"tokenizer": stage, "step": step, "codebook_size": int(k or config.vqvae.codebook_size),
          "splits": [config.data.train_split, config.data.eval_split]}


def is_done(config: Any, workdir: Workdir) -> bool:
  """Done while the store holds the code maps of the tokenizer's latest checkpoint (`lineage`)."""
  return (lineage.holds(config, workdir, "codes") is not None
          and lineage.first_stale(config, workdir, "codes") is None)


def encode_split(model: Any, rparams: Any, cfg_data: Any, split: str, batch_size: int,
                 with_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """All code maps of `split` (every host's share, gathered), in the split's order: `i32[N, h, w]`, and with
  `with_labels` the images' class labels `i32[N]` (else None)."""
  p_encode = parallel.pmap(
      lambda p, x: model.apply({"params": p}, x, method=type(model).encode_to_indices))
  mine = parallel.host_slice(data.num_examples(cfg_data, split), remainder="first")  # what eval_batches reads
  total = mine.stop - mine.start
  out, labels, done, t0, last_log = [], [], 0, time.perf_counter(), 0.0
  for batch in data.eval_batches(cfg_data, split=split, global_batch_size=batch_size,
                                 num_shards=parallel.local_device_count(), with_labels=with_labels):
    codes = parallel.unshard(p_encode(rparams, parallel.to_devices(batch["image"])))
    keep = parallel.unshard(batch["mask"])
    out.append(codes[keep])
    if with_labels:
      labels.append(parallel.unshard(batch["label"])[keep])
    done += int(keep.sum())
    now = time.perf_counter() - t0
    if now - last_log > 10 or done >= total:
      last_log = now
      rate = done / max(now, 1e-9)
      logging.info("encode %s: %d/%d images (%.0f images/s, ETA %.0fs)", split, done, total, rate,
                   max(total - done, 0) / max(rate, 1e-9))
  gathered = parallel.gather_rows(np.concatenate(out).astype(np.int32))
  return gathered, (parallel.gather_rows(np.concatenate(labels).astype(np.int32)) if with_labels else None)


def run(config: Any, workdir: Workdir) -> StageResult:
  """Encodes the train and held-out splits with the final tokenizer and stores them (replacing stale maps),
  with the images' class labels and class names when the source has labels."""
  tokenizer = restore.restore_tokenizer(config, workdir)
  wanted = wanted_record(config, workdir, tokenizer.step)
  data.prepare(config.data)
  class_names = data.class_names(config.data)
  rparams = parallel.replicate(tokenizer.params)
  encoded = {s: encode_split(tokenizer.model, rparams, config.data, s, config.encode.batch_size,
                             with_labels=class_names is not None)
             for s in dict.fromkeys(wanted["splits"])}
  splits = {s: c for s, (c, _) in encoded.items()}
  labels = {s: y for s, (_, y) in encoded.items()} if class_names is not None else None
  store = workdir.code_store
  if parallel.is_main_process():
    if store.exists():  # Stale maps from another checkpoint: replace them whole.
      store.rmtree()
    store.mkdir(parents=True)
    codes_lib.write_codes(store, splits, wanted, labels, class_names)
  parallel.barrier("encode: code maps written")
  logging.info("stored %s code maps under %s", {s: c.shape for s, c in splits.items()}, store)
  return StageResult("encode", True, (str(store),))
