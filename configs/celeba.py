"""CelebA-HQ 256 as in the paper (docs/method.md §2): f16 VQGAN-style stage 1, 16×16 codes, K = 1024.

Data: the TFDS `celeb_a_hq/256` builder, which reads the files a user prepared (see README: "Real data");
`:celeb_a` uses TFDS `celeb_a` (aligned 178×218 faces, centre-cropped) instead, and `:folder` a folder of
images given by `--config.data.image_folder=...`. Pass `--config.data.data_dir=` / `manual_dir=` as needed.
"""
from vqddm_jax.config_schema import base_config, paper_stage1_256, paper_stage2


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="celeb_a_hq/256", train_split="train[:29000]",
                     eval_split="train[29000:]")
  if arg == "celeb_a":
    config.data.update(tfds_name="celeb_a", train_split="train", eval_split="validation")
  elif arg == "folder":
    config.data.update(source="image_folder", eval_split="test")
  elif arg not in (None, ""):
    raise ValueError(f"configs/celeba.py takes no argument, 'celeb_a' or 'folder', got {arg!r}")
  paper_stage1_256(config, num_steps=200_000, eval_examples=1_000)
  paper_stage2(config, num_codes=512, batch_size=1500, num_steps=350_000)
  return config
