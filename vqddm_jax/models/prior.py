"""The stage-2 model as the rest of the code uses it: the denoiser, the noise schedule, and the logits of x̂_0.

Training, sampling and inpainting all build the prior through these functions, so they cannot disagree on
the network, the schedule or the parametrisation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vqddm_jax import diffusion
from vqddm_jax.models.unet import UNet


def build_denoiser(config: Any, num_classes: int) -> UNet:
  """The U-Net of the `config.prior` section, whose keys are its attributes, over `num_classes` codes (K, or
  K' after ReFiT). The dtype is named ("bfloat16")."""
  return UNet(**{**config.prior, "dtype": getattr(jnp, config.prior.dtype)}, num_classes=num_classes)


def build_schedule(config: Any, num_classes: int) -> diffusion.Schedule:
  """The noise schedule of the `config.diffusion` section (tables for t = 0..T)."""
  d = config.diffusion
  return diffusion.make_schedule(d.num_steps, d.schedule, num_classes=num_classes)


def init_params(model: UNet, key: jax.Array, code_shape: tuple[int, int]) -> Any:
  """Fresh denoiser parameters for code maps of `code_shape` (h, w)."""
  z = jnp.zeros((1,) + tuple(code_shape), jnp.int32)
  # Jitted: op by op, initialising takes ~3x as long as compiling it (20 s vs 7 s for the MNIST default).
  return jax.jit(lambda k: model.init(k, z, jnp.ones((1,), jnp.int32))["params"])(key)


def logits_fn(model: UNet, params: Any, parametrization: str, rng: jax.Array | None = None) -> Callable:
  """`(z_t: i32[B,h,w], t: i32[B]) -> f32[B,h,w,K]` logits of x̂_0 (t = 1..T) for the given parameters.

  `rng` turns on dropout (training); without it the network runs deterministically.
  """
  def fn(z_t, t):
    kwargs = {"train": True, "rngs": {"dropout": rng}} if rng is not None else {}
    out = model.apply({"params": params}, z_t, t, **kwargs)
    return diffusion.x0_logits(out, z_t, parametrization)
  return fn
