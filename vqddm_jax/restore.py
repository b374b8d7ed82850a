"""Restoring trained models from a work directory, read-only: the tokenizer (stage 1 or ReFiT) and the prior.

Every later stage (encode, sample, inpaint, evaluate) starts here; nothing here imports training code. It sits
above `models/` (which knows nothing of work directories, checkpoints or modes) and beside `generation`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from vqddm_jax import checkpointing, lineage
from vqddm_jax.models import ar_prior
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.models.unet import UNet
from vqddm_jax.models.vqvae import VQVAE, build_vqvae
from vqddm_jax.workdir import Workdir

# Which mode writes each training stage's checkpoints (for "run --mode=... first" messages).
_MAKER = {"vqvae": "train_vqvae", "refit": "refit", "prior": "train_prior", "ar": "train_ar"}


@dataclasses.dataclass(frozen=True)
class Restored:
  """A model, its EMA parameters on the host, and where they came from."""
  model: Any
  params: Any
  stage: str  # "vqvae", "refit", "prior" or "ar"
  step: int


def tokenizer_stage(config: Any) -> tuple[str, int | None]:
  """(stage, codebook size override) of the final VQ-VAE: ReFiT's K' codes when ReFiT is on, else stage 1
  (`lineage.tokenizer_link`)."""
  stage = lineage.tokenizer_link(config)
  return stage, (int(config.refit.num_codes) if stage == "refit" else None)


def vqvae_abstract_params(model: VQVAE, config: Any) -> Any:
  """Shapes and dtypes of the parameters of `model` for the config's images (no computation)."""
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))["params"]


def restore_vqvae(config: Any, workdir: Workdir, stage: str, codebook_size: int | None = None) -> Restored:
  """The EMA parameters of the latest VQ-VAE checkpoint of `stage` ('vqvae' or 'refit').

  Raises:
    MissingInputError: no checkpoint (the message names the mode that makes it).
    MismatchError: the checkpoint's arrays do not fit the config's model.
  """
  model = build_vqvae(config.vqvae, config.data.channels, codebook_size=codebook_size)
  params, step = _restore_ema(workdir.train(stage).checkpoints, vqvae_abstract_params(model, config), stage)
  return Restored(model, params, stage, step)


def restore_tokenizer(config: Any, workdir: Workdir) -> Restored:
  """The final VQ-VAE of the pipeline (see `tokenizer_stage`)."""
  stage, k = tokenizer_stage(config)
  return restore_vqvae(config, workdir, stage, codebook_size=k)


def restore_prior(config: Any, workdir: Workdir, num_classes: int, code_shape: tuple[int, int]) -> Restored:
  """The denoiser and EMA parameters of the latest stage-2 checkpoint."""
  model: UNet = prior_lib.build_denoiser(config, num_classes)
  abstract = jax.eval_shape(lambda: prior_lib.init_params(model, jax.random.key(0), code_shape))
  params, step = _restore_ema(workdir.prior.checkpoints, abstract, "prior")
  return Restored(model, params, "prior", step)


def restore_ar(config: Any, workdir: Workdir, num_classes: int, code_shape: tuple[int, int]) -> Restored:
  """The GPT and EMA parameters of the latest checkpoint of the autoregressive prior."""
  model = ar_prior.build_gpt(config, num_classes, code_shape)
  abstract = jax.eval_shape(lambda: ar_prior.init_params(model, jax.random.key(0)))
  params, step = _restore_ema(workdir.ar.checkpoints, abstract, "ar")
  return Restored(model, params, "ar", step)


def _restore_ema(directory: epath.Path, abstract: Any, stage: str) -> tuple[Any, int]:
  return checkpointing.restore_latest_ema(directory, abstract,
                                          missing_hint=f"run --mode={_MAKER[stage]} first")
