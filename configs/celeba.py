"""CelebA-HQ 256 as in the paper (METHOD.md §2): f16 VQGAN-style stage 1, 16×16 codes, K = 1024.

Data: the TFDS `celeb_a_hq/256` builder, which reads the files a user prepared (see README: "Real data");
`:celeb_a` uses TFDS `celeb_a` (aligned 178×218 faces, centre-cropped) instead, and `:folder` a folder of
images given by `--config.data.image_folder=...`. Pass `--config.data.data_dir=` / `manual_dir=` as needed.
"""
from vqddm_jax.config_schema import base_config, optim_defaults


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="celeb_a_hq/256", train_split="train[:29000]",
                     eval_split="train[29000:]", image_size=256, channels=3, resize="center_crop",
                     shuffle_buffer=2_000)
  if arg == "celeb_a":
    config.data.update(tfds_name="celeb_a", train_split="train", eval_split="validation")
  elif arg == "folder":
    config.data.update(source="image_folder", eval_split="test")
  elif arg not in (None, ""):
    raise ValueError(f"configs/celeba.py takes no argument, 'celeb_a' or 'folder', got {arg!r}")
  config.vqvae.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                      z_channels=256, embed_dim=256, codebook_size=1024, beta=0.25, norm_groups=32)
  config.vqvae_train.update(batch_size=64, num_steps=200_000, optim=optim_defaults(1e-4),
                            ema_decay=0.999, recon_loss="mse", log_every=100,
                            checkpoint_every=5_000, image_every=2_000, eval_every=10_000,
                            eval_examples=1_000)
  config.vqvae_train.optim.update(warmup_steps=2_000, grad_clip=1.0)
  return config
