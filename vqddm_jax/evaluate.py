"""`--mode=evaluate`: a report a user can trust — `workdir/eval/report.json` and `report.md`.

Sample quality is measured in the feature space of a network: on labelled embedded data (MNIST-5k) a small
classifier the project trains and caches (`evaluation.classifier`); on other data the FID Inception network
when `eval.inception_weights` names its weights, else quality metrics are skipped with a clear note. Each
row compares a set of images with the held-out real images (Fréchet distance, KID, k-NN precision/recall):
held-out vs training real images (the floor), stage-1 reconstructions, samples, inpainting completions, and
images decoded from uniformly random codes (the ceiling). Next to them: held-out −ELBO in bits per code,
codebook usage and reconstruction error, and sample quality and wall time against the number of steps.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from vqddm_jax import evaluation, parallel
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.sample import decode_codes, restore_prior, sample_code_maps
from vqddm_jax.train import encode
from vqddm_jax.train import prior as stage2


def feature_extractor(config: Any, workdir: str) -> tuple[Callable | None, dict]:
  """`images -> f32[N, F]` for the data set of the config, and facts about it for the report."""
  ecfg = config.eval
  if ecfg.inception_weights:
    variables = evaluation.load_inception(ecfg.inception_weights)
    return (lambda x: evaluation.inception_features(variables, x)), {
        "feature_network": "Inception-v3 (FID)", "weights": ecfg.inception_weights}
  if config.data.source != "mnist5k":
    logging.warning("evaluate: no config.eval.inception_weights given, so FID/KID are skipped for %s; "
                    "see README 'FID' for how to obtain and convert the weights",
                    config.data.tfds_name or config.data.image_folder)
    return None, {"feature_network": None,
                  "note": "FID skipped: set --config.eval.inception_weights=PATH (see README)"}
  images, labels = evaluation.labelled_split(config.data, config.data.train_split)
  held, held_labels = evaluation.labelled_split(config.data, config.data.eval_split)
  t0 = time.perf_counter()
  params, meta = evaluation.load_or_train(os.path.join(workdir, "eval"), images, labels, seed=config.seed,
                                          num_steps=ecfg.classifier_steps)
  acc = evaluation.accuracy(params, held, held_labels)
  logging.info("evaluate: classifier held-out accuracy %.2f%% (%s in %.1fs)", 100 * acc,
               "loaded" if meta.get("cached") else "trained", time.perf_counter() - t0)
  return (lambda x: evaluation.classifier_features(params, x)), {
      "feature_network": "project classifier (SmallCNN, penultimate layer)",
      "classifier_heldout_accuracy": acc}


def quality_row(real_feats: np.ndarray, fake_feats: np.ndarray, seed: int) -> dict[str, float]:
  """FD, KID (mean ± std over subsets), precision and recall of a feature set against the real one."""
  mu_r, s_r = evaluation.feature_statistics(real_feats)
  mu_f, s_f = evaluation.feature_statistics(fake_feats)
  # Subsets of half the smaller set (at most 1000, as Bińkowski et al.), so that the spread is informative.
  subset = max(2, min(len(real_feats), len(fake_feats), 2000) // 2)
  kid_mean, kid_std = evaluation.kid(real_feats, fake_feats, seed=seed, subset_size=subset)
  precision, recall = evaluation.precision_recall(real_feats, fake_feats)
  return {"fd": evaluation.frechet_distance(mu_r, s_r, mu_f, s_f), "kid": kid_mean, "kid_std": kid_std,
          "precision": precision, "recall": recall, "n": int(len(fake_feats))}


def _load_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def steps_table(config: Any, workdir: str, feats_fn: Callable | None, real: np.ndarray | None,
                num: int) -> tuple[list[dict], np.ndarray]:
  """Sample quality and wall time for S = T / f reverse steps, f in `eval.step_fractions`.

  Returns the rows and the images sampled with the first fraction (all T steps by default).
  """
  store = codes_lib.codes_dir(workdir, parallel.process_index(), parallel.process_count())
  k = int(codes_lib.read_meta(store)["codebook_size"])
  code_shape = tuple(codes_lib.load_codes(store, config.data.eval_split).shape[1:])
  denoiser, prior_params, _ = restore_prior(config, workdir, k, code_shape)
  vq_model, vq_params, _, _ = encode.restore_tokenizer(config, workdir)
  sched = stage2.build_schedule(config, k)
  rparams = parallel.replicate(prior_params)
  per_device = -(-num // parallel.local_device_count())
  rows, first = [], None
  for frac in config.eval.step_fractions:
    steps = max(1, sched.num_steps // frac)
    t0 = time.perf_counter()
    codes = sample_code_maps(denoiser, rparams, sched, parametrization=config.diffusion.parametrization,
                             key=jax.random.key(config.eval.seed), per_device=per_device,
                             code_shape=code_shape, num_sampling_steps=steps,
                             chunk=config.sample.chunk_steps)[:num]
    seconds = time.perf_counter() - t0
    images = decode_codes(vq_model, vq_params, codes, config.sample.decode_batch_size)
    first = images if first is None else first
    row = {"steps": steps, "fraction": f"T/{frac}" if frac > 1 else "T", "seconds": seconds}
    if feats_fn is not None:
      row.update(quality_row(real, feats_fn(images), config.eval.seed))
    logging.info("evaluate: %s", row)
    rows.append(row)
  return rows, first


def reference_rows(config: Any, workdir: str, feats_fn: Callable, real: np.ndarray,
                   num: int) -> dict[str, dict]:
  """Floor (real vs real), stage-1 reconstructions, and the ceiling (uniformly random codes)."""
  from vqddm_jax.inpaint import first_images
  store = codes_lib.codes_dir(workdir, parallel.process_index(), parallel.process_count())
  held_codes = codes_lib.load_codes(store, config.data.eval_split)[:num]
  vq_model, vq_params, _, _ = encode.restore_tokenizer(config, workdir)
  decode = lambda c: decode_codes(vq_model, vq_params, c, config.sample.decode_batch_size)  # noqa: E731
  random_codes = np.random.default_rng(config.eval.seed).integers(
      0, vq_model.codebook_size, held_codes.shape).astype(np.int32)
  seed = config.eval.seed
  return {
      "real training images (floor)": quality_row(
          real, feats_fn(first_images(config, config.data.train_split, num)), seed),
      "stage-1 reconstructions of held-out images": quality_row(real, feats_fn(decode(held_codes)), seed),
      "decoded uniformly random codes (ceiling)": quality_row(real, feats_fn(decode(random_codes)), seed),
  }


def run_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Writes `workdir/eval/report.json` and `report.md`; returns the report."""
  from vqddm_jax.inpaint import first_images, run_inpaint
  from vqddm_jax import metrics
  ecfg, out_dir = config.eval, os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  feats_fn, facts = feature_extractor(config, workdir)
  num = min(ecfg.num_samples, codes_lib.read_meta(codes_lib.codes_dir(
      workdir, parallel.process_index(), parallel.process_count()))["counts"][config.data.eval_split])
  real = feats_fn(first_images(config, config.data.eval_split, num)) if feats_fn else None
  rows = reference_rows(config, workdir, feats_fn, real, num) if feats_fn else {}
  table, samples = steps_table(config, workdir, feats_fn, real, num)
  if feats_fn:
    rows[f"samples ({table[0]['steps']} steps)"] = {k: v for k, v in table[0].items()
                                                   if k not in ("steps", "fraction")}
    inp_cfg = config.copy_and_resolve_references()
    inp_cfg.inpaint.num_images = min(ecfg.inpaint_images, num)
    inp = dict(np.load(run_inpaint(inp_cfg, workdir)["npz"]))
    rows[f"inpainting completions ({inp_cfg.inpaint.mask})"] = quality_row(
        feats_fn(inp["originals"]), feats_fn(inp["images"]), ecfg.seed)
  grid = metrics.save_png(os.path.join(out_dir, "samples.png"), metrics.image_grid(samples[:64]))
  prior_eval = _load_json(os.path.join(workdir, "prior", "eval.json")) or {}
  refit_report = _load_json(os.path.join(workdir, "refit", "report.json"))
  codebook = refit_report["finetuned"] if refit_report else _load_json(
      os.path.join(workdir, "vqvae", "eval.json"))
  report = dict(facts, quality=rows, steps_vs_quality=table, heldout_nelbo=prior_eval,
                codebook=codebook, refit=refit_report, samples_grid=os.path.basename(grid),
                seconds=time.perf_counter() - t_start)
  if parallel.is_main_process():
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump(report, f, indent=1, default=float)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(report_markdown(report))
  logging.info("evaluation report: %s", os.path.join(out_dir, "report.md"))
  return report


def report_markdown(report: dict) -> str:
  """The report as Markdown: quality table, steps table, bits per code, codebook, the sample grid."""
  lines = ["# VQ-DDM evaluation report", ""]
  if report.get("feature_network"):
    lines.append(f"Features: {report['feature_network']}" + (
        f" (held-out accuracy {report['classifier_heldout_accuracy']:.2%})"
        if "classifier_heldout_accuracy" in report else "") + ". Each row is compared with the "
        "held-out real images.")
    lines += ["", "| images | FD | KID | precision | recall | n |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['fd']:.3f} | {r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['n']} |" for name, r in report["quality"].items()]
  else:
    lines.append(report.get("note", "sample-quality metrics skipped"))
  lines += ["", "## Sampling steps against quality and wall time", "",
            "| steps | fraction of T | wall time (s) | FD | KID |", "|---|---|---|---|---|"]
  lines += [f"| {r['steps']} | {r['fraction']} | {r['seconds']:.1f} | {r.get('fd', float('nan')):.3f} | "
            f"{r.get('kid', float('nan')):.4f} |" for r in report["steps_vs_quality"]]
  ev = report.get("heldout_nelbo") or {}
  if ev:
    lines += ["", f"Held-out −ELBO: **{ev['nelbo_bits_per_code']:.3f} ± {ev['stderr']:.3f} bits per code** "
              f"(uniform prior: {ev['uniform_bits_per_code']:.3f}; Monte Carlo over "
              f"{ev['t_samples_per_map']} t per map, {ev['num_maps']} maps, step {ev['step']})."]
  cb = report.get("codebook") or {}
  if cb:
    lines += ["", f"Codebook: {cb['usage']:.1%} of codes used on held-out images ({cb['usage_10']:.1%} at "
              f"least 10 times), perplexity {cb['perplexity']:.1f}, reconstruction MSE {cb['mse']:.5f}."]
  lines += ["", f"![samples]({report['samples_grid']})", ""]
  return "\n".join(lines)
