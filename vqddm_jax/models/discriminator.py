"""The PatchGAN discriminator of the VQGAN recipe (docs/method.md §2.1), as a linen module.

`num_layers` 4×4 stride-2 convolutions (the first with a bias and no normalisation, the others without bias,
followed by BatchNorm), a 4×4 stride-1 convolution to `ndf · min(2**num_layers, 8)` channels with BatchNorm,
and a 4×4 stride-1 convolution to one logit per patch; LeakyReLU(0.2) after every hidden layer, padding 1
everywhere. Convolution kernels start from N(0, 0.02), BatchNorm scales from N(1, 0.02), biases at 0.

An H×W input gives (H/2**num_layers − 2) × (W/2**num_layers − 2) logits: 30×30 for 256×256 images with
num_layers = 3, 2×2 for 32×32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqddm_jax.models.conv import Conv

_PAD = ((1, 1), (1, 1))
_SLOPE = 0.2


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """BatchNorm scale ~ N(1, 0.02)."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator: images → one real/fake logit per overlapping patch.

  Attributes:
    ndf: width of the first layer; layer i has ndf · min(2**i, 8) channels.
    num_layers: stride-2 convolutions (3 in the VQGAN recipe: 70×70 receptive field).
  """
  ndf: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Patch logits.

    Args:
      x: f32[B, H, W, C] images in [-1, 1]; H and W at least 2**num_layers · 3.
      train: normalise with the batch's statistics and update the running averages in `batch_stats`
        (which must then be mutable); False uses the running averages.

    Returns:
      f32[B, H/2**num_layers − 2, W/2**num_layers − 2, 1] logits (> 0: real).
    """
    conv_init = nn.initializers.normal(0.02)
    x = Conv(self.ndf, (4, 4), strides=(2, 2), padding=_PAD, kernel_init=conv_init, name="conv_0")(x)
    x = nn.leaky_relu(x, _SLOPE)
    for i in range(1, self.num_layers + 1):
      stride = 2 if i < self.num_layers else 1  # the last hidden layer keeps the resolution
      x = Conv(self.ndf * min(2 ** i, 8), (4, 4), strides=(stride, stride), padding=_PAD, use_bias=False,
               kernel_init=conv_init, name=f"conv_{i}")(x)
      # Momentum 0.9 here is torch's BatchNorm momentum 0.1.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_scale_init,
                       name=f"norm_{i}")(x)
      x = nn.leaky_relu(x, _SLOPE)
    return Conv(1, (4, 4), padding=_PAD, kernel_init=conv_init, name="conv_out")(x).astype(jnp.float32)


def build_discriminator(section: Any) -> NLayerDiscriminator:
  """The discriminator of the `config.discriminator` section, whose keys are its attributes (input channels
  come from the images)."""
  return NLayerDiscriminator(**section)

