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
  K' after ReFiT). The dtype is named ("bfloat16"). One key is renamed: the section's `num_classes` (image
  classes C of a conditional prior, the name researchers expect in a config) is the UNet's `num_labels`,
  because the UNet's (and the diffusion code's) `num_classes` is K."""
  fields = {k: v for k, v in config.prior.items() if k != "num_classes"}
  return UNet(**{**fields, "dtype": getattr(jnp, config.prior.dtype)}, num_classes=num_classes,
              num_labels=int(config.prior.get("num_classes", 0)))


def build_schedule(config: Any, num_classes: int) -> diffusion.Schedule:
  """The noise schedule of the `config.diffusion` section (tables for t = 0..T)."""
  d = config.diffusion
  return diffusion.make_schedule(d.num_steps, d.schedule, num_classes=num_classes)


def init_params(model: UNet, key: jax.Array, code_shape: tuple[int, int]) -> Any:
  """Fresh denoiser parameters for code maps of `code_shape` (h, w)."""
  z = jnp.zeros((1,) + tuple(code_shape), jnp.int32)
  # Jitted: op by op, initialising takes ~3x as long as compiling it (20 s vs 7 s for the MNIST default).
  return jax.jit(lambda k: model.init(k, z, jnp.ones((1,), jnp.int32))["params"])(key)


def logits_fn(model: UNet, params: Any, parametrization: str, rng: jax.Array | None = None,
              labels: jax.Array | None = None) -> Callable:
  """`(z_t: i32[B,h,w], t: i32[B]) -> f32[B,h,w,K]` logits of x̂_0 (t = 1..T) for the given parameters.

  `rng` turns on dropout (training); without it the network runs deterministically. `labels: i32[B]` are the
  class labels of a conditional network (0..C-1, or C = the null label); None there means the null label.
  """
  def fn(z_t, t):
    kwargs = {"train": True, "rngs": {"dropout": rng}} if rng is not None else {}
    out = model.apply({"params": params}, z_t, t, labels, **kwargs)
    return diffusion.x0_logits(out, z_t, parametrization)
  return fn


def guided_log_x0(log_x0_cond: jax.Array, log_x0_null: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance of x̂_0: log-softmax of ℓ_u + s·(ℓ_c − ℓ_u), `f32[..., K]`.

  Per position p̃ ∝ p_c^s · p_u^(1−s); s = 1 gives the conditional x̂_0, s = 0 the null label's. Guiding x̂_0
  and then forming the posterior θ(z_t, x̂_0) as usual is VQ-Diffusion's rule; guiding the posterior instead
  is a different distribution. Inputs may be logits or log-probabilities (a constant per position cancels).
  """
  mixed = log_x0_null + scale * (log_x0_cond - log_x0_null)
  return jax.nn.log_softmax(mixed.astype(jnp.float32), axis=-1)


def guided_logits_fn(model: UNet, params: Any, parametrization: str, labels: jax.Array,
                     scale: float) -> Callable:
  """`(z_t: i32[B,h,w], t: i32[B]) -> f32[B,h,w,K]` guided log x̂_0 for class `labels: i32[B]` at scale s.

  s (a Python float, compiled in) = 1 is the conditional network alone and s = 0 the null label alone (one
  network call, exactly those models); any other s runs the conditional and the null-label pass as one
  network call on a batch of 2B and combines them with `guided_log_x0`.
  """
  null = model.num_labels
  if scale == 1:
    return logits_fn(model, params, parametrization, labels=labels)
  if scale == 0:
    return logits_fn(model, params, parametrization, labels=jnp.full_like(labels, null))

  def fn(z_t, t):
    b = z_t.shape[0]
    both = logits_fn(model, params, parametrization, labels=jnp.concatenate([labels, jnp.full_like(labels, null)]))
    out = both(jnp.concatenate([z_t, z_t]), jnp.concatenate([jnp.broadcast_to(t, (b,))] * 2))
    return guided_log_x0(out[:b], out[b:], scale)
  return fn
