"""`--mode=train_ar`: the autoregressive prior beside the diffusion prior, on the same stored code maps.

taming-transformers' prior (a GPT reading the code map in raster order, docs/comparison.md), trained by the
shared loop (pmapped, EMA, exact resume, non-finite guard, TensorBoard) when `config.ar_train.enabled`. Writes
`workdir/ar/`: `checkpoints/`, `tensorboard/` and `eval.json` (the held-out bits per code: the exact
negative log-likelihood, next to log2 K, the score of a uniform prior). Each checkpoint records which code
maps it was trained on. A stage of its own rather than a kind of `train_prior`, so that one work directory
holds both priors of the comparison, each in its folder, made from the same code maps.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from absl import logging

from vqddm_jax import lineage, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.models import ar_prior
from vqddm_jax.stages import StageResult
from vqddm_jax.training import ar_step, keys, loop, optim, writers
from vqddm_jax.workdir import Workdir

STAGE = "ar"


def is_done(config: Any, workdir: Workdir) -> bool:
  """Done when disabled, or trained to `num_steps` (the code maps it was trained on are `lineage`'s check)."""
  return not config.ar_train.enabled or loop.trained_to(workdir.ar.checkpoints, config.ar_train.num_steps)


def run(config: Any, workdir: Workdir) -> StageResult:
  """Trains (or resumes) the AR prior to `config.ar_train.num_steps`."""
  tcfg, paths, store = config.ar_train, workdir.ar, workdir.code_store
  if not tcfg.enabled:
    return StageResult(STAGE, skipped=True)
  meta = codes_lib.require_meta(store)
  train_codes = codes_lib.load_codes(store, config.data.train_split)
  eval_codes = codes_lib.load_codes(store, config.data.eval_split)
  num_classes, code_shape = int(meta["codebook_size"]), tuple(train_codes.shape[1:])
  logging.info("AR prior on %d training / %d held-out code maps of %s (raster order), K = %d",
               len(train_codes), len(eval_codes), code_shape, num_classes)
  model = ar_prior.build_gpt(config, num_classes, code_shape)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  state = ar_step.init_state(model, optimizer, keys.derive(config.seed, keys.Stream.AR_INIT))
  writers.log_parameters("AR prior", state.params)
  p_step = parallel.pmap(functools.partial(ar_step.train_step, model=model, optimizer=optimizer,
                                           ema_decay=tcfg.ema_decay),
                         in_axes=parallel.STEP_AXES, donate_state=True)
  writer = writers.make_writer(paths.tensorboard, is_main=parallel.is_main_process())
  open_batches = lambda pos: codes_lib.host_training_batches(  # noqa: E731
      train_codes, global_batch_size=tcfg.batch_size, seed=config.seed, position=pos)
  _, completed = loop.run(loop.LoopConfig.from_section(STAGE, paths.checkpoints, tcfg), init_state=state,
                          p_step=p_step, open_batches=open_batches,
                          key=keys.derive(config.seed, keys.Stream.AR_TRAIN), writer=writer,
                          heldout=_heldout(config, model, eval_codes, paths.eval_json),
                          meta={"codes": lineage.holds(config, workdir, "codes")})
  return StageResult(STAGE, completed, (str(paths.root),))


def _heldout(config: Any, model: Any, eval_codes: np.ndarray, path: Any) -> loop.HeldOut:
  """The periodic held-out bits per code (exact, with the standard error over maps, and log2 K), written to
  `path` (`ar/eval.json`)."""
  tcfg = config.ar_train
  p_eval = parallel.pmap(functools.partial(ar_step.eval_step, model=model), in_axes=(0, 0))

  def evaluate(step: int, rstate: Any) -> dict:
    batches = codes_lib.host_eval_batches(eval_codes, global_batch_size=tcfg.batch_size,
                                          max_examples=tcfg.eval_examples)
    results = ar_step.heldout_bits(p_eval, rstate.ema_params, (parallel.to_devices(b) for b in batches))
    results.update(uniform_bits_per_code=float(np.log2(model.num_classes)))
    return results

  def describe(r: dict) -> str:
    return (f"{r['bits_per_code']:.4f} ± {r['stderr']:.4f} bits/code, exact (uniform prior: "
            f"{r['uniform_bits_per_code']:.4f}; standard error over {r['num_maps']} maps)")

  return loop.HeldOut(tcfg.eval_every, evaluate, path, describe=describe, unplotted=("num_maps",))
