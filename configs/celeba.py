"""CelebA-HQ 256 as in the paper (docs/method.md §2): f16 VQGAN-style stage 1, 16×16 codes, K = 1024.

Data: the TFDS `celeb_a_hq/256` builder, which reads the files a user prepared (see README: "Real data");
`:celeb_a` uses TFDS `celeb_a` (aligned 178×218 faces, centre-cropped) instead, and `:folder` a folder of
images given by `--config.data.image_folder=...`. Pass `--config.data.data_dir=` / `manual_dir=` as needed.

`:ar` (combinable with the others, e.g. `:ar,authors`) adds taming-transformers' autoregressive prior at its faces
size beside the diffusion prior, on the same code maps (`config_variants.taming_ar`; docs/comparison.md):
ar.{width, num_layers, num_heads} = 1664, 24, 16 (~800 M parameters, 16×16 = 256 positions), bfloat16 compute,
AdamW (0.9, 0.95) with weight decay 0.01 at a constant 4.5e-6 × ar_train.batch_size (128), 300k steps; evaluate
then adds the two-prior comparison. taming sampled faces with top-k 250: `--config.ar_sample.top_k=250`.

`:taming_f16` (combinable) starts from taming-transformers' released f16 tokenizer instead of training stage 1:
convert a checkpoint once (`python -m vqddm_jax.convert taming_vqgan --ckpt=last.ckpt --config=model.yaml
--out=DIR`, docs/pretrained.md), then pass `--config.vqvae_train.init_from=DIR`. It sets the tokenizer fields of
the released f16-1024 checkpoints (ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual blocks, attention at 16 px placed
by the nominal 256 px, z and embedding 256, K 1024; `--config.vqvae.codebook_size=16384` for ImageNet
f16-16384), vqvae_train.codebook_loss = "taming_legacy" and vqvae_train.num_steps = 0 (stage 1 is the import;
a positive count fine-tunes it); ReFiT then rebuilds its codebook as the paper did from taming's ImageNet model.

`:authors` (or `:celeb_a,authors`, `:folder,authors`) takes the settings of the authors' released models where
they differ from the paper text (docs/method.md §5.1); without it the config follows the paper. It sets:
- diffusion.schedule = "cosine_sqrt": their schedule, α_t = √clip(f(t)/f(t−1), 0.001, 1) (method.md §3.2).
- diffusion.parametrization = "x0": their network outputs the logits of z_0 directly (§3.4).
- prior.softmax_q = False: their linear attention normalises k only (§3.4).
- prior.time_scale = 4000 / diffusion.num_steps: they embed t rescaled to T = 4000 (1.0 here; tracks T).
- prior_train.ema_decay = 0.0: no parameter EMA, their checkpoints hold the raw weights (§5).
- refit.kmeans_init = "afkmc2", refit.kmeans_iters = 0, refit.kmeans_refine_iters = 300: AFK-MC² seeding,
  then full-batch Lloyd for at most 300 steps, as their scikit-learn KMeans (§4).
- refit.{recon_loss, perceptual_weight, disc_weight, disc_start, disc_adaptive} = "l1", 1.0, 0.8, 0, False:
  their ReFiT fine-tune's loss, L1 + LPIPS + a fixed 0.8 × the GAN loss from step 0 (§4).
- refit.optim.{lr, b1, b2, schedule, warmup_steps, grad_clip} = 2e-6, 0.5, 0.9, "constant", 0, 0.0, and the
  same for refit.disc_optim: the two Adams of their ReFiT fine-tune (§4).
"""
from vqddm_jax.config_schema import base_config
from vqddm_jax.config_variants import apply_variants, paper_stage1_256, paper_stage2, parse_arg


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="celeb_a_hq/256", train_split="train[:29000]",
                     eval_split="train[29000:]")
  source, variants = parse_arg(arg, file="configs/celeba.py", sources=("celeb_a", "folder"))
  if source == "celeb_a":
    config.data.update(tfds_name="celeb_a", train_split="train", eval_split="validation")
  elif source == "folder":
    config.data.update(source="image_folder", eval_split="test")
  paper_stage1_256(config, num_steps=200_000, eval_examples=1_000)
  paper_stage2(config, num_codes=512, batch_size=1500, num_steps=350_000)
  apply_variants(config, variants)
  return config
