"""`--mode=refit`: ReFiT (docs/method.md §4) — rebuild the codebook by k-means, fine-tune with a frozen encoder.

1. Restore the stage-1 EMA parameters (read-only).
2. Sample P pre-quantisation feature vectors (after `quant_conv`) of the training images: one random position
   from each of P random images (several distinct positions per image when P exceeds the number of images).
3. `kmeans.kmeans` with K' clusters; the centroids replace the codebook (K' may differ from K).
4. Fine-tune decoder, codebook and post_quant_conv with encoder and quant_conv frozen (their updates are
   zero, so they stay bit-identical), with `config.refit`'s losses: `recon_loss` plus the codebook term, and
   LPIPS and the PatchGAN when `perceptual_weight` / `disc_weight` are positive (docs/method.md §2.1). The
   discriminator starts from stage 1's when stage 1 trained one (as the authors' fine-tune did), else fresh.
Writes `workdir/refit/`: `checkpoints/`, `tensorboard/`, `images/`, `eval.json`, `rebuild.json` (metrics
before and right after the rebuild, written once), `features.npy` (the k-means input), `report.json` and
`report.md` (before / rebuilt / fine-tuned).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vqddm_jax import checkpointing, data, kmeans, parallel, restore
from vqddm_jax import files as files_lib
from vqddm_jax.models.discriminator import build_discriminator
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.stages import StageResult
from vqddm_jax.training import loop, optim, vq_trainer, vqgan_step, vqvae_step
from vqddm_jax.training.gan_losses import LossSettings
from vqddm_jax.workdir import Workdir

STAGE = "refit"
FROZEN = ("encoder", "quant_conv")


def is_done(config: Any, workdir: Workdir) -> bool:
  """Done when disabled, or when the fine-tune finished and its report exists (that it was rebuilt from the
  current stage 1 is `lineage`'s check)."""
  if not config.refit.enabled:
    return True
  rebuild = files_lib.read_json(workdir.refit_rebuild)
  return (rebuild is not None and loop.trained_to(workdir.refit.checkpoints, config.refit.num_steps)
          and workdir.refit_report("json").exists())


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
  positions per image when P > N), streamed in batches so only the sampled vectors are kept. On several hosts
  each samples its share of P from its share of the images, and every host gets all P (in host order)."""
  p_encode = parallel.pmap(lambda p, x: model.apply({"params": p}, x, method=type(model).encode))
  n = data.num_examples(cfg_data, cfg_data.train_split)
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
  mine = parallel.host_slice(num_features)
  share = mine.stop - mine.start  # this host's part of P
  if len(features) > share:  # random images (or positions) out of those visited
    features = features[np.sort(rng.choice(len(features), share, replace=False))]
  return parallel.gather_rows(features.astype(np.float32))


def rebuild_codebook(config: Any, workdir: Workdir) -> tuple[Any, Any, dict]:
  """Restores stage 1, runs k-means on sampled features; returns (K' model, rebuilt params, metrics)."""
  rcfg = config.refit
  stage1 = restore.restore_vqvae(config, workdir, "vqvae")
  before = vq_trainer.heldout_metrics(config, rcfg, stage1.model, stage1.params)
  logging.info("ReFiT: stage-1 step %d held-out before rebuild: %s", stage1.step, before)
  features = sample_features(stage1.model, parallel.replicate(stage1.params), config.data,
                             num_features=rcfg.num_features, batch_size=rcfg.batch_size,
                             seed=config.seed)
  logging.info("ReFiT: k-means with K' = %d on %d feature vectors of dimension %d", rcfg.num_codes,
               *features.shape)
  if parallel.is_main_process():  # Kept for inspection and benchmarks/kmeans.py --features.
    files_lib.write_npy(workdir.refit_features, features)
  centroids = kmeans.kmeans(jax.random.key(config.seed), features, rcfg.num_codes,
                            num_iters=rcfg.kmeans_iters, batch_size=rcfg.kmeans_batch_size,
                            init=rcfg.kmeans_init, refine_iters=rcfg.kmeans_refine_iters,
                            nested=tuple(tuple(level) for level in rcfg.kmeans_nested),
                            overrelax=rcfg.kmeans_overrelax)
  new_model = build_vqvae(config.vqvae, config.data.channels, codebook_size=rcfg.num_codes)
  new_params = dict(stage1.params, codebook=jnp.asarray(centroids, jnp.float32))
  rebuilt = vq_trainer.heldout_metrics(config, rcfg, new_model, new_params)
  logging.info("ReFiT: held-out right after rebuild: %s", rebuilt)
  return new_model, new_params, {"stage1_step": stage1.step, "num_features": int(len(features)),
                                 "before": before, "rebuilt": rebuilt}


def run(config: Any, workdir: Workdir) -> StageResult:
  """Rebuilds the codebook (once) and fine-tunes (or resumes); writes the report when the fine-tune ends."""
  rcfg = config.refit
  paths = workdir.refit
  data.prepare(config.data)
  optimizer = frozen_encoder_optimizer(rcfg.optim, rcfg.num_steps)
  model = build_vqvae(config.vqvae, config.data.channels, codebook_size=rcfg.num_codes)
  rebuild = files_lib.read_json(workdir.refit_rebuild)
  if rebuild is not None and checkpointing.latest_step(paths.checkpoints) is not None:
    # Resume: the loop restores the state; only its structure is needed here (no k-means rerun).
    params = jax.tree_util.tree_map(jnp.zeros_like, restore.vqvae_abstract_params(model, config))
    state = vq_trainer.attach_discriminator(config, rcfg, _fresh_state(params, optimizer))
  else:
    model, params, rebuild = rebuild_codebook(config, workdir)
    state = vq_trainer.attach_discriminator(config, rcfg, _fresh_state(params, optimizer),
                                            _stage1_discriminator(config, workdir))
    # Step 0 holds the rebuilt codebook, so a resumed run never reruns k-means.
    ckpt = checkpointing.Checkpointer(paths.checkpoints)
    ckpt.save(0, state, {"position": None, "nonfinite_steps": 0})
    ckpt.close()
    if parallel.is_main_process():
      files_lib.write_json(workdir.refit_rebuild, rebuild)
  final, completed = vq_trainer.train_vq(config, workdir, stage=STAGE, tcfg=rcfg, model=model,
                                         optimizer=optimizer, state=state, beta=0.0)
  if completed:
    write_report(workdir, rebuild, vq_trainer.heldout_metrics(config, rcfg, model, final.ema_params))
  return StageResult(STAGE, completed, (str(paths.root), str(workdir.refit_report("md"))))


def _stage1_discriminator(config: Any, workdir: Workdir) -> dict | None:
  """Stage 1's discriminator {'params', 'batch_stats'} when ReFiT uses one and stage 1's latest checkpoint
  holds one; None otherwise (ReFiT then starts a fresh one)."""
  directory = workdir.vqvae.checkpoints
  step = checkpointing.latest_step(directory)
  if (not LossSettings.from_section(config.refit).uses_discriminator or step is None
      or not checkpointing.has_item(directory, "disc_params", step)):
    return None
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  abstract = jax.eval_shape(lambda: vqgan_step.init_discriminator(
      build_discriminator(config.discriminator), jax.random.key(0), image_shape))
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  try:
    variables = {"params": ckpt.restore_item("disc_params", abstract["params"], step),
                 "batch_stats": ckpt.restore_item("disc_stats", abstract["batch_stats"], step)}
  finally:
    ckpt.close()
  logging.info("ReFiT: the discriminator starts from stage 1's (step %d)", step)
  return variables


def _fresh_state(params: Any, optimizer: optax.GradientTransformation) -> vqvae_step.VQState:
  return vqvae_step.VQState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=optimizer.init(params))


def write_report(workdir: Workdir, rebuild: dict, finetuned: dict) -> dict:
  """`workdir/refit/report.json` and `report.md`: usage, perplexity and MSE at the three points."""
  rows = {"stage 1 (before)": rebuild["before"], "rebuilt codebook": rebuild["rebuilt"],
          "after fine-tune": finetuned}
  report = dict(rebuild, finetuned=finetuned)
  if not parallel.is_main_process():
    return report
  files_lib.write_json(workdir.refit_report("json"), report)
  lines = ["# ReFiT report", "",
           f"Stage-1 checkpoint step {rebuild['stage1_step']}; k-means on {rebuild['num_features']} "
           "feature vectors. Held-out images (EMA parameters).", "",
           "| model | codes used (>=1) | codes used (>=10) | perplexity | reconstruction MSE |",
           "|---|---|---|---|---|"]
  lines += [f"| {name} | {m['usage']:.1%} | {m['usage_10']:.1%} | {m['perplexity']:.1f} | {m['mse']:.5f} |"
            for name, m in rows.items()]
  files_lib.write_text(workdir.refit_report("md"), "\n".join(lines) + "\n")
  logging.info("ReFiT report:\n%s", "\n".join(lines))
  return report
