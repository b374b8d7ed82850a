"""`--mode=inpaint`: global-context completion of held-out images (docs/method.md §3.7), no retraining.

The held-out images' code maps (from the code store) are the known z_0; `config.inpaint.mask` says which code
positions are known. The reverse process runs from noise and, after every step, overwrites the known positions
with a sample of q(z_{t-1} | z_0^known), so the unknown positions are generated in the context of all known
ones, anywhere in the map. Writes `workdir/inpaint/<mask>/`: `grid.png` (rows of masked input / completion /
original), `inpaint.npz` (mask, known codes, completed codes, images, originals) and `inpaint.json`.
Not part of `--mode=all` (the evaluate stage writes its own completions under `workdir/eval/`).
"""
from __future__ import annotations

from typing import Any

from absl import logging

from vqddm_jax import generation, masks, parallel
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def inputs(config: Any, workdir: Workdir) -> dict | None:
  """The checkpoints and settings the completions are made from (None while a checkpoint is missing)."""
  models = generation.current_record(config, workdir)
  icfg = config.inpaint
  return None if models is None else dict(models, mask=icfg.mask, num_images=icfg.num_images, seed=icfg.seed,
                                          steps=icfg.steps or config.diffusion.num_steps)


def record_file(config: Any, workdir: Workdir, record: dict) -> Any:
  del record  # The mask names the folder; the rest is compared inside the record.
  return workdir.inpaint(masks.mask_name(config.inpaint.mask)).record


def run(config: Any, workdir: Workdir) -> StageResult:
  """Inpaints `config.inpaint.num_images` held-out images."""
  gen = generation.load_generator(config, workdir)  # Names what is missing, if anything.
  record = inputs(config, workdir)
  result = generation.inpaint_heldout(config, gen, config.inpaint.num_images)
  files = workdir.inpaint(masks.mask_name(config.inpaint.mask))
  if parallel.is_main_process():
    generation.save_inpainting(files, result, config.data.image_size, record)
  logging.info("inpainted %d held-out images (mask %s, %.0f%% of codes known, prior step %d): %s",
               len(result["codes"]), config.inpaint.mask, 100 * result["mask"].mean(), gen.prior.step,
               files.png)
  return StageResult("inpaint", True, (str(files.png), str(files.npz)))
