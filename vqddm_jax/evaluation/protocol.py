"""The evaluation protocol behind `--mode=evaluate` and `--mode=reference_stats` (docs/evaluation.md).

Sample quality is measured in the feature space of a network (`feature_net`): the FID Inception network when
`eval.inception_weights` names its weights (FID, KID, precision/recall, and the Inception Score when the file
holds the classifier layer); else, on the embedded MNIST-5k set, a small classifier the project trains and
caches; else VGG16, the LPIPS backbone (`FD_VGG16`, `KID_VGG16`, ...), so that any data set gets finite
numbers offline. As in papers, FD compares `eval.num_samples` samples (generated, decoded and featurised in
chunks of `eval.chunk_size`, so memory does not grow with their number) with the statistics of the whole
training split, computed once and cached in `workdir/eval/` or read from `eval.reference_stats`. KID and
precision/recall need feature vectors, so they compare the first 10,000 images of each set with the held-out
images. Rows: training images (the floor), stage-1 reconstructions of held-out images, samples, inpainting
completions (KID/PR against their originals), and images decoded from uniformly random codes (the ceiling).
Next to them: held-out −ELBO in bits per code, codebook usage and reconstruction error, and sample quality and
wall time against the number of steps.

Image sets travel as chunks (start, rows) of a set in a fixed order; every process keeps its share.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging

from vqddm_jax import ar_generation, data, generation, masks, parallel
from vqddm_jax import files as files_lib
from vqddm_jax.evaluation import classifier, feature_net, inception_score, reference_stats, streamed
from vqddm_jax.workdir import Workdir

FEATURE_BATCH = 250  # Real images per pipeline batch on their way to the feature network.


def feature_network_key(config: Any) -> str:
  """Which network `feature_network` picks, without loading it: 'inception', 'classifier' or 'vgg16'."""
  if config.eval.inception_weights:
    return "inception"
  return "classifier" if config.data.source == "mnist5k" else "vgg16"


def feature_network(config: Any, workdir: Workdir) -> tuple[feature_net.FeatureNet, dict]:
  """The feature network for the data set of the config, and facts about it for the report."""
  ecfg = config.eval
  key = feature_network_key(config)
  if key == "inception":
    net = feature_net.inception_net(ecfg.inception_weights)
    facts = {"weights": ecfg.inception_weights}
    if not net.has_scores:
      facts["note"] = ("No Inception Score: the weights file holds no classifier layer (params/fc); convert "
                       "pytorch-fid's .pth again with `python -m vqddm_jax.evaluation.inception_weights`")
    return net, facts
  if key == "vgg16":
    logging.warning("evaluate: no config.eval.inception_weights given: FD, KID and precision/recall are "
                    "computed in VGG16 feature space (FD_VGG16, ...), not comparable with published FID")
    return feature_net.vgg16_net(), {
        "note": "No Inception weights given: metrics are in VGG16 feature space (FD_VGG16 is not FID); set "
                "--config.eval.inception_weights=PATH for FID (see README)"}
  images, labels = classifier.labelled_split(config.data, config.data.train_split)
  held, held_labels = classifier.labelled_split(config.data, config.data.eval_split)
  t0 = time.perf_counter()
  params, meta = classifier.load_or_train(workdir.classifier_cache, images, labels,
                                          seed=ecfg.classifier_seed, num_steps=ecfg.classifier_steps,
                                          save=parallel.is_main_process())
  acc = classifier.accuracy(params, held, held_labels)
  logging.info("evaluate: classifier held-out accuracy %.2f%% (%s in %.1fs)", 100 * acc,
               "loaded" if meta.get("cached") else "trained", time.perf_counter() - t0)
  return feature_net.classifier_net(params), {"classifier_heldout_accuracy": acc}


def reference_statistics(config: Any, workdir: Workdir,
                         net: feature_net.FeatureNet) -> reference_stats.ReferenceStats:
  """The training split's statistics: `eval.reference_stats`, else the work directory's cache, else computed
  now and cached (MismatchError / ConfigError when a file does not fit this run)."""
  return reference_stats.load_or_compute(config.data, net, cache=workdir.reference_stats(net.key),
                                         given=config.eval.reference_stats, batch_size=FEATURE_BATCH)


def host_slices(chunks: Iterable[tuple[int, Any]], total: int) -> Iterator[tuple[int, Any]]:
  """The parts of chunks (start, rows) of a set of `total` that fall in this process's share."""
  mine = parallel.host_slice(total)
  lo, hi = mine.start, mine.stop
  for start, rows in chunks:
    a, b = max(lo, start), min(hi, start + len(rows))
    if a < b:
      yield a, rows[a - start:b - start]


def array_chunks(array: np.ndarray, size: int) -> Iterator[tuple[int, np.ndarray]]:
  return ((i, array[i:i + size]) for i in range(0, len(array), size))


def _split_chunks(data_cfg: Any, split: str, num: int) -> Iterator[tuple[int, np.ndarray]]:
  """The first `num` images of `split` as (start, f32[n, S, S, C]); every process reads them all (the
  order must be the same everywhere) and keeps its share."""
  def all_chunks():
    start = 0
    for batch in data.eval_batches(data_cfg, split=split, global_batch_size=FEATURE_BATCH, num_shards=1,
                                   max_examples=num, process_index=0, process_count=1):
      images = batch["image"][0][batch["mask"][0]]
      yield start, images
      start += len(images)
  return host_slices(all_chunks(), num)


def decoded(config: Any, gen: generation.Generator,
             code_chunks: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
  """Decodes (start, codes) chunks into images as they would be saved (8-bit PNG): clipped to [-1, 1] and
  rounded to the 256 levels real images have, so samples and the reference differ in content only."""
  for start, codes in code_chunks:
    images = generation.decode_codes(gen.tokenizer, codes, config.sample.decode_batch_size)
    yield start, as_saved(images)


def as_saved(images: np.ndarray) -> np.ndarray:
  """f32[N, H, W, C] in [-1, 1] quantised as by saving to 8 bits and reading back."""
  return (np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0).astype(np.float32)


class Scorer:
  """Turns an image set, given in chunks, into a report row against the reference and the real features."""

  def __init__(self, net: feature_net.FeatureNet, ref: reference_stats.ReferenceStats, real: np.ndarray,
               seed: int):
    self.net, self.ref, self.real, self.seed = net, ref, real, seed

  def row(self, chunks: Iterable[tuple[int, np.ndarray]], total: int, *,
          real: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(row, the set's first images) for a set of `total` images; `real` replaces the held-out features."""
    s = streamed.stream(self.net, chunks, total)
    row = streamed.quality_row(s, ref_mu=self.ref.mu, ref_sigma=self.ref.sigma,
                               real=self.real if real is None else real, seed=self.seed)
    return row, s.first_images


def scored_samples(config: Any, gen: generation.Generator, scorer: Scorer,
                   code_chunks: Iterable[tuple[int, np.ndarray]]) -> tuple[dict, np.ndarray, float]:
  """(quality row, first images, sampling seconds) of the `eval.num_samples` code maps `code_chunks` yields
  (start, i32[n, h, w]) as a sampler makes them: only the sampling is timed, not decoding and features."""
  num = config.eval.num_samples
  seconds = [0.0]

  def timed(chunks):
    t0 = time.perf_counter()
    for item in chunks:
      seconds[0] += time.perf_counter() - t0
      yield item
      t0 = time.perf_counter()

  quality, first = scorer.row(decoded(config, gen, host_slices(timed(code_chunks), num)), num)
  return quality, first, seconds[0]


def _sample_set_row(config: Any, gen: generation.Generator, scorer: Scorer, rparams: Any, *, steps: int,
                    seed: int) -> tuple[dict, np.ndarray, float]:
  """`scored_samples` of the diffusion prior's samples drawn with `jax.random.key(seed)` in `steps` reverse
  steps."""
  ecfg = config.eval
  return scored_samples(config, gen, scorer, generation.sample_in_chunks(
      gen, rparams, key=jax.random.key(seed), num=ecfg.num_samples, chunk_size=ecfg.chunk_size,
      num_sampling_steps=steps, chunk_steps=config.sample.chunk_steps))


def steps_table(config: Any, gen: generation.Generator, scorer: Scorer) -> tuple[list[dict], np.ndarray]:
  """Quality of `eval.num_samples` samples and wall time for S = T / f reverse steps, f in
  `eval.step_fractions`; returns the rows and the first images sampled with the first fraction."""
  rparams = parallel.replicate(gen.prior.params)
  rows, grid = [], None
  for frac in config.eval.step_fractions:
    steps = max(1, gen.sched.num_steps // frac)
    quality, first, seconds = _sample_set_row(config, gen, scorer, rparams, steps=steps, seed=config.eval.seed)
    grid = first if grid is None else grid
    row = {"steps": steps, "fraction": f"T/{frac}" if frac > 1 else "T", "seconds": seconds, **quality}
    logging.info("evaluate: %s", row)
    rows.append(row)
  return rows, grid


DRAW_METRICS = ("fd", "kid", "precision", "recall")


def sample_draws(config: Any, gen: generation.Generator, scorer: Scorer, first: dict) -> dict | None:
  """The samples row over `eval.sample_draws` independent sample sets, to show how much of it is the draw.

  Draw r samples with seed `eval.seed + r`, so its FD, precision and recall are those a report made with
  `--config.eval.seed=eval.seed + r` shows; draw 0 is the report's own samples row (`first`, not sampled
  again). Only the steps of the first step fraction are drawn again.

  Returns:
    None for one draw, else {'steps', 'draws': [{'seed', 'fd', 'kid', 'precision', 'recall'}, ...],
    'mean': {metric: float}, 'std': {metric: float} (sample standard deviation, ddof = 1)}.
  """
  if config.eval.sample_draws <= 1:
    return None
  rparams = parallel.replicate(gen.prior.params)
  steps = first["steps"]
  row = lambda seed: _sample_set_row(config, gen, scorer, rparams, steps=steps, seed=seed)[::2]  # noqa: E731
  return dict(steps=steps, **draws_summary(config, first, row))


def draws_summary(config: Any, first: dict, row_for_seed: Callable[[int], tuple[dict, float]] | None) -> dict:
  """{'draws', 'mean', 'std'} of DRAW_METRICS over `eval.sample_draws` draws: `first` (seed `eval.seed`; its
  `seconds` if it has them), then `row_for_seed(eval.seed + r) -> (row, sampling seconds)` for r = 1 .. R − 1.
  Each draw keeps its sampling seconds (the first includes compiling the sampler)."""
  ecfg = config.eval
  draws = [{"seed": ecfg.seed, **{m: first[m] for m in DRAW_METRICS}, "seconds": first.get("seconds")}]
  for r in range(1, ecfg.sample_draws):
    quality, seconds = row_for_seed(ecfg.seed + r)
    draws.append({"seed": ecfg.seed + r, **{m: quality[m] for m in DRAW_METRICS}, "seconds": seconds})
    logging.info("evaluate: draw %d of %d: %s", r + 1, ecfg.sample_draws, draws[-1])
  values = {m: np.array([d[m] for d in draws], np.float64) for m in DRAW_METRICS}
  std = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
  return {"draws": draws, "mean": {m: float(v.mean()) for m, v in values.items()},
          "std": {m: std(v) for m, v in values.items()}}


def _random_code_chunks(config: Any, gen: generation.Generator, num: int) -> Iterator[tuple[int, np.ndarray]]:
  """`num` uniformly random code maps, chunk by chunk (each chunk from its own seed: no N-sized array)."""
  size, k = config.eval.chunk_size, gen.tokenizer.model.codebook_size
  for start in range(0, num, size):
    rng = np.random.default_rng([config.eval.seed, start])
    yield start, rng.integers(0, k, (min(size, num - start),) + gen.code_shape).astype(np.int32)


def reference_rows(config: Any, gen: generation.Generator, scorer: Scorer) -> dict[str, dict]:
  """Floor (training images), stage-1 reconstructions of held-out images, the ceiling (random codes)."""
  num, size = config.eval.num_samples, config.eval.chunk_size
  n_train = min(num, data.num_examples(config.data, config.data.train_split))
  held = gen.heldout_codes
  return {
      "real training images (floor)": scorer.row(_split_chunks(config.data, config.data.train_split, n_train),
                                                 n_train)[0],
      "stage-1 reconstructions of held-out images": scorer.row(
          decoded(config, gen, host_slices(array_chunks(held, size), len(held))), len(held))[0],
      "decoded uniformly random codes (ceiling)": scorer.row(
          decoded(config, gen, host_slices(_random_code_chunks(config, gen, num), num)), num)[0],
  }


def real_features(config: Any, net: feature_net.FeatureNet, num: int) -> np.ndarray:
  """Features f32[num, F] of the first `num` held-out images (KID's and precision/recall's real set)."""
  return streamed.stream(net, _split_chunks(config.data, config.data.eval_split, num), num, keep=num).kept


def evaluate(config: Any, workdir: Workdir, gen: generation.Generator, *, inputs: dict | None,
             compare: Callable | None = None, conditional: Callable | None = None) -> tuple[dict, dict]:
  """The report of the models `gen` restored from `workdir` (also saves the inpainting completions it scores
  under `eval/`).

  Args:
    config: the run's config (`eval`, `inpaint`, `sample`, `data` and `diffusion` sections).
    workdir: where the classifier and reference statistics are cached and the training reports are read.
    gen: the restored prior and tokenizer.
    inputs: what the report was made from, stored in it under 'inputs'.
    compare: with the AR prior there, `comparison.compare` (passed in: it builds on this module), whose
      section becomes the report's 'comparison'.
    conditional: for a class-conditional prior, `conditional.conditional_section` (passed in as `compare`),
      whose section becomes the report's 'conditional' and whose grids (one row per class) 'class_grids'.

  Returns:
    (report, grids): the first samples f32[n, H, W, C] in [-1, 1] drawn with the first step fraction under
    'samples', and the AR prior's under 'ar_samples' when it is there (its `comparison` section too).
  """
  net, facts = feature_network(config, workdir)
  ref = reference_statistics(config, workdir, net)
  n_real = min(len(gen.heldout_codes), streamed.MAX_KEPT)
  scorer = Scorer(net, ref, real_features(config, net, n_real), config.eval.seed)
  rows = reference_rows(config, gen, scorer)
  table, samples = steps_table(config, gen, scorer)
  rows[f"samples ({table[0]['steps']} steps)"] = {k: v for k, v in table[0].items()
                                                 if k not in ("steps", "fraction", "seconds")}
  rows[f"inpainting completions ({config.inpaint.mask})"] = inpainting_row(
      config, workdir, gen, scorer, min(config.eval.inpaint_images, len(gen.heldout_codes)))[0]
  report = dict(facts, protocol=protocol_facts(config, net, ref, n_real, workdir), quality=rows,
                steps_vs_quality=table, sample_draws=sample_draws(config, gen, scorer, table[0]), inputs=inputs,
                heldout_nelbo=files_lib.read_json(workdir.prior.eval_json) or {},
                heldout_ar_bits=(files_lib.read_json(workdir.ar.eval_json) or {}) if gen.ar is not None else None,
                codebook=_codebook_facts(config, workdir), refit=files_lib.read_json(workdir.refit_report("json")),
                samples_grid=workdir.eval_samples_grid.name)
  grids = {"samples": samples}
  if gen.ar is not None and compare is not None:
    report["comparison"], grids["ar_samples"] = compare(config, workdir, gen, scorer, report)
  if gen.num_labels and conditional is not None:
    report["conditional"], grids["class_grids"] = conditional(config, gen, scorer, table[0]["steps"])
  return report, grids


def protocol_facts(config: Any, net: feature_net.FeatureNet, ref: reference_stats.ReferenceStats, n_real: int,
                   workdir: Workdir) -> dict:
  """How the numbers were made, stated above the report's table."""
  rec = ref.record
  return {"feature_network": net.description, "feature_key": net.key, "metric_names": net.metric_names(),
          "num_samples": config.eval.num_samples, "num_steps": config.diffusion.num_steps,
          "temperature": float(config.sample.temperature),
          "reference": {"file": str(config.eval.reference_stats or workdir.reference_stats(net.key)),
                        "dataset": rec["dataset"], "split": rec["split"], "count": rec["count"],
                        "image_size": rec["image_size"]},
          "kid_pr_real": {"split": config.data.eval_split, "count": n_real},
          "kid_pr_max_images": streamed.MAX_KEPT,
          "inception_score_splits": inception_score.NUM_SPLITS if net.has_scores else None}


def inpainting_row(config: Any, workdir: Workdir, gen: generation.Generator, scorer: Scorer, num_images: int,
                   *, mask_spec: str | None = None, protocol: str | None = None) -> tuple[dict, dict]:
  """(quality row, arrays) of completions of `num_images` held-out images under `mask_spec` (default
  `config.inpaint.mask`) by the diffusion prior, or by the AR prior's `protocol`; KID/PR against their
  originals. The completions are kept under `eval/inpaint/<mask>/[ar_<protocol>/]`."""
  spec = config.inpaint.mask if mask_spec is None else mask_spec
  if protocol is None:
    result, folder = generation.inpaint_heldout(config, gen, num_images, mask_spec=spec), ""
    record = dict(gen.models, num_images=num_images)
  else:
    result = ar_generation.inpaint_heldout(config, gen, num_images, protocol, mask_spec=spec)
    folder = ar_generation.protocol_name(protocol, gen.ar_sampling["candidates"])
    record = dict(gen.ar_models, num_images=num_images, protocol=protocol)
  if parallel.is_main_process():
    generation.save_inpainting(workdir.eval_inpaint(masks.mask_name(spec), folder), result,
                               config.data.image_size, dict(record, mask=spec))
  originals = scorer.net.features(result["originals"])
  images = as_saved(result["images"])
  row = scorer.row(host_slices(array_chunks(images, config.eval.chunk_size), len(images)), len(images),
                   real=originals)[0]
  return row, result


def _codebook_facts(config: Any, workdir: Workdir) -> dict | None:
  """Usage, perplexity and MSE of the final tokenizer (ReFiT's fine-tuned codebook when ReFiT ran)."""
  refit_report = files_lib.read_json(workdir.refit_report("json"))
  return refit_report["finetuned"] if refit_report else files_lib.read_json(workdir.vqvae.eval_json)
