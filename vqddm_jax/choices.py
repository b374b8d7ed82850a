"""The names a config field may choose from, each tuple defined once.

`config_schema` checks a config against these, and the code that acts on a name (`diffusion.make_schedule`,
`kmeans.kmeans`, the model builders, ...) imports the same tuple, so the two cannot drift apart. A leaf:
it imports nothing, so the schema that imports it stays free of JAX and TensorFlow.
"""
from __future__ import annotations

# data.source: the embedded MNIST-5k set, a TFDS data set by name, or a folder of images.
DATA_SOURCES = ("mnist5k", "tfds", "image_folder")
# data.resize: pad to a square then scale, or crop the central square then scale.
RESIZE_MODES = ("pad", "center_crop")
# data.channels: greyscale or RGB.
IMAGE_CHANNELS = (1, 3)

# vqvae.dtype, prior.dtype: the compute dtype by its `jax.numpy` name (parameters stay float32).
DTYPES = ("float32", "bfloat16")

# *.optim.schedule: the learning rate over the steps.
LR_SCHEDULES = ("constant", "cosine")
# vqvae_train.recon_loss, refit.recon_loss: the per-pixel reconstruction error.
RECON_LOSSES = ("mse", "l1")
CODEBOOK_LOSSES = ("ours", "taming_legacy")  # where β goes (`models.quantizer.vq_objective`)

# refit.kmeans_init: the seedings `kmeans.kmeans` offers by name.
KMEANS_INITS = ("kmeans++", "kmeans||", "afkmc2")

# diffusion.schedule: the paper's cosine ᾱ_t, or the authors' code's clipped √ ratio (docs/method.md §3.2).
SCHEDULE_KINDS = ("cosine", "cosine_sqrt")
# diffusion.parametrization: what the network's output means (docs/method.md §3.4).
PARAMETRIZATIONS = ("residual", "x0")
