"""LSUN church_outdoor 256 (METHOD.md §2, §5): the same f16 stage 1 as CelebA-HQ, K = 1024.

Data: the TFDS `lsun/church_outdoor` builder prepared by the user (see README: "Real data"); `:folder` reads a
folder of images given by `--config.data.image_folder=...` instead.
"""
from vqddm_jax.config_schema import base_config, optim_defaults


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="lsun/church_outdoor", train_split="train",
                     eval_split="validation", image_size=256, channels=3, resize="center_crop",
                     shuffle_buffer=2_000)
  if arg == "folder":
    config.data.update(source="image_folder", eval_split="test")
  elif arg not in (None, ""):
    raise ValueError(f"configs/lsun_church.py takes no argument or 'folder', got {arg!r}")
  config.vqvae.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                      z_channels=256, embed_dim=256, codebook_size=1024, beta=0.25, norm_groups=32)
  config.vqvae_train.update(batch_size=64, num_steps=300_000, optim=optim_defaults(1e-4),
                            ema_decay=0.999, recon_loss="mse", log_every=100,
                            checkpoint_every=5_000, image_every=2_000, eval_every=10_000,
                            eval_examples=300)
  config.vqvae_train.optim.update(warmup_steps=2_000, grad_clip=1.0)
  return config
