"""Training a VQ-VAE for one stage: stage 1 (`vqvae`) and the ReFiT fine-tune (`refit`) share this driver.

It wires the per-device step — `vqvae_step.py` (reconstruction + codebook terms) or `vqgan_step.py` (with
LPIPS and the PatchGAN, when the stage's section asks for them; docs/tokenizer_losses.md) — into the shared
loop, with periodic reconstruction grids and held-out evaluations written to the stage's folder of the work
directory.
"""
from __future__ import annotations

import functools
from typing import Any

import optax

from vqddm_jax import data, parallel
from vqddm_jax import files as files_lib
from vqddm_jax.models import lpips
from vqddm_jax.models.discriminator import NLayerDiscriminator, build_discriminator
from vqddm_jax.models.vqvae import VQVAE
from vqddm_jax.training import keys, loop, optim, vqgan_step, vqvae_step, writers
from vqddm_jax.training.gan_losses import LossSettings
from vqddm_jax.workdir import Workdir


def heldout_batches(config: Any, tcfg: Any) -> Any:
  """One pass over the held-out split in global batches of `tcfg.batch_size` (at most `tcfg.eval_examples`
  images; 0 = all)."""
  return data.eval_batches(config.data, split=config.data.eval_split, global_batch_size=tcfg.batch_size,
                           num_shards=parallel.local_device_count(),
                           max_examples=tcfg.eval_examples or None)


def heldout_metrics(config: Any, tcfg: Any, model: VQVAE, params: Any) -> dict[str, float]:
  """Held-out MSE, codebook usage and perplexity of host parameters `params` (see `vqvae_step`)."""
  p_eval = parallel.pmap(functools.partial(vqvae_step.eval_step, model=model))
  return vqvae_step.heldout_metrics(p_eval, parallel.replicate(params), heldout_batches(config, tcfg))


def discriminator_and_optimizer(config: Any, tcfg: Any
                                ) -> tuple[NLayerDiscriminator, optax.GradientTransformation]:
  """The discriminator of `config.discriminator` and its optimiser (`tcfg.disc_optim`)."""
  return build_discriminator(config.discriminator), optim.make_optimizer(tcfg.disc_optim, tcfg.num_steps)


def attach_discriminator(config: Any, tcfg: Any, state: vqvae_step.VQState,
                         disc_variables: dict | None = None) -> vqvae_step.VQState:
  """`state` as is when the stage's losses use no discriminator; else a `VQGANState` with `disc_variables`
  ({'params', 'batch_stats'}; default: fresh ones from the run's seed) and a fresh optimiser."""
  if not LossSettings.from_section(tcfg).uses_discriminator:
    return state
  disc, disc_optimizer = discriminator_and_optimizer(config, tcfg)
  if disc_variables is None:
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    disc_variables = vqgan_step.init_discriminator(
        disc, keys.derive(config.seed, keys.Stream.DISCRIMINATOR_INIT), image_shape)
  writers.log_parameters("discriminator", disc_variables["params"])
  return vqgan_step.with_discriminator(state, disc_variables, disc_optimizer)


def make_p_step(config: Any, tcfg: Any, *, model: VQVAE, optimizer: optax.GradientTransformation,
                beta: float, donate_state: bool = True) -> Any:
  """The stage's pmapped step `(replicated state, device batch, key) -> (state, metrics)`.

  With `tcfg.perceptual_weight` and `tcfg.disc_weight` both 0 it is `vqvae_step.train_step` (reconstruction
  and codebook terms only; no LPIPS or discriminator is built); otherwise `vqgan_step.train_step`, with the
  LPIPS weights loaded once and replicated to the devices when perceptual_weight > 0.
  """
  settings = LossSettings.from_section(tcfg)
  # ReFiT's section has no convention field: its fine-tune has no commitment term (β = 0).
  codebook_loss = tcfg.get("codebook_loss", "ours")
  if settings.plain:
    step_fn = functools.partial(vqvae_step.train_step, model=model, optimizer=optimizer, beta=beta,
                                recon_loss=tcfg.recon_loss, ema_decay=tcfg.ema_decay, codebook_loss=codebook_loss)
    return parallel.pmap(step_fn, in_axes=parallel.STEP_AXES, donate_state=donate_state)
  disc, disc_optimizer = (discriminator_and_optimizer(config, tcfg) if settings.uses_discriminator
                          else (None, None))
  step_fn = vqgan_step.make_train_step(model=model, optimizer=optimizer, disc=disc,
                                       disc_optimizer=disc_optimizer, beta=beta, settings=settings,
                                       ema_decay=tcfg.ema_decay, codebook_loss=codebook_loss)
  if settings.perceptual_weight == 0:
    return parallel.pmap(step_fn, in_axes=parallel.STEP_AXES, donate_state=donate_state)
  p_step = parallel.pmap(step_fn, in_axes=parallel.STEP_AXES + (0,), donate_state=donate_state)
  lpips_params = parallel.replicate(lpips.load_lpips_weights())
  return lambda state, batch, key: p_step(state, batch, key, lpips_params)


def train_vq(config: Any, workdir: Workdir, *, stage: str, tcfg: Any, model: VQVAE,
             optimizer: optax.GradientTransformation, state: vqvae_step.VQState, beta: float
             ) -> tuple[vqvae_step.VQState, bool]:
  """Trains (or resumes) the VQ-VAE of `stage` ('vqvae' or 'refit') under `workdir.train(stage)`.

  Args:
    config: the run's config (data, seed, the discriminator's architecture).
    workdir: the run's work directory.
    stage: which training stage's folder and metric names to use.
    tcfg: the stage's section (`config.vqvae_train` or `config.refit`): batch_size, num_steps, ema_decay,
      the losses (recon_loss, perceptual_weight, disc_*) and the loop and evaluation periods.
    model, optimizer: the model and its optimiser (ReFiT's zeroes the frozen encoder's updates).
    state: the host state used when no checkpoint exists yet (with the discriminator's when the losses use
      one: `attach_discriminator`).
    beta: the commitment weight.

  Returns:
    (host state, completed): completed is False when SIGTERM stopped the run early.
  """
  paths = workdir.train(stage)
  p_step = make_p_step(config, tcfg, model=model, optimizer=optimizer, beta=beta)
  p_eval = parallel.pmap(functools.partial(vqvae_step.eval_step, model=model))
  writer = writers.make_writer(paths.tensorboard, is_main=parallel.is_main_process())
  grid_images = parallel.unshard(next(iter(heldout_batches(config, tcfg)))["image"])[:16]

  def write_grid(step: int, rstate: Any) -> None:
    if parallel.is_main_process():
      grid = vqvae_step.reconstruction_grid(model, parallel.unreplicate(rstate.ema_params), grid_images)
      files_lib.write_png(paths.image(step), grid)
      writer.write_images(step, {f"{stage}/reconstructions": grid[None]})

  def evaluate(step: int, rstate: Any) -> dict:
    del step
    return vqvae_step.heldout_metrics(p_eval, rstate.ema_params, heldout_batches(config, tcfg))

  open_batches = lambda pos: data.train_batches(  # noqa: E731
      config.data, global_batch_size=tcfg.batch_size, num_shards=parallel.local_device_count(),
      seed=config.seed, position=pos)
  return loop.run(loop.LoopConfig.from_section(stage, paths.checkpoints, tcfg), init_state=state,
                  p_step=p_step, open_batches=open_batches,
                  key=keys.derive(config.seed, keys.Stream.VQ_TRAIN), writer=writer,
                  periodic=[(tcfg.image_every, write_grid)],
                  heldout=loop.HeldOut(tcfg.eval_every, evaluate, paths.eval_json))
