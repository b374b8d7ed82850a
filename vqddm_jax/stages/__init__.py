"""The pipeline's stages, one module each, all of the same shape, and the ordered registry `main` runs.

Every stage module has
  run(config, workdir) -> StageResult   does the work (training stages resume from their latest checkpoint)
and says when it is done in one of two ways:
  is_done(config, workdir) -> bool      training stages and encode: trained to the configured step (encode:
                                        the code maps are the current tokenizer's), or
  outputs(config, workdir)              stages that make outputs from trained ones (sample, inpaint, edit,
    -> [(record file, record)] | None   evaluate): for each output it makes now (one per prior), where it
                                        stores the record of what it was made from (under RECORD_KEY of that
                                        JSON file, if set) and that record as it would be now (the checkpoints
                                        and settings; None while a checkpoint is missing); the registry
                                        compares the two (`is_done`), in one place.
The registry entries say what each stage needs and makes: `consumes` is the last link of the work directory's
chain (`lineage`) the stage reads, which must be current before it runs; `makes` the link it makes; `after`
the stages whose outputs it is made from; `folders` its outputs. From these the registry tells a user what
to remove when a link is stale (the maker's folders and every stage's that follows it). `run_stage` skips a
stage that is done; `--mode=all` runs the stages of `PIPELINE` in order, so rerunning it on a finished work
directory skips everything, and after a change upstream reruns what depends on it.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Callable

from absl import logging
from etils import epath

from vqddm_jax.errors import MismatchError
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
  # The last links of the work directory's chain (`lineage`) this stage reads or extends: the chain up to each
  # must be current before the stage runs ('tokenizer' = ReFiT or stage 1, as configured; a disabled link,
  # ReFiT or the AR prior, is passed over).
  consumes: tuple[str, ...] = ()
  makes: str | None = None  # The chain link this stage makes (`lineage.LINKS`), if any.
  after: tuple[str, ...] = ()  # The stages whose outputs this one is made from.
  folders: Callable[[Workdir], tuple[epath.Path, ...]] = lambda workdir: ()  # What it writes.

  def module(self) -> types.ModuleType:
    # Imported on use: `--help` and config errors never pay for JAX, TensorFlow or the models.
    return importlib.import_module(f"vqddm_jax.stages.{self.name}")


_PRIORS = ("prior", "ar")  # What the generating stages read: both priors, each while it is enabled.
_TRAINED = ("train_prior", "train_ar")

REGISTRY: tuple[Stage, ...] = (
    Stage("train_vqvae", "stage 1: train the VQ-VAE on images (workdir/vqvae/)", makes="vqvae",
          folders=lambda w: (w.vqvae.root,)),
    Stage("refit", "ReFiT: rebuild the codebook by k-means, fine-tune with the encoder frozen "
          "(workdir/refit/; skipped when config.refit.enabled is False)", consumes=("refit",), makes="refit",
          after=("train_vqvae",), folders=lambda w: (w.refit.root,)),
    Stage("encode", "encode training and held-out images to code maps (workdir/codes/)",
          consumes=("tokenizer",), makes="codes", after=("train_vqvae", "refit"),
          folders=lambda w: (w.code_store,)),
    Stage("train_prior", "stage 2: train the discrete-diffusion prior on code maps (workdir/prior/)",
          consumes=("prior",), makes="prior", after=("encode",), folders=lambda w: (w.prior.root,)),
    Stage("train_ar", "the autoregressive prior (taming's GPT over the same code maps in raster order) "
          "beside the diffusion prior (workdir/ar/; skipped unless config.ar_train.enabled)",
          consumes=("ar",), makes="ar", after=("encode",), folders=lambda w: (w.ar.root,)),
    Stage("sample", "sample code maps with the prior (and the AR prior) and decode them "
          "(workdir/samples/)", consumes=_PRIORS, after=_TRAINED, folders=lambda w: (w.samples_dir,)),
    Stage("evaluate", "quality report: FD/KID/precision/recall, bits per code, usage, steps table, the two "
          "priors side by side (workdir/eval/)", consumes=_PRIORS, after=_TRAINED,
          folders=lambda w: (w.eval_dir,)),
    Stage("inpaint", "complete held-out images outside config.inpaint.mask (workdir/inpaint/)",
          in_pipeline=False, consumes=_PRIORS, after=_TRAINED, folders=lambda w: (w.inpaint_dir,)),
    Stage("edit", "mix two held-out images' code maps at step t (a fraction λ from the first) and re-noise "
          "single ones to t, then denoise with the prior (workdir/edit/)", in_pipeline=False,
          consumes=("prior",), after=("train_prior",), folders=lambda w: (w.edit_dir,)),
    # Not in `all`: evaluate computes the statistics on first use; this mode computes them once, apart from
    # training, for reuse in other runs (--config.eval.reference_stats).
    Stage("reference_stats", "FID reference statistics of the whole training split "
          "(workdir/eval/reference_stats_<network>.npz; needs no trained model)", in_pipeline=False),
)
PIPELINE: tuple[Stage, ...] = tuple(s for s in REGISTRY if s.in_pipeline)
BY_NAME: dict[str, Stage] = {s.name: s for s in REGISTRY}


def followers(name: str) -> list[Stage]:
  """The stages made, directly or not, from stage `name`'s outputs, in registry order."""
  found: set[str] = set()
  for stage in REGISTRY:  # Registry order is a topological order: every stage comes after its inputs.
    if name in stage.after or found & set(stage.after):
      found.add(stage.name)
  return [s for s in REGISTRY if s.name in found]


def stale_remedy(stale: Any, workdir: Workdir) -> str:
  """What to do about a stale link (`lineage.Stale`): which folders to remove, and what to rerun."""
  maker = next(s for s in REGISTRY if s.makes == stale.link)
  later = [p for s in followers(maker.name) for p in s.folders(workdir) if p.exists()]
  if maker.name == "encode":  # Encoding replaces the code maps whole; what was made from them must go.
    return ("Rerun --mode=encode to encode with the current tokenizer" +
            (f"; what was made from the old maps must then go too: remove {', '.join(map(str, later))}"
             if later else "") + ", then rerun --mode=all")
  remove = [*maker.folders(workdir), *later]
  return (f"To redo it, remove {', '.join(map(str, remove))} and rerun --mode=all (or --mode={maker.name} "
          "and the stages after it)")


def is_done(stage: Stage, config: Any, workdir: Workdir) -> bool:
  """Whether `stage`'s outputs exist and were made from what its inputs are now (see the module doc)."""
  module = stage.module()
  if not hasattr(module, "outputs"):
    return module.is_done(config, workdir)
  from vqddm_jax import files
  wanted = module.outputs(config, workdir)
  return wanted is not None and all(files.same_record(path, record, key=getattr(module, "RECORD_KEY", None))
                                    for path, record in wanted)


def outputs_to_make(wanted: list[tuple[Any, dict]]) -> list[tuple[Any, dict]]:
  """Of a stage's `outputs`, those not current (one prior trained further: only its outputs are redone), or all
  of them when every one is (the stage was run directly rather than through `run_stage`, which skips a stage
  that is done: it does the work again)."""
  from vqddm_jax import files
  return [(path, record) for path, record in wanted if not files.same_record(path, record)] or wanted


def run_stage(stage: Stage, config: Any, workdir: Workdir) -> StageResult:
  """Runs `stage` unless it is done; returns what it did. Refuses (MismatchError) when what it consumes is
  stale, saying what to remove. On several hosts every host must see the stage in the same state (they run
  its collectives together), which is checked."""
  from vqddm_jax import agreement, lineage
  try:
    lineage.check(config, workdir, stage.consumes)
  except lineage.StaleError as e:
    raise MismatchError(f"{e.describe()}. {stale_remedy(e.stale, workdir)}") from None
  if agreement.same_on_every_process(is_done(stage, config, workdir), f"whether {stage.name} is done"):
    logging.info("%s: already done under %s: skipping", stage.name, workdir.root)
    return StageResult(stage.name, skipped=True)
  return stage.module().run(config, workdir)
