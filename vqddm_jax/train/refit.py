"""`--mode=refit`: ReFiT (METHOD.md §4) — rebuild the codebook by k-means, then fine-tune with a frozen encoder.

1. Restore the stage-1 EMA parameters (read-only).
2. Sample P pre-quantisation feature vectors (after `quant_conv`) of the training images: one random position
   from each of P random images (several distinct positions per image when P exceeds the number of images).
3. `refit.kmeans` with K' clusters; the centroids replace the codebook (K' may differ from K).
4. Fine-tune decoder, codebook and post_quant_conv with encoder and quant_conv frozen (their updates are
   zero, so they stay bit-identical), with the stage-1 reconstruction loss plus the codebook term.
Layout under `workdir/refit/`: `checkpoints/`, `tensorboard/`, `images/`, `rebuild.json` (metrics before and
right after the rebuild, written once), `features.npy` (the k-means input), `report.json` and `report.md` (before / rebuilt / fine-tuned).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vqddm_jax import checkpointing, data, parallel, refit
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.train import loop, optim
from vqddm_jax.train import vqvae as stage1

STAGE = "refit"
FROZEN = ("encoder", "quant_conv")


def stage_dirs(workdir: str) -> dict[str, str]:
  root = os.path.join(workdir, STAGE)
  return {k: os.path.join(root, k) for k in ("checkpoints", "tensorboard", "images")}


def frozen_encoder_optimizer(optim_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """Adam on decoder, codebook and post_quant_conv; exact zero updates for encoder and quant_conv."""
  def labels(params):
    return {k: jax.tree_util.tree_map(lambda _, k=k: "frozen" if k in FROZEN else "trained", v)
            for k, v in params.items()}
  return optax.multi_transform({"trained": optim.make_optimizer(optim_cfg, num_steps),
                                "frozen": optax.set_to_zero()}, labels)


def sample_features(model: Any, rparams: Any, cfg_data: Any, *, num_features: int, batch_size: int,
                    seed: int) -> np.ndarray:
  """P feature vectors `f32[P, d]`: one random position of each of P random training images (more distinct
  positions per image when P > N), streamed in batches so only the sampled vectors are kept."""
  p_encode = parallel.pmap_eval(lambda p, x: model.apply({"params": p}, x, method=type(model).encode))
  n = data.num_examples(cfg_data, cfg_data.train_split) // parallel.process_count()
  rng = np.random.default_rng([seed, parallel.process_index()])
  chosen = []
  for batch in data.eval_batches(cfg_data, split=cfg_data.train_split, global_batch_size=batch_size,
                                 num_shards=parallel.local_device_count()):
    feats = parallel.unshard(p_encode(rparams, parallel.to_devices(batch["image"])))
    feats = feats[parallel.unshard(batch["mask"])]
    b, h, w, d = feats.shape
    per_image = min(-(-num_features // max(n, 1)), h * w)
    # Distinct positions per image: the first `per_image` of a random permutation of the h·w positions.
    pos = np.argsort(rng.random((b, h * w)), axis=1)[:, :per_image]
    chosen.append(feats.reshape(b, h * w, d)[np.arange(b)[:, None], pos].reshape(-1, d))
  features = np.concatenate(chosen)
  if len(features) > num_features:  # P random images (or positions) out of those visited.
    features = features[np.sort(rng.choice(len(features), num_features, replace=False))]
  return features.astype(np.float32)


def _held_out_metrics(model: Any, params: Any, config: Any) -> dict[str, float]:
  p_eval = parallel.pmap_eval(functools.partial(stage1.eval_step, model=model))
  batches = data.eval_batches(config.data, split=config.data.eval_split,
                              global_batch_size=config.refit.batch_size,
                              num_shards=parallel.local_device_count(),
                              max_examples=config.refit.eval_examples or None)
  return stage1.evaluate(p_eval, parallel.replicate(params), (
      dict(b, image=parallel.to_devices(b["image"])) for b in batches))


def rebuild_codebook(config: Any, workdir: str) -> tuple[Any, Any, dict]:
  """Restores stage 1, runs k-means on sampled features; returns (K' model, rebuilt params, metrics)."""
  rcfg = config.refit
  model, params, step = stage1.restore_ema_params(config, stage1.stage_dirs(workdir)["checkpoints"])
  before = _held_out_metrics(model, params, config)
  logging.info("ReFiT: stage-1 step %d held-out before rebuild: %s", step, before)
  features = sample_features(model, parallel.replicate(params), config.data,
                             num_features=rcfg.num_features, batch_size=rcfg.batch_size,
                             seed=config.seed)
  logging.info("ReFiT: k-means with K' = %d on %d feature vectors of dimension %d", rcfg.num_codes,
               *features.shape)
  if parallel.is_main_process():  # Kept for inspection and benchmarks/kmeans.py --features.
    os.makedirs(os.path.join(workdir, STAGE), exist_ok=True)
    np.save(os.path.join(workdir, STAGE, "features.npy"), features)
  centroids = refit.kmeans(jax.random.key(config.seed), features, rcfg.num_codes,
                           num_iters=rcfg.kmeans_iters, batch_size=rcfg.kmeans_batch_size,
                           init=rcfg.kmeans_init, refine_iters=rcfg.kmeans_refine_iters)
  new_model = build_vqvae(config.vqvae, config.data.channels, codebook_size=rcfg.num_codes)
  new_params = dict(params, codebook=jnp.asarray(centroids, jnp.float32))
  rebuilt = _held_out_metrics(new_model, new_params, config)
  logging.info("ReFiT: held-out right after rebuild: %s", rebuilt)
  return new_model, new_params, {"stage1_step": step, "num_features": int(len(features)),
                                 "before": before, "rebuilt": rebuilt}


def train_refit(config: Any, workdir: str) -> tuple[Any, bool]:
  """Runs (or resumes, or skips when finished) ReFiT; writes the report when the fine-tune completes."""
  rcfg = config.refit
  dirs = stage_dirs(workdir)
  report_path = os.path.join(workdir, STAGE, "report.json")
  if loop.stage_finished(dirs["checkpoints"], rcfg.num_steps) and os.path.exists(report_path):
    logging.info("ReFiT already finished under %s: skipping", dirs["checkpoints"])
    return None, True
  data.prepare(config.data)
  rebuild_path = os.path.join(workdir, STAGE, "rebuild.json")
  optimizer = frozen_encoder_optimizer(rcfg.optim, rcfg.num_steps)
  model = build_vqvae(config.vqvae, config.data.channels, codebook_size=rcfg.num_codes)
  if os.path.exists(rebuild_path) and _has_checkpoint(dirs["checkpoints"]):
    # Resume: the loop restores the state; only its structure is needed here (no k-means rerun).
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    params = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape)))["params"])
    state = _fresh_state(params, optimizer)
    with open(rebuild_path) as f:
      rebuild = json.load(f)
  else:
    model, params, rebuild = rebuild_codebook(config, workdir)
    state = _fresh_state(params, optimizer)
    # Step 0 holds the rebuilt codebook, so a resumed run never reruns k-means.
    ckpt = checkpointing.Checkpointer(dirs["checkpoints"])
    ckpt.save(0, state, {"position": None, "nonfinite_steps": 0})
    ckpt.close()
    if parallel.is_main_process():
      with open(rebuild_path, "w") as f:
        json.dump(rebuild, f, indent=1)
  final, completed = stage1.run_vq_training(config, workdir, stage=STAGE, tcfg=rcfg, model=model,
                                            optimizer=optimizer, state=state, beta=0.0)
  if completed:
    write_report(workdir, rebuild, _held_out_metrics(model, final.ema_params, config))
  return final, completed


def _fresh_state(params: Any, optimizer: optax.GradientTransformation) -> stage1.VQState:
  return stage1.VQState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                        opt_state=optimizer.init(params))


def _has_checkpoint(directory: str) -> bool:
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def write_report(workdir: str, rebuild: dict, finetuned: dict) -> dict:
  """`workdir/refit/report.json` and `report.md`: usage, perplexity and MSE at the three points."""
  rows = {"stage 1 (before)": rebuild["before"], "rebuilt codebook": rebuild["rebuilt"],
          "after fine-tune": finetuned}
  report = dict(rebuild, finetuned=finetuned)
  if not parallel.is_main_process():
    return report
  with open(os.path.join(workdir, STAGE, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = ["# ReFiT report", "",
           f"Stage-1 checkpoint step {rebuild['stage1_step']}; k-means on {rebuild['num_features']} "
           "feature vectors. Held-out images (EMA parameters).", "",
           "| model | codes used (>=1) | codes used (>=10) | perplexity | reconstruction MSE |",
           "|---|---|---|---|---|"]
  lines += [f"| {name} | {m['usage']:.1%} | {m['usage_10']:.1%} | {m['perplexity']:.1f} | {m['mse']:.5f} |"
            for name, m in rows.items()]
  with open(os.path.join(workdir, STAGE, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  logging.info("ReFiT report:\n%s", "\n".join(lines))
  return report
