"""`--mode=evaluate`: a report a user can trust — `workdir/eval/report.json` and `report.md`.

Sample quality is measured in the feature space of a network: on labelled embedded data (MNIST-5k) a small
classifier the project trains and caches (`evaluation.classifier`); on other data the FID Inception network
when `eval.inception_weights` names its weights, else quality metrics are skipped with a clear note. Each
row compares a set of images with the held-out real images (Fréchet distance, KID, k-NN precision/recall):
held-out vs training real images (the floor), stage-1 reconstructions, samples, inpainting completions, and
images decoded from uniformly random codes (the ceiling). Next to them: held-out −ELBO in bits per code,
codebook usage and reconstruction error, and sample quality and wall time against the number of steps.
The report records the checkpoints and settings it was made from; it is redone when they change.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from vqddm_jax import data, evaluation, generation, masks, metrics, parallel
from vqddm_jax import workdir as workdir_lib
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def _record(config: Any, models: dict) -> dict:
  """What the report depends on besides the data: the checkpoints and the evaluation settings."""
  icfg = config.inpaint
  return dict(models, eval=config.eval.to_dict(), inpaint={"mask": icfg.mask, "seed": icfg.seed,
                                                           "steps": icfg.steps},
              num_steps=config.diffusion.num_steps)


def is_done(config: Any, workdir: Workdir) -> bool:
  models = generation.current_record(config, workdir)
  return models is not None and workdir_lib.same_record(
      workdir.eval_report("json"), {"inputs": _record(config, models)})


def feature_extractor(config: Any, workdir: Workdir) -> tuple[Callable | None, dict]:
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
  params, meta = evaluation.load_or_train(workdir.classifier_cache, images, labels, seed=config.seed,
                                          num_steps=ecfg.classifier_steps, save=parallel.is_main_process())
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


def steps_table(config: Any, gen: generation.Generator, feats_fn: Callable | None, real: np.ndarray | None,
                num: int) -> tuple[list[dict], np.ndarray]:
  """Sample quality and wall time for S = T / f reverse steps, f in `eval.step_fractions`.

  Returns the rows and the images sampled with the first fraction (all T steps by default).
  """
  rparams = parallel.replicate(gen.prior.params)
  per_device = -(-num // parallel.device_count())
  rows, first = [], None
  for frac in config.eval.step_fractions:
    steps = max(1, gen.sched.num_steps // frac)
    t0 = time.perf_counter()
    codes = generation.sample_code_maps(gen, rparams, key=jax.random.key(config.eval.seed),
                                        per_device=per_device, num_sampling_steps=steps,
                                        chunk=config.sample.chunk_steps)[:num]
    seconds = time.perf_counter() - t0
    images = generation.decode_codes(gen.tokenizer, codes, config.sample.decode_batch_size)
    first = images if first is None else first
    row = {"steps": steps, "fraction": f"T/{frac}" if frac > 1 else "T", "seconds": seconds}
    if feats_fn is not None:
      row.update(quality_row(real, feats_fn(images), config.eval.seed))
    logging.info("evaluate: %s", row)
    rows.append(row)
  return rows, first


def reference_rows(config: Any, gen: generation.Generator, feats_fn: Callable, real: np.ndarray,
                   num: int) -> dict[str, dict]:
  """Floor (real vs real), stage-1 reconstructions, and the ceiling (uniformly random codes)."""
  held_codes = gen.heldout_codes[:num]
  decode = lambda c: generation.decode_codes(gen.tokenizer, c, config.sample.decode_batch_size)  # noqa: E731
  random_codes = np.random.default_rng(config.eval.seed).integers(
      0, gen.tokenizer.model.codebook_size, held_codes.shape).astype(np.int32)
  seed = config.eval.seed
  return {
      "real training images (floor)": quality_row(
          real, feats_fn(data.first_images(config.data, config.data.train_split, num)), seed),
      "stage-1 reconstructions of held-out images": quality_row(real, feats_fn(decode(held_codes)), seed),
      "decoded uniformly random codes (ceiling)": quality_row(real, feats_fn(decode(random_codes)), seed),
  }


def run(config: Any, workdir: Workdir) -> StageResult:
  """Writes `workdir/eval/report.json` and `report.md` (and evaluate's own inpainting under `eval/`)."""
  ecfg = config.eval
  t_start = time.perf_counter()
  gen = generation.load_generator(config, workdir)
  feats_fn, facts = feature_extractor(config, workdir)
  num = min(ecfg.num_samples, len(gen.heldout_codes))
  real = feats_fn(data.first_images(config.data, config.data.eval_split, num)) if feats_fn else None
  rows = reference_rows(config, gen, feats_fn, real, num) if feats_fn else {}
  table, samples = steps_table(config, gen, feats_fn, real, num)
  if feats_fn:
    rows[f"samples ({table[0]['steps']} steps)"] = {k: v for k, v in table[0].items()
                                                   if k not in ("steps", "fraction")}
    rows[f"inpainting completions ({config.inpaint.mask})"] = _inpainting_row(config, workdir, gen, feats_fn,
                                                                             min(ecfg.inpaint_images, num))
  report = dict(facts, quality=rows, steps_vs_quality=table, inputs=_record(config, gen.record()),
                heldout_nelbo=workdir_lib.read_json(workdir.train("prior").eval_json) or {},
                codebook=_codebook_facts(config, workdir), refit=workdir_lib.read_json(workdir.refit_report("json")),
                samples_grid=workdir.eval_samples_grid.name, seconds=time.perf_counter() - t_start)
  if parallel.is_main_process():
    workdir_lib.write_png(workdir.eval_samples_grid, metrics.image_grid(samples[:64]))
    workdir_lib.write_json(workdir.eval_report("json"), report)
    workdir_lib.write_text(workdir.eval_report("md"), report_markdown(report))
  logging.info("evaluation report: %s", workdir.eval_report("md"))
  return StageResult("evaluate", True, (str(workdir.eval_report("md")), str(workdir.eval_report("json"))))


def _inpainting_row(config: Any, workdir: Workdir, gen: generation.Generator, feats_fn: Callable,
                    num_images: int) -> dict:
  """Quality of completions of `num_images` held-out images against their originals (kept in `eval/`)."""
  result = generation.inpaint_heldout(config, gen, num_images)
  if parallel.is_main_process():
    generation.save_inpainting(workdir.eval_inpaint(masks.mask_name(config.inpaint.mask)), result,
                               config.data.image_size, dict(gen.record(), num_images=num_images))
  return quality_row(feats_fn(result["originals"]), feats_fn(result["images"]), config.eval.seed)


def _codebook_facts(config: Any, workdir: Workdir) -> dict | None:
  """Usage, perplexity and MSE of the final tokenizer (ReFiT's fine-tuned codebook when ReFiT ran)."""
  refit_report = workdir_lib.read_json(workdir.refit_report("json"))
  return refit_report["finetuned"] if refit_report else workdir_lib.read_json(workdir.train("vqvae").eval_json)


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
