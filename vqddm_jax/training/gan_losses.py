"""The VQGAN recipe's loss terms as pure functions (docs/method.md §2.1): the settings of one training stage,
the hinge losses, the adaptive weight λ and the discriminator's start switch."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

# λ's guard against a vanishing adversarial gradient, and its clamp (taming-transformers' values).
LAMBDA_EPS = 1e-4
LAMBDA_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The stage's loss, static inside its step.

  Attributes:
    recon_loss: "mse" or "l1" per-pixel reconstruction error.
    perceptual_weight: weight of the mean LPIPS distance (0: LPIPS is neither built nor run).
    disc_weight: multiplies λ; 0 means no discriminator at all.
    disc_start: the first step (0-based count of updates before it) at which the adversarial terms count.
    disc_adaptive: λ from the gradient norms at the decoder's last layer, times `disc_weight` (taming);
      False: λ = `disc_weight`, a fixed weight (the authors' ReFiT fine-tune uses 0.8).
  """
  recon_loss: str = "mse"
  perceptual_weight: float = 0.0
  disc_weight: float = 0.0
  disc_start: int = 0
  disc_adaptive: bool = True

  @property
  def plain(self) -> bool:
    """Reconstruction + codebook terms only: the stage runs the plain VQ-VAE step."""
    return self.perceptual_weight == 0 and self.disc_weight == 0

  @property
  def uses_discriminator(self) -> bool:
    return self.disc_weight > 0

  @classmethod
  def from_section(cls, tcfg: Any) -> "LossSettings":
    """From a training section (`config.vqvae_train` or `config.refit`)."""
    return cls(recon_loss=str(tcfg.recon_loss), perceptual_weight=float(tcfg.perceptual_weight),
               disc_weight=float(tcfg.disc_weight), disc_start=int(tcfg.disc_start),
               disc_adaptive=bool(tcfg.disc_adaptive))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))) for logits of any shape; f32[]."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
  """−mean D(x̂); f32[]."""
  return -jnp.mean(logits_fake)


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
  """f32[]: 0 while `step` (the number of updates done before this one) < `disc_start`, then 1."""
  return jnp.where(step >= disc_start, 1.0, 0.0).astype(jnp.float32)


def adaptive_weight(nll_grad: Any, g_grad: Any, disc_weight: float) -> jax.Array:
  """λ = clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4) · disc_weight, a constant for the gradient (stop_gradient).

  Args:
    nll_grad: gradient of the reconstruction + perceptual loss w.r.t. the decoder's last kernel (any tree).
    g_grad: gradient of the generator's adversarial loss w.r.t. the same kernel.
    disc_weight: the configured weight.

  Returns:
    f32[] λ.
  """
  ratio = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + LAMBDA_EPS)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, LAMBDA_MAX) * disc_weight).astype(jnp.float32)
