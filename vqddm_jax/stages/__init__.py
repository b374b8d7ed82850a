"""The pipeline's stages, one module each, all of the same shape, and the ordered registry `main` runs.

Every stage module has
  run(config, workdir) -> StageResult   does the work (training stages resume from their latest checkpoint)
  is_done(config, workdir) -> bool      cheap: True when the stage's outputs exist and were made from the
                                        current inputs (a newer checkpoint upstream makes it False)
Each entry names the last link of the work directory's chain that its stage consumes (`lineage`), and
`run_stage` refuses to run a stage on outputs made from something that has changed since; it skips a stage
that is done; `--mode=all` runs the stages of `PIPELINE` in order, so rerunning it
on a finished work directory skips everything, and after a change upstream reruns what depends on it.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any

from absl import logging

from vqddm_jax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class StageResult:
  """What a stage did.

  Attributes:
    stage: the stage's name.
    completed: False when the stage stopped early (SIGTERM); rerunning the same command resumes it.
    outputs: the main files and folders it wrote (paths as strings).
    skipped: True when the stage was already done and did nothing.
  """
  stage: str
  completed: bool = True
  outputs: tuple[str, ...] = ()
  skipped: bool = False


@dataclasses.dataclass(frozen=True)
class Stage:
  """A registry entry: the stage's name (also its module under `vqddm_jax.stages` and its `--mode`)."""
  name: str
  help: str
  in_pipeline: bool = True
  # The last link of the work directory's chain (`lineage`) this stage reads or extends: the chain up to it
  # must be current before the stage runs ('tokenizer' = ReFiT or stage 1, as configured).
  consumes: str | None = None

  def module(self) -> types.ModuleType:
    # Imported on use: `--help` and config errors never pay for JAX, TensorFlow or the models.
    return importlib.import_module(f"vqddm_jax.stages.{self.name}")


REGISTRY: tuple[Stage, ...] = (
    Stage("train_vqvae", "stage 1: train the VQ-VAE on images (workdir/vqvae/)"),
    Stage("refit", "ReFiT: rebuild the codebook by k-means, fine-tune with the encoder frozen "
          "(workdir/refit/; skipped when config.refit.enabled is False)", consumes="refit"),
    Stage("encode", "encode training and held-out images to code maps (workdir/codes/)",
          consumes="tokenizer"),
    Stage("train_prior", "stage 2: train the discrete-diffusion prior on code maps (workdir/prior/)",
          consumes="prior"),
    Stage("sample", "sample code maps with the prior and decode them (workdir/samples/<step>/)",
          consumes="prior"),
    Stage("evaluate", "quality report: FD/KID/precision/recall, bits per code, usage, steps table "
          "(workdir/eval/)", consumes="prior"),
    Stage("inpaint", "complete held-out images outside config.inpaint.mask (workdir/inpaint/)",
          in_pipeline=False, consumes="prior"),
    # Not in `all`: evaluate computes the statistics on first use; this mode computes them once, apart from
    # training, for reuse in other runs (--config.eval.reference_stats).
    Stage("reference_stats", "FID reference statistics of the whole training split "
          "(workdir/eval/reference_stats_<network>.npz; needs no trained model)", in_pipeline=False),
)
PIPELINE: tuple[Stage, ...] = tuple(s for s in REGISTRY if s.in_pipeline)
BY_NAME: dict[str, Stage] = {s.name: s for s in REGISTRY}


def run_stage(stage: Stage, config: Any, workdir: Workdir) -> StageResult:
  """Runs `stage` unless it is done; returns what it did. On several hosts every host must see the stage
  in the same state (they run its collectives together), which is checked."""
  from vqddm_jax import agreement, lineage
  module = stage.module()
  lineage.check(config, workdir, stage.consumes)
  if agreement.same_on_every_process(module.is_done(config, workdir), f"whether {stage.name} is done"):
    logging.info("%s: already done under %s: skipping", stage.name, workdir.root)
    return StageResult(stage.name, skipped=True)
  return module.run(config, workdir)
