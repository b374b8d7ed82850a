"""`--mode=train_vqvae`, stage 1: train the VQ-VAE on images (docs/method.md §2).

The losses are `config.vqvae_train`'s: reconstruction + codebook terms, plus LPIPS and the PatchGAN when
`perceptual_weight` / `disc_weight` are positive (docs/method.md §2.1; the discriminator's state is then
part of the checkpoints). Writes `workdir/vqvae/`: `checkpoints/` (Orbax), `tensorboard/`,
`images/recon_<step>.png` (held-out originals above their reconstructions) and `eval.json` (held-out MSE,
codebook usage, perplexity).
"""
from __future__ import annotations

from typing import Any

from vqddm_jax import data
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.stages import StageResult
from vqddm_jax.training import keys, loop, optim, vq_trainer, vqvae_step, writers
from vqddm_jax.workdir import Workdir

STAGE = "vqvae"


def is_done(config: Any, workdir: Workdir) -> bool:
  return loop.trained_to(workdir.vqvae.checkpoints, config.vqvae_train.num_steps)


def run(config: Any, workdir: Workdir) -> StageResult:
  """Trains (or resumes) stage 1 to `config.vqvae_train.num_steps`."""
  tcfg = config.vqvae_train
  data.prepare(config.data)
  model = build_vqvae(config.vqvae, config.data.channels)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  state = vqvae_step.init_state(model, optimizer, keys.derive(config.seed, keys.Stream.VQVAE_INIT),
                                image_shape)
  writers.log_parameters("VQ-VAE", state.params)
  state = vq_trainer.attach_discriminator(config, tcfg, state)
  _, completed = vq_trainer.train_vq(config, workdir, stage=STAGE, tcfg=tcfg, model=model,
                                     optimizer=optimizer, state=state, beta=config.vqvae_train.beta)
  return StageResult(STAGE, completed, (str(workdir.vqvae.root),))
