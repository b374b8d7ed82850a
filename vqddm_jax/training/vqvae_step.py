"""The VQ-VAE's training state, per-device step and held-out evaluation (stage 1 and the ReFiT fine-tune).

The model and loss follow docs/method.md §2: reconstruction + codebook term + β · commitment term, with the
straight-through estimator. The step is pure and per-device; `parallel.pmap` maps it over devices.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqddm_jax import images as images_lib
from vqddm_jax import parallel
from vqddm_jax.models import quantizer
from vqddm_jax.models.vqvae import VQVAE
from vqddm_jax.training import guard, optim


@flax.struct.dataclass
class VQState:
  """Arrays only; the model and optimiser live in closures."""
  step: jnp.ndarray  # i32[]
  params: Any
  ema_params: Any
  opt_state: Any


def init_state(model: VQVAE, optimizer: optax.GradientTransformation, key: jax.Array,
               image_shape: tuple[int, int, int]) -> VQState:
  """Fresh parameters for images of `image_shape` (H, W, C); EMA starts equal to them."""
  # Jitted: op by op, initialising is slower than compiling it (9 s vs 6 s for the MNIST default).
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"])(key)
  return VQState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                 opt_state=optimizer.init(params))


def reconstruction_error(x: jnp.ndarray, x_rec: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Mean over pixels of (x − x̂)² (`kind="mse"`, the paper) or |x − x̂| (`"l1"`, the VQGAN form)."""
  diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  return jnp.mean(jnp.square(diff)) if kind == "mse" else jnp.mean(jnp.abs(diff))


def vq_loss(params: Any, images: jnp.ndarray, rng: jax.Array, *, model: VQVAE, beta: float,
            recon_loss: str, codebook_loss: str = "ours") -> tuple[jnp.ndarray, dict]:
  """L = recon + ||sg[h] − z_q||² + β ||h − sg[z_q]||² for `images: f32[b, H, W, C]` in [-1, 1] (β on the
  codebook term instead with `codebook_loss = 'taming_legacy'`: `quantizer.vq_objective`)."""
  x_rec, q = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
  recon = reconstruction_error(images, x_rec, recon_loss)
  loss = recon + quantizer.vq_objective(q, beta, codebook_loss)
  return loss, {"loss": loss, "recon": recon, "codebook": q.codebook_loss,
                "commitment": q.commitment_loss, "indices": q.indices}


def train_step(state: VQState, batch: dict, key: jax.Array, *, model: VQVAE,
               optimizer: optax.GradientTransformation, beta: float, recon_loss: str,
               ema_decay: float, codebook_loss: str = "ours") -> tuple[VQState, dict]:
  """One per-device update; call through `parallel.pmap` (gradients averaged over axis `data`).

  Args:
    state: this device's replica.
    batch: {'image': f32[b, H, W, C]} this device's share of the global batch.
    key: the run's base key; dropout keys fold in the step and the device index.

  Returns:
    (new state, metrics averaged over devices). A non-finite loss or gradient leaves params, EMA and
    optimiser state unchanged (the step counter still advances); `finite` reports it.
  """
  rng = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(parallel.AXIS))
  grad_fn = jax.value_and_grad(functools.partial(vq_loss, model=model, beta=beta, recon_loss=recon_loss,
                                                 codebook_loss=codebook_loss), has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch["image"], rng)
  grads = parallel.pmean(grads)

  def update():
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, optim.ema_update(state.ema_params, params, ema_decay), opt_state

  grad_norm, ok = guard.norm_and_finite(grads)
  ok = ok & jnp.isfinite(parallel.pmean(aux["loss"]))
  new = guard.update_if_finite(ok, update, (state.params, state.ema_params, state.opt_state))
  hist = parallel.psum(quantizer.code_histogram(aux.pop("indices"), model.codebook_size))
  out = parallel.pmean(aux)
  out.update(grad_norm=grad_norm, finite=ok.astype(jnp.float32),
             batch_usage=quantizer.usage_fraction(hist), batch_perplexity=quantizer.perplexity(hist))
  return VQState(step=state.step + 1, params=new[0], ema_params=new[1], opt_state=new[2]), out


def eval_step(params: Any, batch: dict, *, model: VQVAE) -> dict:
  """Per-device sums over the real (mask True) images: squared error, pixel count, code histogram."""
  images, mask = batch["image"], batch["mask"]
  x_rec, q = model.apply({"params": params}, images)
  x_rec = jnp.clip(x_rec, -1.0, 1.0)
  per_image = jnp.sum(jnp.square(x_rec - images), axis=(1, 2, 3))
  return {"sq_err": jnp.sum(per_image * mask),
          "pixels": jnp.sum(mask) * np.prod(images.shape[1:]),
          "images": jnp.sum(mask.astype(jnp.float32)),
          "hist": quantizer.code_histogram(q.indices, model.codebook_size, mask)}


def heldout_metrics(p_eval: Callable, rparams: Any, batches: Any) -> dict[str, float]:
  """Held-out reconstruction MSE, codebook usage (≥1 and ≥10 uses) and perplexity, summed over batches and
  hosts (each host passes its share of the held-out split)."""
  total = None
  for batch in batches:
    out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64).sum(0),
                                 jax.device_get(p_eval(rparams, batch)))
    total = out if total is None else jax.tree_util.tree_map(np.add, total, out)
  total = parallel.sum_over_processes(total)
  hist = jnp.asarray(total["hist"])
  return {"mse": float(total["sq_err"] / max(total["pixels"], 1)),
          "usage": float(quantizer.usage_fraction(hist)),
          "usage_10": float(quantizer.usage_fraction(hist, 10)),
          "perplexity": float(quantizer.perplexity(hist)),
          "num_images": int(total["images"])}


def reconstruction_grid(model: VQVAE, params: Any, images: np.ndarray) -> np.ndarray:
  """`u8` picture: held-out images (top rows) above their reconstructions (bottom rows)."""
  x_rec = model.apply({"params": params}, jnp.asarray(images))[0]
  ncol = min(8, images.shape[0])
  return images_lib.image_grid(np.concatenate([images, np.clip(np.asarray(x_rec), -1, 1)]), ncol)
