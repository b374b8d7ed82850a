"""The VQ-VAE step with the VQGAN losses (docs/method.md §2.1): L1/MSE + LPIPS + adaptive-weight hinge GAN.

Used by stage 1 and the ReFiT fine-tune when `perceptual_weight` or `disc_weight` is positive; with both at 0
the stages run `vqvae_step.train_step` and its `VQState` unchanged. One per-device function, mapped by
`parallel.pmap`:

1. Generator. One forward of the VQ-VAE under `jax.vjp`. The cotangents of nll = recon + w_p · LPIPS and of
   g = −mean D(x̂) w.r.t. x̂ come from small gradients through LPIPS and D. The vjp maps each to the decoder's
   last kernel (under jit only that kernel's gradient is computed for these two: the rest is dead code), the
   two gradients are averaged over devices and give λ; one full vjp of ct_nll + λ·factor·ct_g (and 1 for the
   codebook terms) gives the parameter gradient, which is averaged over devices as usual.
2. Discriminator. Hinge loss on D(x) and D(sg[x̂]) (the reconstructions of step 1, before the generator's
   update), two separate BatchNorm batches as in the reference; gradients averaged over devices, own Adam.
3. Both updates run inside one `guard.update_if_finite`: any non-finite loss or gradient skips both.

BatchNorm normalises with each device's own batch statistics (not synchronised, as in the reference); the
running averages it keeps (used only by an eval-mode D, never in training) are averaged over devices after
each update, so every replica holds the same state and checkpoints resume exactly. The generator's D(x̂)
uses batch statistics too and its running-average update is discarded.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vqddm_jax import parallel
from vqddm_jax.models import lpips as lpips_lib
from vqddm_jax.models import quantizer
from vqddm_jax.models.discriminator import NLayerDiscriminator
from vqddm_jax.models.vqvae import VQVAE
from vqddm_jax.training import guard, optim
from vqddm_jax.training.gan_losses import (LossSettings, adaptive_weight, disc_factor, generator_adv_loss,
                                           hinge_d_loss)
from vqddm_jax.training.vqvae_step import VQState, reconstruction_error


@flax.struct.dataclass
class VQGANState(VQState):
  """`VQState` plus the discriminator's parameters, BatchNorm running averages and Adam state."""
  disc_params: Any
  disc_stats: Any
  disc_opt_state: Any


def init_discriminator(disc: NLayerDiscriminator, key: jax.Array, image_shape: tuple[int, int, int]
                       ) -> dict:
  """Fresh `{'params', 'batch_stats'}` of `disc` for images of `image_shape` (H, W, C)."""
  # Jitted: op by op, initialising is slower than compiling it.
  init = jax.jit(lambda k: disc.init(k, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False))
  variables = init(key)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def with_discriminator(state: VQState, disc_variables: dict,
                       disc_optimizer: optax.GradientTransformation) -> VQGANState:
  """`state` with the discriminator `disc_variables` ({'params', 'batch_stats'}) and a fresh optimiser."""
  return VQGANState(step=state.step, params=state.params, ema_params=state.ema_params,
                    opt_state=state.opt_state, disc_params=disc_variables["params"],
                    disc_stats=disc_variables["batch_stats"],
                    disc_opt_state=disc_optimizer.init(disc_variables["params"]))


def last_layer_kernel(grads: Any) -> jax.Array:
  """The decoder's last convolution kernel in a VQ-VAE parameter tree (the layer λ is measured at)."""
  return grads["decoder"]["conv_out"]["kernel"]


def _nll(x_rec: jax.Array, images: jax.Array, lpips_params: Any, settings: LossSettings
         ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """recon + perceptual_weight · mean LPIPS(x, x̂); returns (nll, (recon, perceptual))."""
  recon = reconstruction_error(images, x_rec, settings.recon_loss)
  if settings.perceptual_weight > 0:
    # Greyscale images are repeated to RGB inside lpips_distance.
    perceptual = jnp.mean(lpips_lib.lpips_distance(lpips_params, images, x_rec))
  else:
    perceptual = jnp.zeros((), jnp.float32)
  return recon + settings.perceptual_weight * perceptual, (recon, perceptual)


def _disc_logits(disc: NLayerDiscriminator, params: Any, stats: Any, x: jax.Array) -> tuple[jax.Array, Any]:
  """Training-mode logits (batch statistics) and the updated running averages."""
  logits, updated = disc.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
  return logits, updated["batch_stats"]


def generator_grads(state: VQState, images: jax.Array, rng: jax.Array, lpips_params: Any, *, model: VQVAE,
                    disc: NLayerDiscriminator | None, beta: float, settings: LossSettings,
                    codebook_loss: str = "ours") -> tuple[Any, jax.Array, dict]:
  """This device's gradient of the generator loss (λ from device-averaged last-layer gradients).

  Args:
    state: this device's replica (`VQGANState` when `disc` is given).
    images: f32[b, H, W, C] in [-1, 1].
    rng: this device's dropout key.
    lpips_params: the LPIPS weights (None when perceptual_weight is 0).

  Returns:
    (gradient tree, reconstructions f32[b, H, W, C], per-device metrics incl. `indices` i32[b, h, w]).
  """
  def forward(p):
    x_rec, q = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
    return (x_rec, quantizer.vq_objective(q, beta, codebook_loss)), q

  (x_rec, q_loss), vjp_fn, q = jax.vjp(forward, state.params, has_aux=True)
  (nll, (recon, perceptual)), ct_nll = jax.value_and_grad(_nll, has_aux=True)(
      x_rec, images, lpips_params, settings)
  out = {"recon": recon, "perceptual": perceptual, "nll": nll, "codebook": q.codebook_loss,
         "commitment": q.commitment_loss, "indices": q.indices}
  loss, ct = nll + q_loss, ct_nll
  if disc is not None:
    g_loss, ct_g = jax.value_and_grad(
        lambda x: generator_adv_loss(_disc_logits(disc, state.disc_params, state.disc_stats, x)[0]))(x_rec)
    factor = disc_factor(state.step, settings.disc_start)
    if settings.disc_adaptive:
      at_last = lambda c: parallel.pmean(  # noqa: E731
          last_layer_kernel(vjp_fn((c, jnp.zeros_like(q_loss)))[0]))
      lam = adaptive_weight(at_last(ct_nll), at_last(ct_g), settings.disc_weight)
    else:
      lam = jnp.asarray(settings.disc_weight, jnp.float32)
    loss = loss + lam * factor * g_loss
    ct = ct_nll + (lam * factor).astype(ct_nll.dtype) * ct_g
    out.update(g_loss=g_loss, disc_factor=factor)
    out["lambda"] = lam
  grads = vjp_fn((ct, jnp.ones_like(q_loss)))[0]
  out["loss"] = loss
  return grads, x_rec, out


def discriminator_grads(state: VQGANState, images: jax.Array, x_rec: jax.Array, *,
                        disc: NLayerDiscriminator, settings: LossSettings) -> tuple[Any, Any, dict]:
  """The discriminator's hinge-loss gradient on real `images` and fake `x_rec` (both f32[b, H, W, C]).

  Returns:
    (device-averaged gradient, device-averaged BatchNorm running averages after both passes, per-device
    metrics).
  """
  factor = disc_factor(state.step, settings.disc_start)
  fake = jax.lax.stop_gradient(x_rec)

  def loss_fn(params):
    # Real and fake pass separately: BatchNorm sees one kind of image per batch, as in the reference.
    logits_real, stats = _disc_logits(disc, params, state.disc_stats, images)
    logits_fake, stats = _disc_logits(disc, params, stats, fake)
    return factor * hinge_d_loss(logits_real, logits_fake), (stats, logits_real, logits_fake)

  (d_loss, (stats, logits_real, logits_fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.disc_params)
  out = {"d_loss": d_loss, "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}
  # Averaged running statistics keep the replicas identical.
  return parallel.pmean(grads), parallel.pmean(stats), out


def train_step(state: VQState, batch: dict, key: jax.Array, lpips_params: Any = None, *, model: VQVAE,
               optimizer: optax.GradientTransformation, disc: NLayerDiscriminator | None,
               disc_optimizer: optax.GradientTransformation | None, beta: float, settings: LossSettings,
               ema_decay: float, codebook_loss: str = "ours") -> tuple[VQState, dict]:
  """One per-device update of the VQ-VAE and (when `disc` is given) the discriminator.

  Args:
    state: this device's replica; a `VQGANState` when `disc` is given.
    batch: {'image': f32[b, H, W, C]} this device's share of the global batch, in [-1, 1].
    key: the run's base key; dropout keys fold in the step and the device index.
    lpips_params: the replicated LPIPS weights (`lpips.load_lpips_weights()`) when perceptual_weight > 0.

  Returns:
    (new state, metrics averaged over devices). A non-finite loss or gradient of either network leaves
    both networks, the EMA, the BatchNorm averages and both optimiser states unchanged (the step counter
    still advances); `finite` reports it.
  """
  rng = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(parallel.AXIS))
  images = batch["image"]
  grads, x_rec, aux = generator_grads(state, images, rng, lpips_params, model=model, disc=disc, beta=beta,
                                      settings=settings, codebook_loss=codebook_loss)
  grads = parallel.pmean(grads)
  grad_norm, ok = guard.norm_and_finite(grads)
  ok = ok & jnp.isfinite(parallel.pmean(aux["loss"]))
  names, extra = ["params", "ema_params", "opt_state"], {}
  if disc is not None:
    d_grads, d_stats, d_out = discriminator_grads(state, images, x_rec, disc=disc, settings=settings)
    d_grad_norm, d_ok = guard.norm_and_finite(d_grads)
    ok = ok & d_ok & jnp.isfinite(parallel.pmean(d_out["d_loss"]))
    names += ["disc_params", "disc_stats", "disc_opt_state"]
    aux.update(d_out)
    extra["disc_grad_norm"] = d_grad_norm

  def update():
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = {"params": params, "ema_params": optim.ema_update(state.ema_params, params, ema_decay),
           "opt_state": opt_state}
    if disc is not None:
      d_updates, d_opt_state = disc_optimizer.update(d_grads, state.disc_opt_state, state.disc_params)
      new.update(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_stats=d_stats,
                 disc_opt_state=d_opt_state)
    return new

  kept = guard.update_if_finite(ok, update, {k: getattr(state, k) for k in names})
  hist = parallel.psum(quantizer.code_histogram(aux.pop("indices"), model.codebook_size))
  out = parallel.pmean(aux)
  out.update(extra, grad_norm=grad_norm, finite=ok.astype(jnp.float32),
             batch_usage=quantizer.usage_fraction(hist), batch_perplexity=quantizer.perplexity(hist))
  return state.replace(step=state.step + 1, **kept), out


def make_train_step(*, model: VQVAE, optimizer: optax.GradientTransformation,
                    disc: NLayerDiscriminator | None, disc_optimizer: optax.GradientTransformation | None,
                    beta: float, settings: LossSettings, ema_decay: float, codebook_loss: str = "ours") -> Any:
  """`train_step` with its static settings bound (for `parallel.pmap`)."""
  return functools.partial(train_step, model=model, optimizer=optimizer, disc=disc,
                           disc_optimizer=disc_optimizer, beta=beta, settings=settings, ema_decay=ema_decay,
                           codebook_loss=codebook_loss)
