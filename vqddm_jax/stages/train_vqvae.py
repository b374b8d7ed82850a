"""`--mode=train_vqvae`, stage 1: train the VQ-VAE on images (docs/method.md §2).

The losses are `config.vqvae_train`'s: reconstruction + codebook terms, plus LPIPS and the PatchGAN when
`perceptual_weight` / `disc_weight` are positive (docs/method.md §2.1; the discriminator's state is then
part of the checkpoints). Writes `workdir/vqvae/`: `checkpoints/` (Orbax), `tensorboard/`,
`images/recon_<step>.png` (held-out originals above their reconstructions) and `eval.json` (held-out MSE,
codebook usage, perplexity). With `vqvae_train.init_from` (a tokenizer converted by `python -m
vqddm_jax.convert`, docs/pretrained.md) stage 1 starts from those weights instead of fresh ones; with
`num_steps = 0` as well, stage 1 is that tokenizer (checkpoint 0), imported, and ReFiT and encode follow.
"""
from __future__ import annotations

from typing import Any

from vqddm_jax import data
from vqddm_jax.convert import imported
from vqddm_jax.errors import MismatchError
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
  if tcfg.init_from:
    params = imported_params(config)
    state = state.replace(params=params, ema_params=params, opt_state=optimizer.init(params))
  writers.log_parameters("VQ-VAE", state.params)
  state = vq_trainer.attach_discriminator(config, tcfg, state)
  _, completed = vq_trainer.train_vq(config, workdir, stage=STAGE, tcfg=tcfg, model=model,
                                     optimizer=optimizer, state=state, beta=config.vqvae_train.beta)
  return StageResult(STAGE, completed, (str(workdir.vqvae.root),))


# Fields a converted tokenizer need not share with the config: they change no parameter's shape or value.
_FREE_FIELDS = ("dtype", "dropout")


def imported_params(config: Any) -> Any:
  """The parameters of the converted tokenizer `config.vqvae_train.init_from`, after checking that it is the
  model `config.vqvae` and `config.data.channels` describe.

  Raises:
    MissingInputError: no converted tokenizer there.
    MismatchError: a field differs (the message lists each, with the value to set).
  """
  folder = config.vqvae_train.init_from
  fields, params = imported.load_vqvae(folder)
  record = imported.read_record(folder, "taming_vqgan")
  wanted = {f"vqvae.{k}": v for k, v in fields.items() if k not in _FREE_FIELDS}
  wanted["data.channels"] = record["data"]["channels"]
  have = {f"vqvae.{k}": config.vqvae[k] for k in fields if k not in _FREE_FIELDS}
  have["data.channels"] = config.data.channels
  differ = [f"config.{k} = {have[k]!r} (the tokenizer's: {v!r})" for k, v in wanted.items()
            if (tuple(have[k]) if isinstance(have[k], (list, tuple)) else have[k]) != v]
  if differ:
    raise MismatchError(f"config.vqvae_train.init_from = {folder!r} holds another tokenizer than the config "
                        f"describes: {'; '.join(differ)}. Set those fields to the tokenizer's values "
                        "(its model.json), e.g. with configs/celeba.py:taming_f16")
  return params
