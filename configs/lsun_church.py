"""LSUN church_outdoor 256 (docs/method.md §2, §5): the same f16 stage 1 as CelebA-HQ, K = 1024.

Data: the TFDS `lsun/church_outdoor` builder prepared by the user (see README: "Real data"); `:folder` reads a
folder of images given by `--config.data.image_folder=...` instead.

`:ar` (combinable with the others, e.g. `:ar,authors`) adds taming-transformers' autoregressive prior at its faces
size beside the diffusion prior, on the same code maps (`config_variants.taming_ar`; docs/comparison.md):
ar.{width, num_layers, num_heads} = 1664, 24, 16 (~800 M parameters, 16×16 = 256 positions), bfloat16 compute,
AdamW (0.9, 0.95) with weight decay 0.01 at a constant 4.5e-6 × ar_train.batch_size (128), 300k steps; evaluate
then adds the two-prior comparison. taming sampled faces with top-k 250: `--config.ar_sample.top_k=250`.

`:taming_f16` starts from a converted release of taming-transformers' f16 tokenizers instead of training stage 1
(`--config.vqvae_train.init_from=DIR`; see configs/celeba.py and docs/pretrained.md).

`:authors` (or `:folder,authors`) takes the settings of the authors' released models where they differ from
the paper text (docs/method.md §5.1); without it the config follows the paper. It sets:
- diffusion.schedule = "cosine_sqrt": their schedule, α_t = √clip(f(t)/f(t−1), 0.001, 1) (method.md §3.2).
- diffusion.parametrization = "x0": their network outputs the logits of z_0 directly (§3.4).
- prior.softmax_q = False: their linear attention normalises k only (§3.4).
- prior.time_scale = 4000 / diffusion.num_steps: they embed t rescaled to T = 4000 (1.0 here; tracks T).
- prior_train.max_code_maps = 31000: their LSUN-Church prior saw only the first 31k code maps (§5.1).
- prior_train.ema_decay = 0.0: no parameter EMA, their checkpoints hold the raw weights (§5).
- refit.kmeans_init = "afkmc2", refit.kmeans_iters = 0, refit.kmeans_refine_iters = 300: AFK-MC² seeding,
  then full-batch Lloyd for at most 300 steps, as their scikit-learn KMeans (§4).
- refit.{recon_loss, perceptual_weight, disc_weight, disc_start, disc_adaptive} = "l1", 1.0, 0.8, 0, False:
  their ReFiT fine-tune's loss, L1 + LPIPS + a fixed 0.8 × the GAN loss from step 0 (§4).
- refit.optim.{lr, b1, b2, schedule, warmup_steps, grad_clip} = 2e-6, 0.5, 0.9, "constant", 0, 0.0, and the
  same for refit.disc_optim: the two Adams of their ReFiT fine-tune (§4).
"""
from vqddm_jax.config_schema import base_config
from vqddm_jax.config_variants import (AUTHORS_LSUN_CODE_MAPS, apply_variants, paper_stage1_256, paper_stage2,
                                     parse_arg)


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="lsun/church_outdoor", train_split="train",
                     eval_split="validation")
  source, variants = parse_arg(arg, file="configs/lsun_church.py", sources=("folder",))
  if source == "folder":
    config.data.update(source="image_folder", eval_split="test")
  paper_stage1_256(config, num_steps=300_000, eval_examples=300)
  paper_stage2(config, num_codes=1024, batch_size=1080, num_steps=500_000)
  apply_variants(config, variants, max_code_maps=AUTHORS_LSUN_CODE_MAPS)
  return config
