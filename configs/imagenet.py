"""ImageNet 256, class-conditional (1000 classes), with the sizes of the authors' ImageNet configs.

Data: the TFDS `imagenet2012` builder (train / validation; it needs the archives downloaded by hand, see README
"Real data"), or `:folder` a labelled image folder given by `--config.data.image_folder=...`: one sub-folder per
class as torchvision's ImageFolder names them (`train/n01440764/*.JPEG`, `val/n01440764/*.JPEG`, ...; the
class index is the sorted position of the folder name, stored in the work directory's code store).

What comes from the authors' configs (their repository's `ReFit/configs/IN.yaml` and `DDM/configs/IN.yaml`):
- stage 1: taming-transformers' ImageNet f16 VQGAN shape, which they start ReFiT from: ch 128, ch_mult
  (1, 1, 2, 2, 4), 2 residual blocks, attention at 16 px, z 256, embedding 256, K = 1024;
- stage 2: T = 4000, the U-Net of dim 128 and mults (1, 2, 4, 8), dropout 0, global batch 180, Adam at 1e-4,
  570k steps, 1000 classes.
What does not, and why: their class-conditional variant cannot run as shipped. Its label embedding has as many
rows as codes (1024), not classes; their solver builds the labels and never passes them to the loss, so the
shipped checkpoint was trained without them; and it has no null label, so no guidance. Here the label
embedding has 1000 + 1 rows (the last is the null label), added to the time embedding after the time MLP as in
their `edit_unet.py`, and labels are dropped to the null label with probability 0.1 (classifier-free guidance's
usual rate, VQ-Diffusion's choice); the report's conditional section measures s in `eval.guidance_scales`.
The ReFiT codebook size is the authors' n_embed, 1024. Stage 1 is best not trained from scratch: convert
taming's released ImageNet f16-1024 checkpoint (docs/pretrained.md) and start from it.

`:taming_f16` starts from a converted release of taming-transformers' f16 tokenizers instead of training stage 1
(`--config.vqvae_train.init_from=DIR`; see configs/celeba.py and docs/pretrained.md).

`:authors` adds the settings of the authors' released models where they differ from the paper text (see
configs/celeba.py); `:ar` taming's transformer beside the diffusion prior (unconditional).
"""
from vqddm_jax.config_schema import base_config
from vqddm_jax.config_variants import apply_variants, paper_stage1_256, paper_stage2, parse_arg

NUM_CLASSES = 1000


def get_config(arg=None):
  config = base_config()
  config.data.update(source="tfds", tfds_name="imagenet2012", train_split="train", eval_split="validation")
  source, variants = parse_arg(arg, file="configs/imagenet.py", sources=("folder",))
  if source == "folder":
    config.data.update(source="image_folder", train_split="train", eval_split="val", class_folders=True)
  paper_stage1_256(config, num_steps=300_000, eval_examples=1_000)
  paper_stage2(config, num_codes=1024, batch_size=180, num_steps=570_000)
  config.prior.num_classes = NUM_CLASSES
  config.prior_train.label_dropout = 0.1
  config.sample.update(num_samples=80, class_labels=(1, 88, 207, 279, 388, 417, 980, 985))
  apply_variants(config, variants)
  return config
