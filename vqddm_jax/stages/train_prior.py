"""`--mode=train_prior`, stage 2: the discrete-diffusion prior on this host's stored code maps.

Writes `workdir/prior/`: `checkpoints/` (with the importance-sampling history), `tensorboard/` and `eval.json`
(the latest held-out −ELBO in bits per code, next to log2 K, the score of a uniform prior; a class-conditional
prior's given each map's label and given the null label). Each checkpoint records which code maps it was
trained on.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from absl import logging

from vqddm_jax import lineage, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.training import keys, loop, optim, prior_step, writers
from vqddm_jax.workdir import Workdir

STAGE = "prior"


def is_done(config: Any, workdir: Workdir) -> bool:
  """Trained to `num_steps` (that it was trained on the code maps the store holds is `lineage`'s check)."""
  return loop.trained_to(workdir.prior.checkpoints, config.prior_train.num_steps)


def run(config: Any, workdir: Workdir) -> StageResult:
  """Trains (or resumes) stage 2 to `config.prior_train.num_steps`."""
  tcfg = config.prior_train
  paths = workdir.prior
  store = workdir.code_store
  meta = codes_lib.require_meta(store)
  train_codes, train_labels = codes_lib.load_labelled_codes(store, config.data.train_split,
                                                             config.prior.num_classes)
  eval_codes, eval_labels = codes_lib.load_labelled_codes(store, config.data.eval_split, config.prior.num_classes)
  num_classes, code_shape = int(meta["codebook_size"]), tuple(train_codes.shape[1:])
  logging.info("stage 2 on %d training / %d held-out code maps of %s, K = %d", len(train_codes),
               len(eval_codes), code_shape, num_classes)
  if 0 < tcfg.max_code_maps < len(train_codes):
    logging.info("stage 2 draws only from the first %d of the %d training code maps "
                 "(config.prior_train.max_code_maps)", tcfg.max_code_maps, len(train_codes))
  model = prior_lib.build_denoiser(config, num_classes)
  sched = prior_lib.build_schedule(config, num_classes)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  state = prior_step.init_state(model, optimizer, keys.derive(config.seed, keys.Stream.PRIOR_INIT),
                                code_shape, config.diffusion.num_steps)
  writers.log_parameters("denoiser", state.params)
  p_step = parallel.pmap(functools.partial(
      prior_step.train_step, model=model, optimizer=optimizer, sched=sched,
      parametrization=config.diffusion.parametrization,
      use_importance=config.diffusion.importance_sampling, ema_decay=tcfg.ema_decay,
      t_buckets=tcfg.t_buckets, hybrid_ce_weight=tcfg.hybrid_ce_weight, label_dropout=tcfg.label_dropout),
      in_axes=parallel.STEP_AXES, donate_state=True)
  writer = writers.make_writer(paths.tensorboard, is_main=parallel.is_main_process())
  open_batches = lambda pos: codes_lib.host_training_batches(  # noqa: E731
      train_codes, global_batch_size=tcfg.batch_size, seed=config.seed, position=pos, max_maps=tcfg.max_code_maps,
      labels=train_labels)
  _, completed = loop.run(loop.LoopConfig.from_section(STAGE, paths.checkpoints, tcfg), init_state=state,
                          p_step=p_step, open_batches=open_batches,
                          key=keys.derive(config.seed, keys.Stream.PRIOR_TRAIN), writer=writer,
                          heldout=_heldout(config, model, sched, eval_codes, eval_labels, paths.eval_json),
                          meta={"codes": lineage.holds(config, workdir, "codes")})
  return StageResult(STAGE, completed, (str(paths.root),))


def _heldout(config: Any, model: Any, sched: Any, eval_codes: np.ndarray, eval_labels: np.ndarray | None,
             path: Any) -> loop.HeldOut:
  """The periodic held-out −ELBO (bits per code, with its Monte-Carlo standard error and log2 K, the score
  of a uniform prior), written to `path` (`prior/eval.json`). A conditional prior is scored given each map's
  label (`nelbo_bits_per_code`) and given the null label (`null_label_nelbo_bits_per_code`, its unconditional
  model), with the same t and z_t draws."""
  tcfg = config.prior_train
  p_evals = {null: parallel.pmap(functools.partial(
      prior_step.eval_step, model=model, sched=sched, parametrization=config.diffusion.parametrization,
      t_samples=tcfg.eval_t_samples, null_label=null), in_axes=(0, 0, None))
      for null in ((False, True) if eval_labels is not None else (False,))}
  key = keys.derive(config.seed, keys.Stream.PRIOR_EVAL)

  def evaluate(step: int, rstate: Any) -> dict:
    scores = {}
    for null, p_eval in p_evals.items():
      batches = codes_lib.host_eval_batches(eval_codes, global_batch_size=tcfg.batch_size,
                                            max_examples=tcfg.eval_examples, labels=eval_labels)
      scores[null] = prior_step.heldout_nelbo(p_eval, rstate.ema_params,
                                              (parallel.to_devices(b) for b in batches), key)
    results = scores[False]
    if True in scores:
      results.update(null_label_nelbo_bits_per_code=scores[True]["nelbo_bits_per_code"],
                     null_label_stderr=scores[True]["stderr"])
    # `step` in the middle: where eval.json has always held it.
    results.update(uniform_bits_per_code=float(np.log2(sched.num_classes)), step=step,
                   t_samples_per_map=tcfg.eval_t_samples)
    return results

  def describe(r: dict) -> str:
    null = (f"; null label {r['null_label_nelbo_bits_per_code']:.4f} ± {r['null_label_stderr']:.4f}"
            if "null_label_nelbo_bits_per_code" in r else "")
    return (f"-ELBO {r['nelbo_bits_per_code']:.4f} ± {r['stderr']:.4f} bits/code{null} (uniform prior: "
            f"{r['uniform_bits_per_code']:.4f}; Monte Carlo over {r['t_samples_per_map']} t per map, "
            f"{r['num_maps']} maps)")

  return loop.HeldOut(tcfg.eval_every, evaluate, path, describe=describe, unplotted=("num_maps",))
