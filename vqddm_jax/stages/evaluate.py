"""`--mode=evaluate`: a report a user can trust — `workdir/eval/report.json` and `report.md`.

The protocol (which feature network, the reference statistics, chunked sampling and scoring, the report's
rows) is `vqddm_jax.evaluation.protocol` (docs/evaluation.md); this stage restores the models, runs it and
writes the report. The report records the checkpoints and settings it was made from; it is redone when they
change.
"""
from __future__ import annotations

import time
from typing import Any

from absl import logging

from vqddm_jax import generation, parallel
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax.evaluation import comparison, conditional, protocol
from vqddm_jax.evaluation import report as report_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir

RECORD_KEY = "inputs"  # The report stores what it was made from under this key.


def inputs(config: Any, workdir: Workdir) -> dict | None:
  """What the report depends on besides the data: the checkpoints and the evaluation settings (None while a
  checkpoint is missing); with the AR prior, its checkpoint and sampling settings under 'ar'."""
  models = generation.current_record(config, workdir)
  icfg = config.inpaint
  if models is None:
    return None
  record = dict(models, eval=config.eval.to_dict(), num_steps=config.diffusion.num_steps,
                inpaint={"mask": icfg.mask, "seed": icfg.seed, "steps": icfg.steps})
  if config.ar_train.enabled:
    ar = generation.ar_record(config, workdir)
    if ar is None:
      return None
    record["ar"] = dict(ar, candidates=config.ar_sample.candidates)
  return record


def outputs(config: Any, workdir: Workdir) -> list[tuple[Any, dict]] | None:
  """The report (one for both priors) and the record it must hold now."""
  record = inputs(config, workdir)
  return None if record is None else [(workdir.eval_report("json"), record)]


def run(config: Any, workdir: Workdir) -> StageResult:
  """Writes `workdir/eval/report.json` and `report.md` (and evaluate's own inpainting under `eval/`)."""
  t_start = time.perf_counter()
  gen = generation.load_generator(config, workdir)
  report, grids = protocol.evaluate(config, workdir, gen, inputs=inputs(config, workdir),
                                    compare=comparison.compare, conditional=conditional.conditional_section)
  report["seconds"] = time.perf_counter() - t_start
  if parallel.is_main_process():
    files_lib.write_png(workdir.eval_samples_grid, images_lib.image_grid(grids["samples"][:64]))
    if "ar_samples" in grids:
      files_lib.write_png(workdir.eval_ar_samples_grid, images_lib.image_grid(grids["ar_samples"][:64]))
    for scale, images in grids.get("class_grids", {}).items():
      files_lib.write_png(workdir.eval_class_grid(scale),
                          images_lib.image_grid(images, ncol=conditional.GRID_COLUMNS))
    files_lib.write_json(workdir.eval_report("json"), report)
    files_lib.write_text(workdir.eval_report("md"), report_lib.markdown(report))
  logging.info("evaluation report: %s", workdir.eval_report("md"))
  return StageResult("evaluate", True, (str(workdir.eval_report("md")), str(workdir.eval_report("json"))))


