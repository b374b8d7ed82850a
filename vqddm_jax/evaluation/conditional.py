"""The report's conditional section: a class-conditional prior's samples under classifier-free guidance.

For each guidance scale s in `eval.guidance_scales`, `eval.sample_draws` sets of `eval.num_samples` samples are
drawn, sample i asking for class i mod C (so every class gets the same share), with the steps of the report's
first step fraction and the seeds of the samples row (`eval.seed + r` for draw r: every s sees the same noise).
Each set is scored three ways:
- accuracy: how often the evaluation classifier (the project's MNIST classifier; none for other feature
  networks) predicts the requested class, overall and per class;
- overall FD against the training split's statistics and precision / recall against the held-out images, as
  the samples row;
- per class c: FD of the class-c samples against the statistics of the class-c training images (the first
  `streamed.MAX_KEPT` of the split), precision / recall against the class-c held-out images.
Per-class FD from a few dozen samples is biased upwards (a covariance from fewer samples than features): read it
across s, not against other reports. Figures are means (and standard deviations) over the draws.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from vqddm_jax import data, generation, parallel
from vqddm_jax.evaluation import feature_metrics, protocol, streamed

_METRICS = ("accuracy", "fd", "precision", "recall")
GRID_COLUMNS = 8  # Samples per class (one row each) in the section's grids.
GRID_CLASSES = 16  # Classes (rows) in a grid, the first ones; all are scored.


def labelled_features(config: Any, net: Any, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
  """(features f32[n, F], labels i32[n]) of the first `num` images of `split` (every process reads them all)."""
  feats, labels = [], []
  for batch in data.eval_batches(config.data, split=split, global_batch_size=protocol.FEATURE_BATCH,
                                 num_shards=1, max_examples=num, with_labels=True, process_index=0,
                                 process_count=1):
    keep = batch["mask"][0]
    feats.append(net.features(batch["image"][0][keep]))
    labels.append(batch["label"][0][keep])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def _class_stats(feats: np.ndarray, labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
  return feature_metrics.feature_statistics(feats[labels == c].astype(np.float64))


def _scored_set(config: Any, gen: generation.Generator, net: Any, rparams: Any, *, scale: float, seed: int,
                steps: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """(features f32[N, F], predicted classes i32[N] or None, the first images) of one guided sample set."""
  num, c = config.eval.num_samples, gen.num_labels
  labels = (np.arange(num) % c).astype(np.int32)
  chunks = generation.sample_in_chunks(gen, rparams, key=jax.random.key(seed), num=num,
                                       chunk_size=config.eval.chunk_size, num_sampling_steps=steps,
                                       chunk_steps=config.sample.chunk_steps, labels=labels, guidance_scale=scale)
  preds, first = [], []

  def classified(images_chunks):  # Beside the features `streamed.stream` keeps: predictions, the grid's chunk.
    for start, images in images_chunks:
      if net.classify is not None:
        preds.append(net.classify(images))
      if start == 0:  # Process 0's first chunk: the grid's samples.
        first.append(images)
      yield start, images

  kept = streamed.stream(net, classified(protocol.decoded(config, gen, protocol.host_slices(chunks, num))), num,
                         keep=num).kept
  if net.classify is not None:  # A process without samples still takes part in the gather.
    preds = parallel.gather_rows(np.concatenate(preds) if preds else np.zeros((0,), np.int32))
  else:
    preds = None
  return kept, preds, (np.concatenate(first) if first else np.zeros((0,), np.float32))


def _set_figures(config: Any, feats: np.ndarray, preds: np.ndarray | None, refs: dict) -> dict:
  """Overall and per-class accuracy / FD / precision / recall of one sample set (sample i asked for i mod C)."""
  c = refs["num_classes"]
  asked = np.arange(len(feats)) % c

  def figures(sel: np.ndarray, mu, sigma, real) -> dict:
    fake = feats[sel]
    mean, cov = feature_metrics.feature_statistics(fake.astype(np.float64))
    k = max(1, min(3, len(real) - 1, len(fake) - 1))
    precision, recall = feature_metrics.precision_recall(real, fake, k=k)
    return {"accuracy": None if preds is None else float(np.mean(preds[sel] == asked[sel])),
            "fd": feature_metrics.frechet_distance(mu, sigma, mean, cov), "precision": precision,
            "recall": recall, "n": int(sel.sum())}

  every = np.ones(len(feats), bool)
  out = {"overall": figures(every, refs["mu"], refs["sigma"], refs["real"])}
  out["per_class"] = [figures(asked == y, *refs["class_stats"][y], refs["real_by_class"][y]) for y in range(c)]
  return out


def _references(config: Any, gen: generation.Generator, scorer: protocol.Scorer) -> dict:
  """The per-class reference statistics (training images) and real sets (held-out images)."""
  c = gen.num_labels
  n_train = min(streamed.MAX_KEPT, data.num_examples(config.data, config.data.train_split))
  train_feats, train_labels = labelled_features(config, scorer.net, config.data.train_split, n_train)
  held_feats, held_labels = labelled_features(config, scorer.net, config.data.eval_split, len(scorer.real))
  missing = [y for y in range(c) if (train_labels == y).sum() < 2 or (held_labels == y).sum() < 2]
  if missing:
    logging.warning("evaluate: classes %s have fewer than 2 training or held-out images among those scored; "
                    "their per-class figures are NaN", missing)
  nan_stats = (np.full(scorer.net.dim, np.nan), np.full((scorer.net.dim,) * 2, np.nan))
  return {"num_classes": c, "mu": scorer.ref.mu, "sigma": scorer.ref.sigma, "real": scorer.real,
          "class_stats": [nan_stats if y in missing else _class_stats(train_feats, train_labels, y)
                          for y in range(c)],
          "real_by_class": [held_feats[held_labels == y] if y not in missing else held_feats[:2]
                            for y in range(c)]}


def _mean_std(values: list) -> tuple[float | None, float | None]:
  if any(v is None for v in values):
    return None, None
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def _summarise(draws: list[dict], num_classes: int) -> dict:
  """Means and standard deviations over the draws, overall and per class."""
  def over(rows: list[dict]) -> dict:
    out = {}
    for m in _METRICS:
      out[m], out[f"{m}_std"] = _mean_std([r[m] for r in rows])
    out["n"] = rows[0]["n"]
    return out
  return {"overall": over([d["overall"] for d in draws]),
          "per_class": [over([d["per_class"][y] for d in draws]) for y in range(num_classes)]}


def class_grid(images: np.ndarray, num_classes: int, columns: int = GRID_COLUMNS) -> np.ndarray:
  """The first `columns` samples of each of the first GRID_CLASSES classes, one row per class (sample i asked
  for i mod C):
  `f32[C * columns, H, W, C']` in row order, for `images.image_grid(..., ncol=columns)`."""
  rows = [images[y::num_classes][:columns] for y in range(min(num_classes, GRID_CLASSES))]
  columns = min(len(r) for r in rows)
  return np.concatenate([r[:columns] for r in rows])


def conditional_section(config: Any, gen: generation.Generator, scorer: protocol.Scorer, steps: int
                        ) -> tuple[dict, dict[float, np.ndarray]]:
  """The section for a conditional prior ({} of grids and None for an unconditional one is the caller's)."""
  refs = _references(config, gen, scorer)
  rparams = parallel.replicate(gen.prior.params)
  rows, grids = [], {}
  for scale in config.eval.guidance_scales:
    draws = []
    for r in range(config.eval.sample_draws):
      feats, preds, first = _scored_set(config, gen, scorer.net, rparams, scale=float(scale),
                                        seed=config.eval.seed + r, steps=steps)
      draws.append(_set_figures(config, feats, preds, refs))
      if r == 0 and len(first):
        grids[float(scale)] = class_grid(first, gen.num_labels)
      logging.info("evaluate: guidance s = %g, draw %d: %s", scale, r + 1, draws[-1]["overall"])
    rows.append({"guidance_scale": float(scale), **_summarise(draws, gen.num_labels),
                 "draws": [d["overall"] for d in draws]})
  return {"steps": steps, "draws": config.eval.sample_draws, "num_samples": config.eval.num_samples,
          "classifier": scorer.net.classify is not None, "rows": rows}, grids
