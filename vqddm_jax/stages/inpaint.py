"""`--mode=inpaint`: completion of held-out images under a mask (docs/method.md §3.7), no retraining.

The held-out images' code maps (from the code store) are the known z_0; `config.inpaint.mask` says which code
positions are known. The diffusion prior runs the reverse process from noise and, after every step, overwrites
the known positions with a sample of q(z_{t-1} | z_0^known), so the unknown positions are generated in the
context of all known ones, anywhere in the map. Writes `workdir/inpaint/<mask>/`: `grid.png` (rows of masked
input / completion / original), `inpaint.npz` (mask, known codes, completed codes, images, originals) and
`inpaint.json`. With `config.ar_train.enabled`, the AR prior completes the same images with the same mask by
both of its protocols (`ar_generation`), in `workdir/inpaint/<mask>/ar_prefix/` and `ar_reweight<N>/` (whose
`inpaint.npz` adds each image's effective sample size). Not part of `--mode=all` (the evaluate stage writes
its own completions under `workdir/eval/`).
"""
from __future__ import annotations

from typing import Any

from absl import logging

from vqddm_jax import ar_generation, generation, masks, parallel, stages
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def outputs(config: Any, workdir: Workdir) -> list[tuple[Any, dict]] | None:
  """(record file, record now) of the diffusion prior's completions and, when enabled, of each AR protocol's
  (None while a checkpoint is missing)."""
  icfg = config.inpaint
  settings = dict(mask=icfg.mask, num_images=icfg.num_images, seed=icfg.seed)
  models = generation.current_record(config, workdir)
  if models is None:
    return None
  name = masks.mask_name(icfg.mask)
  found = [(workdir.inpaint(name).record, dict(models, **settings, steps=icfg.steps or config.diffusion.num_steps))]
  if config.ar_train.enabled:
    ar = generation.ar_record(config, workdir)
    if ar is None:
      return None
    for protocol in ar_generation.PROTOCOLS:
      folder = ar_generation.protocol_name(protocol, config.ar_sample.candidates)
      found.append((workdir.inpaint(name, folder).record,
                    dict(ar, **settings, protocol=protocol, candidates=config.ar_sample.candidates)))
  return found


def run(config: Any, workdir: Workdir) -> StageResult:
  """Inpaints `config.inpaint.num_images` held-out images with each prior (and protocol) not yet current."""
  gen = generation.load_generator(config, workdir)  # Names what is missing, if anything.
  name, written = masks.mask_name(config.inpaint.mask), []
  for _, record in stages.outputs_to_make(outputs(config, workdir)):
    protocol = record.get("protocol")
    if protocol is None:
      result, files = generation.inpaint_heldout(config, gen, config.inpaint.num_images), workdir.inpaint(name)
    else:
      result = ar_generation.inpaint_heldout(config, gen, config.inpaint.num_images, protocol)
      files = workdir.inpaint(name, ar_generation.protocol_name(protocol, config.ar_sample.candidates))
    if parallel.is_main_process():
      generation.save_inpainting(files, result, config.data.image_size, record)
    logging.info("inpainted %d held-out images (mask %s, %.0f%% of codes known, %s): %s", len(result["codes"]),
                 config.inpaint.mask, 100 * result["mask"].mean(),
                 f"AR prior, {protocol}" if protocol else f"prior step {gen.prior.step}", files.png)
    written += [str(files.png), str(files.npz)]
  return StageResult("inpaint", True, tuple(written))
