"""What the experiment files share: their arguments, the paper's settings of the 256×256 configs, and the
authors'-release variant.

`--config=configs/celeba.py:ARG` passes ARG to `get_config`. ARG is a comma-separated list of at most one data
source (e.g. `celeb_a`, `folder`) and any of the variants below, in any order: `:authors`, `:folder,authors`,
`:ar,authors`.

The `ar` variant adds taming-transformers' autoregressive prior at its published faces size beside the
diffusion prior (`taming_ar`), so that a pod run gives the paper's comparison (docs/comparison.md).

The `authors` variant switches the settings in which the authors' released code and configs differ from the
paper text, or from a choice this codebase makes where the paper says nothing (docs/method.md §5.1): use it to
reproduce the behaviour of their released checkpoints; the default follows the paper. Like `config_schema`,
this module imports neither JAX nor TensorFlow.
"""
from __future__ import annotations

from typing import Iterable

import ml_collections

from vqddm_jax.config_checks import set_field
from vqddm_jax.config_schema import gan_optim, optim_defaults

VARIANTS = ("authors", "ar", "taming_f16")

# LSUN-Church: the authors' prior saw only the first 31,000 code maps of the training set (method.md §5.1).
AUTHORS_LSUN_CODE_MAPS = 31_000

# Field -> value of the authors' release, shared by both 256×256 data sets. `prior.time_scale` is not here: it
# is tied to T (see `apply_authors`).
AUTHORS_FIELDS = {
    "diffusion.schedule": "cosine_sqrt",  # α_t = √clip(f(t)/f(t−1), 0.001, 1): method.md §3.2
    "diffusion.parametrization": "x0",  # logits = F(z_t, t), no one-hot of z_t added: §3.4
    "prior.softmax_q": False,  # their linear attention normalises k only: §3.4
    "prior_train.ema_decay": 0.0,  # no parameter EMA: their checkpoints hold the raw weights (§5)
    "refit.kmeans_init": "afkmc2",  # AFK-MC² seeding (§4)
    "refit.kmeans_iters": 0,  # then full-batch Lloyd as scikit-learn KMeans, no mini-batch phase (§4)
    "refit.kmeans_refine_iters": 300,  # scikit-learn's max_iter = 300 (§4)
    # The ReFiT fine-tune: L1 + LPIPS + a fixed 0.8 × the GAN generator loss from step 0 (§4).
    "refit.recon_loss": "l1",
    "refit.perceptual_weight": 1.0,
    "refit.disc_weight": 0.8,
    "refit.disc_start": 0,
    "refit.disc_adaptive": False,
    # Both of its Adams (autoencoder and discriminator): lr 2e-6, betas (0.5, 0.9), constant (§4).
    **{f"refit.{opt}.{name}": value for opt in ("optim", "disc_optim") for name, value in (
        ("lr", 2e-6), ("b1", 0.5), ("b2", 0.9), ("schedule", "constant"), ("warmup_steps", 0),
        ("grad_clip", 0.0))},
}


def parse_arg(arg: str | None, *, file: str, sources: Iterable[str]) -> tuple[str, frozenset[str]]:
  """Splits a config-file argument into (data source or '', set of variants).

  Args:
    arg: the text after `:` in `--config=FILE:ARG`, or None / '' for none.
    file: the config file's name, for error messages.
    sources: the data-source words this file accepts (at most one may be given).

  Raises:
    ValueError: an unknown word, two data sources, or a word given twice; the message lists what is allowed.
  """
  sources = tuple(sources)
  allowed = (f"{file} takes an argument of comma-separated words: at most one data source of "
             f"{', '.join(repr(s) for s in sources) or '(none)'} and any of the variants "
             f"{', '.join(repr(v) for v in VARIANTS)} (e.g. ':authors' or ':{(sources or ('x',))[0]},authors')")
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  unknown = [w for w in words if w not in sources and w not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown config argument {unknown[0]!r} in {arg!r}: {allowed}")
  if len(set(words)) != len(words):
    raise ValueError(f"config argument {arg!r} repeats a word: {allowed}")
  given = [w for w in words if w in sources]
  if len(given) > 1:
    raise ValueError(f"config argument {arg!r} names two data sources {given}: {allowed}")
  return (given[0] if given else ""), frozenset(w for w in words if w in VARIANTS)


def paper_stage1_256(config: ml_collections.ConfigDict, *, num_steps: int, eval_examples: int) -> None:
  """The paper's f16 VQGAN-style stage 1 for 256×256 RGB data (CelebA-HQ, LSUN): 16×16 codes, K = 1024."""
  config.data.update(image_size=256, channels=3, resize="center_crop", shuffle_buffer=2_000)
  config.vqvae.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                      z_channels=256, embed_dim=256, codebook_size=1024, groups=32)
  # The VQGAN losses with taming-transformers' values: L1 + LPIPS + 0.8 · adaptive hinge GAN from step 10k;
  # both Adams (0.5, 0.9) at its base rate 4.5e-6 times the global batch.
  lr = 4.5e-6 * 64
  config.vqvae_train.update(batch_size=64, num_steps=num_steps, optim=gan_optim(lr), ema_decay=0.999,
                            beta=0.25, recon_loss="l1", perceptual_weight=1.0, disc_weight=0.8,
                            disc_start=10_000, disc_optim=gan_optim(lr), log_every=100,
                            checkpoint_every=5_000, image_every=2_000, eval_every=10_000,
                            eval_examples=eval_examples)


def paper_stage2(config: ml_collections.ConfigDict, *, num_codes: int, batch_size: int,
                 num_steps: int) -> None:
  """ReFiT and stage 2 as in the authors' configs (docs/method.md §4, §5): k-means on 20,000 features to K'
  codes, T = 4000, the 117 M-parameter denoiser, Adam 1e-4 with cosine decay, global batch `batch_size`."""
  # The fine-tune uses stage 1's losses with the discriminator on from step 0 (it starts from stage 1's).
  # The authors' Adam rate 2e-6 was for a batch of 8 and up to 400k steps; this is taming's base rate
  # times the batch, as in stage 1, so that 20k steps move the decoder to the new codebook.
  refit_lr = 4.5e-6 * 64
  config.refit.update(num_codes=num_codes, num_features=20_000, kmeans_iters=300, batch_size=64,
                      num_steps=20_000, optim=gan_optim(refit_lr), ema_decay=0.999, log_every=100,
                      checkpoint_every=2_000, image_every=2_000, eval_every=5_000, eval_examples=1_000,
                      recon_loss="l1", perceptual_weight=1.0, disc_weight=0.8, disc_start=0,
                      disc_optim=gan_optim(refit_lr))
  config.diffusion.update(num_steps=4000)
  config.prior.update(ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2)
  config.prior_train.update(batch_size=batch_size, num_steps=num_steps, optim=optim_defaults(1e-4),
                            ema_decay=0.9999, log_every=100, checkpoint_every=5_000, eval_every=25_000,
                            eval_examples=1_000, eval_t_samples=32)
  config.sample.update(num_samples=64, chunk_steps=200)
  config.eval.update(num_samples=10_000, inpaint_images=1_000)


# taming-transformers' faces transformer (the issue's facts; docs/comparison.md): 24 layers, 16 heads, width 1664,
# a block of 256 = 16×16 codes, ~800 M parameters with K = 1024.
TAMING_AR = {"width": 1664, "num_layers": 24, "num_heads": 16, "mlp_ratio": 4, "dropout": 0.0}


def taming_ar(config: ml_collections.ConfigDict, *, batch_size: int, num_steps: int) -> None:
  """Turns on the AR prior at taming's faces size (`TAMING_AR`), trained with taming's optimiser: AdamW (0.9,
  0.95), weight decay 0.01 on the linear weights, a constant rate of its base 4.5e-6 times the global batch.
  bfloat16 compute (parameters stay float32): at this size float32 is for checks, not pods."""
  config.ar.update(**TAMING_AR, dtype="bfloat16")
  config.ar_train.update(
      enabled=True, batch_size=batch_size, num_steps=num_steps,
      optim=dict(optim_defaults(4.5e-6 * batch_size), b2=0.95, schedule="constant", weight_decay=0.01),
      ema_decay=0.9999, log_every=100, checkpoint_every=5_000, eval_every=25_000, eval_examples=1_000)


# taming-transformers' released f16 tokenizers (ImageNet f16-1024 / f16-16384, FFHQ, CelebA-HQ, FacesHQ
# f16-1024): 256 px, ch 128, 2 residual blocks, attention at 16 px, z 256, embedding 256 (docs/pretrained.md).
TAMING_F16 = {"ch": 128, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "attn_resolutions": (16,),
              "z_channels": 256, "embed_dim": 256, "groups": 32, "dropout": 0.0, "attn_at_resolution": 256}


def taming_f16(config: ml_collections.ConfigDict, *, codebook_size: int = 1024) -> None:
  """Stage 1 imported from a released taming f16 tokenizer converted by `python -m vqddm_jax.convert`: the
  tokenizer fields of the checkpoint (K = `codebook_size`), attention placed by its nominal 256 px, β on the
  codebook term as it was trained, and no stage-1 training (`vqvae_train.num_steps = 0`); the converted folder
  is given with `--config.vqvae_train.init_from=DIR`."""
  config.vqvae.update(**TAMING_F16, codebook_size=codebook_size)
  config.vqvae_train.update(num_steps=0, codebook_loss="taming_legacy")


def apply_authors(config: ml_collections.ConfigDict, *, max_code_maps: int = 0) -> None:
  """Switches `config` (in place) to the authors' released settings; the experiment file lists them.

  `prior.time_scale` becomes a reference 4000 / `diffusion.num_steps`: their network embeds the step scaled
  to the range of T = 4000, so it is 1 at their T = 4000 and follows a `--config.diffusion.num_steps=`
  override. (Their network also sees the step one lower, t − 1; that off-by-one is not reproduced, see
  docs/method.md §6.)

  Args:
    config: a config built by `config_schema.base_config` and the paper presets.
    max_code_maps: `prior_train.max_code_maps`, 0 to keep every training code map.
  """
  for field, value in AUTHORS_FIELDS.items():
    set_field(config, field, value)
  config.prior.time_scale = 4000.0 / config.diffusion.get_ref("num_steps").to_float()
  config.prior_train.max_code_maps = max_code_maps


def apply_variants(config: ml_collections.ConfigDict, variants: frozenset[str], *, max_code_maps: int = 0) -> None:
  """The 256×256 experiment files' variants, in their one order: `ar` (taming's faces-size transformer, batch
  128, 300k steps), `taming_f16` (stage 1 imported), `authors` (with `max_code_maps` for `apply_authors`)."""
  if "ar" in variants:
    taming_ar(config, batch_size=128, num_steps=300_000)
  if "taming_f16" in variants:
    taming_f16(config)
  if "authors" in variants:
    apply_authors(config, max_code_maps=max_code_maps)
