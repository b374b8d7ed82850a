"""The named key streams of training: every random key a training stage uses comes from these numbers.

A stage's keys derive from the run's base key `jax.random.key(config.seed)` by folding in one `Stream`;
inside the steps, the step number, the global example index or the device index is folded in after that
(`training/vqvae_step.py`, `vqgan_step.py`, `prior_step.py`), and the prior's step splits an example's key by
`Draw`. Keys are derived, never carried, so a resumed run draws what an uninterrupted one draws.

The values are the numbers the streams had before they were named; changing one changes every result of
the stages that use it. Outside these streams the seed also drives the data order (`data/`), ReFiT's choice of
feature vectors (NumPy, `stages/refit.py`) and its k-means seeding (the base key itself).
"""
from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
  """What is folded into the base key for each use."""
  VQVAE_INIT = 0  # stage 1's initial VQ-VAE parameters
  VQ_TRAIN = 1  # the loop key of stage 1 and of the ReFiT fine-tune (the step folds in step and device)
  DISCRIMINATOR_INIT = 2  # a fresh PatchGAN discriminator (stage 1, or ReFiT when stage 1 trained none)
  PRIOR_INIT = 10  # the denoiser's initial parameters
  PRIOR_EVAL = 11  # the held-out −ELBO's t and z_t draws (the batch index, then the example, folded in)
  PRIOR_TRAIN = 12  # the loop key of stage 2 (the step folds in step and global example index)
  AR_INIT = 20  # the autoregressive prior's initial parameters
  AR_TRAIN = 22  # the loop key of the AR prior (only its dropout uses it: step, then device, folded in)


class Draw(enum.IntEnum):
  """What the prior's train step folds into a key (`training/prior_step.train_step`)."""
  T = 0  # into an example's key: its t ~ p(t)
  Z_T = 1  # into an example's key: its z_t ~ q(z_t | z_0)
  DROPOUT = 2  # into the loop key (then the step and the device): the dropout masks
  LABEL = 3  # into an example's key: whether its class label is replaced by the null label (label dropout)


def derive(seed: int, stream: Stream) -> jax.Array:
  """The key of `stream`: `fold_in(jax.random.key(seed), stream)`."""
  return jax.random.fold_in(jax.random.key(seed), int(stream))
