"""Stage 1: train the VQ-VAE (METHOD.md §2) — state, per-device step, held-out evaluation, the stage driver.

Layout under `workdir/vqvae/`: `checkpoints/` (Orbax), `tensorboard/` (event files), `images/` (PNG grids of
held-out originals above their reconstructions).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vqddm_jax import data, metrics, parallel
from vqddm_jax.models import quantizer
from vqddm_jax.models.vqvae import VQVAE, build_vqvae
from vqddm_jax.train import loop, optim

STAGE = "vqvae"


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
  params = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
  return VQState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                 opt_state=optimizer.init(params))


def reconstruction_error(x: jnp.ndarray, x_rec: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Mean over pixels of (x − x̂)² (`kind="mse"`, the paper) or |x − x̂| (`"l1"`, the VQGAN form)."""
  diff = x_rec.astype(jnp.float32) - x.astype(jnp.float32)
  return jnp.mean(jnp.square(diff)) if kind == "mse" else jnp.mean(jnp.abs(diff))


def vq_loss(params: Any, images: jnp.ndarray, rng: jax.Array, *, model: VQVAE, beta: float,
            recon_loss: str) -> tuple[jnp.ndarray, dict]:
  """L = recon + ||sg[h] − z_q||² + β ||h − sg[z_q]||² for `images: f32[b, H, W, C]` in [-1, 1]."""
  x_rec, q = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
  recon = reconstruction_error(images, x_rec, recon_loss)
  loss = recon + q.codebook_loss + beta * q.commitment_loss
  return loss, {"loss": loss, "recon": recon, "codebook": q.codebook_loss,
                "commitment": q.commitment_loss, "indices": q.indices}


def train_step(state: VQState, batch: dict, key: jax.Array, *, model: VQVAE,
               optimizer: optax.GradientTransformation, beta: float, recon_loss: str,
               ema_decay: float) -> tuple[VQState, dict]:
  """One per-device update; call through `parallel.pmap_step` (gradients averaged over axis `data`).

  Args:
    state: this device's replica.
    batch: {'image': f32[b, H, W, C]} this device's share of the global batch.
    key: the run's base key; dropout keys fold in the step and the device index.

  Returns:
    (new state, metrics averaged over devices). A non-finite loss or gradient leaves params, EMA and
    optimiser state unchanged (the step counter still advances); `finite` reports it.
  """
  rng = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(parallel.AXIS))
  grad_fn = jax.value_and_grad(functools.partial(vq_loss, model=model, beta=beta,
                                                 recon_loss=recon_loss), has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch["image"], rng)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, params, ema_decay)
  ok = metrics.all_finite(grads) & jnp.isfinite(jax.lax.pmean(aux["loss"], parallel.AXIS))
  new = metrics.keep_if_finite(ok, (params, ema, opt_state),
                               (state.params, state.ema_params, state.opt_state))
  hist = jax.lax.psum(quantizer.code_histogram(aux.pop("indices"), model.codebook_size),
                      parallel.AXIS)
  out = jax.lax.pmean(aux, parallel.AXIS)
  out.update(grad_norm=optax.tree.norm(grads), finite=ok.astype(jnp.float32),
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


def evaluate(p_eval: Callable, rparams: Any, batches: Any) -> dict[str, float]:
  """Held-out reconstruction MSE, codebook usage (≥1 and ≥10 uses) and perplexity, summed over batches."""
  total = None
  for batch in batches:
    out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64).sum(0),
                                 jax.device_get(p_eval(rparams, batch)))
    total = out if total is None else jax.tree_util.tree_map(np.add, total, out)
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
  return metrics.image_grid(np.concatenate([images, np.clip(np.asarray(x_rec), -1, 1)]), ncol)


def stage_dirs(workdir: str, stage: str = STAGE) -> dict[str, str]:
  root = os.path.join(workdir, stage)
  return {k: os.path.join(root, k) for k in ("checkpoints", "tensorboard", "images")}


def train_vqvae(config: Any, workdir: str) -> tuple[VQState | None, bool]:
  """Runs (or resumes, or skips when finished) stage 1; returns (host state or None if skipped, completed)."""
  tcfg = config.vqvae_train
  if loop.stage_finished(stage_dirs(workdir)["checkpoints"], tcfg.num_steps):
    logging.info("stage 1 already finished under %s: skipping", stage_dirs(workdir)["checkpoints"])
    return None, True
  data.prepare(config.data)
  model = build_vqvae(config.vqvae, config.data.channels)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  state = init_state(model, optimizer, jax.random.fold_in(jax.random.key(config.seed), 0), image_shape)
  metrics.log_param_count("VQ-VAE", state.params)
  return run_vq_training(config, workdir, stage=STAGE, tcfg=tcfg, model=model, optimizer=optimizer,
                         state=state, beta=config.vqvae.beta)


def run_vq_training(config: Any, workdir: str, *, stage: str, tcfg: Any, model: VQVAE,
                    optimizer: optax.GradientTransformation, state: VQState, beta: float
                    ) -> tuple[VQState, bool]:
  """The VQ-VAE training loop shared by stage 1 and the ReFiT fine-tune, under `workdir/<stage>/`.

  `tcfg` holds batch_size, num_steps, ema_decay and the loop/eval periods (`config.vqvae_train` or
  `config.refit`); `state` is used only when no checkpoint exists yet.
  """
  dirs = stage_dirs(workdir, stage)
  step_fn = functools.partial(train_step, model=model, optimizer=optimizer, beta=beta,
                              recon_loss=config.vqvae_train.recon_loss, ema_decay=tcfg.ema_decay)
  p_step = parallel.pmap_step(step_fn)
  p_eval = parallel.pmap_eval(functools.partial(eval_step, model=model))
  writer = metrics.make_writer(dirs["tensorboard"], is_main=parallel.is_main_process())
  ndev = parallel.local_device_count()

  def eval_batches():
    return data.eval_batches(config.data, split=config.data.eval_split,
                             global_batch_size=tcfg.batch_size, num_shards=ndev,
                             max_examples=tcfg.eval_examples or None)

  grid_images = parallel.unshard(next(iter(eval_batches()))["image"])[:16]

  def write_grid(step: int, rstate: Any) -> None:
    if parallel.is_main_process():
      grid = reconstruction_grid(model, parallel.unreplicate(rstate.ema_params), grid_images)
      metrics.save_png(os.path.join(dirs["images"], f"recon_{step:07d}.png"), grid)
      writer.write_images(step, {f"{stage}/reconstructions": grid[None]})

  def run_eval(step: int, rstate: Any) -> None:
    results = evaluate(p_eval, rstate.ema_params, eval_batches())
    writer.write_scalars(step, {f"{stage}/eval_{k}": v for k, v in results.items()})
    logging.info("%s held-out at step %d: %s", stage, step, results)
    if parallel.is_main_process():
      with open(os.path.join(workdir, stage, "eval.json"), "w") as f:
        json.dump(dict(results, step=step), f, indent=1)

  open_batches = lambda pos: data.train_batches(  # noqa: E731
      config.data, global_batch_size=tcfg.batch_size, num_shards=ndev, seed=config.seed, position=pos)
  spec = loop.LoopConfig(stage, dirs["checkpoints"], tcfg.num_steps, tcfg.log_every,
                         tcfg.checkpoint_every, tcfg.keep_checkpoints)
  actions = [loop.Periodic(tcfg.image_every, write_grid), loop.Periodic(tcfg.eval_every, run_eval)]
  return loop.run(spec, init_state=state, p_step=p_step, open_batches=open_batches,
                  key=jax.random.fold_in(jax.random.key(config.seed), 1), writer=writer,
                  periodic=actions)


def restore_ema_params(config: Any, directory: str, *, codebook_size: int | None = None
                       ) -> tuple[VQVAE, Any, int]:
  """Read-only restore of the EMA parameters of a VQ-VAE checkpoint (stage 1 or ReFiT).

  Args:
    config: the run's config (model sizes from `config.vqvae`, image size from `config.data`).
    directory: an Orbax checkpoint directory (e.g. `workdir/vqvae/checkpoints`).
    codebook_size: K when it differs from `config.vqvae.codebook_size` (a ReFiT codebook of K' codes).

  Returns:
    (model, ema_params on the host, checkpoint step).

  Raises:
    FileNotFoundError: no checkpoint under `directory`.
    ValueError: the checkpoint's arrays do not fit the config's model.
  """
  from vqddm_jax import checkpointing  # Imported here: only restoring callers need Orbax.
  model = build_vqvae(config.vqvae, config.data.channels, codebook_size=codebook_size)
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))["params"]
  hint = ("run --mode=train_vqvae first" if directory.rstrip("/").endswith("vqvae/checkpoints")
          else "run --mode=refit first")
  params, step = checkpointing.restore_latest_ema(directory, abstract, missing_hint=hint)
  return model, params, step
