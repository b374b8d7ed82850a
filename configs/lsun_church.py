"""LSUN church_outdoor 256 (docs/method.md §2, §5): the same f16 stage 1 as CelebA-HQ, K = 1024.

Data: the TFDS `lsun/church_outdoor` builder prepared by the user (see README: "Real data"); `:folder` reads a
folder of images given by `--config.data.image_folder=...` instead.
"""
from vqddm_jax.config_schema import base_config, paper_stage1_256, paper_stage2


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="lsun/church_outdoor", train_split="train",
                     eval_split="validation")
  if arg == "folder":
    config.data.update(source="image_folder", eval_split="test")
  elif arg not in (None, ""):
    raise ValueError(f"configs/lsun_church.py takes no argument or 'folder', got {arg!r}")
  paper_stage1_256(config, num_steps=300_000, eval_examples=300)
  paper_stage2(config, num_codes=1024, batch_size=1080, num_steps=500_000)
  return config
