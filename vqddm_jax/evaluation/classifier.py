"""A small CNN classifier whose penultimate layer is the offline feature space for FD, KID, precision/recall.

No FID weights can be downloaded where this project is built (see docs/offline.md), so on the embedded MNIST-5k
set sample quality is measured in the feature space of this network, trained by the project on the training
split (4,500 digits) and checked on the held-out split (500). Training is one jitted `lax.scan` over all
steps on one device (the network is tiny; pmap would only add transfers); `load_or_train` caches the result
so an evaluation pays it once per workdir.

Measured with the defaults (800 steps of 64, AdamW 3e-3 cosine-decayed, weight decay 1e-2, ±2 px shifts):
held-out accuracy 97.6 / 98.4 / 98.8 % for seeds 0 / 1 / 2, in 70-80 s of process CPU time, about 40 s of
wall time on two otherwise idle cores (several times more under XLA's fake multi-device test flags).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import serialization

from vqddm_jax import files as files_lib

FEATURES = 128  # Width of the penultimate layer, the feature space of the metrics.
WIDTHS = (32, 64, 64)  # Conv stage widths of the default classifier.
NUM_STEPS = 800  # Default training length and batch: >= 97 % held-out on MNIST-5k (see the module doc).
BATCH_SIZE = 64
_ARCH = "smallcnn-patches-v1"  # Part of the cache key: change it whenever SmallCNN changes.


def _patches3x3(x: jax.Array) -> jax.Array:
  """f32[B, H, W, C] → f32[B, H, W, 9C]: the zero-padded 3×3 neighbourhood of every pixel ("SAME")."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)


def _max_pool2(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """Three 3×3-conv/ReLU/2×2-max-pool stages and a 128-d hidden layer (188 k parameters at the default
  widths (32, 64, 64) on 32×32×1 inputs).

  Each 3×3 convolution is written as patches + Dense (the same function, kernel laid out [9·C_in, C_out]):
  on XLA:CPU the backward pass of `lax.conv` inside the training scan measured ~15× slower than the
  equivalent matrix products, and training speed on two CPU cores is what this network is sized for.
  """

  num_classes: int = 10
  widths: tuple[int, ...] = WIDTHS

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: f32[B, H, W, C] in [-1, 1], H and W divisible by 8 → (logits f32[B, num_classes],
    features f32[B, FEATURES])."""
    for width in self.widths:
      x = _max_pool2(nn.relu(nn.Dense(width)(_patches3x3(x))))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(FEATURES)(x))
    return nn.Dense(self.num_classes)(features), features


def _check_images(images, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be f32[N, H, W, C], got shape {images.shape}")
  if labels is not None:
    labels = np.asarray(labels, np.int32)
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels must be i32[{images.shape[0]}], got shape {labels.shape}")
  return images, labels


def _shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Random translation by up to ±max_shift pixels, filled with the background -1; keeps small data from
  being memorised, which is what makes 97 % reachable from 4,500 digits in a few hundred steps."""
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


@functools.lru_cache(maxsize=8)
def _train_fn(*, image_shape: tuple[int, ...], widths: tuple[int, ...], num_classes: int, num_steps: int,
              batch_size: int, learning_rate: float, weight_decay: float, max_shift: int):
  """The whole training run as one jitted function of (seed, images, labels); cached per static setting
  so that retraining with the same shapes (tests, cache misses) does not compile again."""
  model = SmallCNN(num_classes=num_classes, widths=widths)
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps), weight_decay=weight_decay)

  def loss_fn(p, x, y):
    logits, _ = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run(seed, x_all, y_all):
    init_key, base = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key, jnp.zeros((1,) + image_shape))["params"]

    def step(carry, i):
      p, opt_state = carry
      k_batch, k_shift = jax.random.split(jax.random.fold_in(base, i))
      idx = jax.random.randint(k_batch, (batch_size,), 0, x_all.shape[0])
      x = _shift(x_all[idx], k_shift, max_shift) if max_shift else x_all[idx]
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y_all[idx])
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(num_steps))
    return params, losses

  return run


def train_classifier(images, labels, *, seed: int = 0, num_steps: int = NUM_STEPS,
                     batch_size: int = BATCH_SIZE, learning_rate: float = 3e-3, weight_decay: float = 1e-2,
                     max_shift: int = 2, widths: tuple[int, ...] = WIDTHS,
                     num_classes: int = 10) -> tuple[Any, dict[str, Any]]:
  """Trains SmallCNN with AdamW (cosine-decayed learning rate) and cross-entropy.

  Each step draws `batch_size` training examples uniformly with replacement (key `fold_in(seed, step)`)
  and shifts them randomly; the result is a deterministic function of the arguments on a given machine and
  XLA configuration (float rounding may differ across them).

  Args:
    images: f32[N, H, W, C] in [-1, 1], H and W divisible by 8 (MNIST-5k: [4500, 32, 32, 1]).
    labels: i32[N] in [0, num_classes).
    seed: seed of initialisation and batches.
    num_steps: optimiser steps.
    batch_size: examples per step.
    learning_rate: peak learning rate.
    weight_decay: AdamW's decoupled weight decay.
    max_shift: augmentation shift in pixels (0 disables it).
    widths: channels of the three conv stages.
    num_classes: output classes.

  Returns:
    (params, meta): params of SmallCNN (NumPy); meta a JSON-serialisable dict with the arguments, the mean
    training loss of the last 5 % of steps, and `train_seconds` / `train_cpu_seconds` (wall and process
    CPU time, compilation included).
  """
  images, labels = _check_images(images, labels)
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  start, cpu_start = time.perf_counter(), time.process_time()
  run = _train_fn(image_shape=tuple(images.shape[1:]), widths=tuple(widths), num_classes=num_classes,
                  num_steps=num_steps, batch_size=batch_size, learning_rate=learning_rate,
                  weight_decay=weight_decay, max_shift=max_shift)
  params, losses = jax.device_get(run(seed, images, labels))
  meta = dict(arch=_ARCH, seed=seed, num_steps=num_steps, batch_size=batch_size,
              learning_rate=learning_rate, weight_decay=weight_decay, max_shift=max_shift,
              widths=list(widths), num_classes=num_classes,
              image_shape=list(images.shape[1:]), num_train=int(images.shape[0]),
              final_loss=float(losses[-max(1, num_steps // 20):].mean()),
              train_seconds=time.perf_counter() - start, train_cpu_seconds=time.process_time() - cpu_start)
  return params, meta


def _model_of(params) -> SmallCNN:
  """The SmallCNN that `params` belong to: conv widths and classes read off the Dense kernels."""
  dense = [params[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(params))]
  return SmallCNN(num_classes=dense[-1], widths=tuple(dense[:-2]))


@functools.partial(jax.jit, static_argnames="model")
def _apply(params, x, model):
  return model.apply({"params": params}, x)


def _batched_apply(params, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(logits f32[N, classes], features f32[N, FEATURES]); pads the last batch so shapes compile once."""
  images, _ = _check_images(images)
  n = images.shape[0]
  model, params = _model_of(params), jax.device_put(params)
  logits, feats = [], []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    lg, ft = _apply(params, chunk, model)
    logits.append(np.asarray(lg)[:batch_size - pad])
    feats.append(np.asarray(ft)[:batch_size - pad])
  return np.concatenate(logits), np.concatenate(feats)


def classifier_features(params, images, *, batch_size: int = 500) -> np.ndarray:
  """Penultimate-layer features of SmallCNN.

  Args:
    params: from `train_classifier` / `load_or_train`.
    images: f32[N, H, W, C] in [-1, 1], the shape the classifier was trained on.
    batch_size: images per jitted call.

  Returns:
    f32[N, FEATURES] (non-negative: they follow a ReLU).
  """
  return _batched_apply(params, images, batch_size)[1]


def predict(params, images, *, batch_size: int = 500) -> np.ndarray:
  """Predicted classes i32[N] of SmallCNN for images f32[N, H, W, C] in [-1, 1]."""
  return np.argmax(_batched_apply(params, images, batch_size)[0], axis=-1).astype(np.int32)


def accuracy(params, images, labels, *, batch_size: int = 500) -> float:
  """Top-1 accuracy of SmallCNN on (images f32[N, H, W, C] in [-1, 1], labels i32[N]), in [0, 1]."""
  images, labels = _check_images(images, labels)
  logits, _ = _batched_apply(params, images, batch_size)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _cache_key(images: np.ndarray, labels: np.ndarray, hyper: dict[str, Any]) -> str:
  h = hashlib.sha256(json.dumps(dict(hyper, arch=_ARCH), sort_keys=True).encode())
  h.update(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(labels).tobytes())
  return h.hexdigest()


def load_or_train(cache_path: str | os.PathLike, images, labels, *, seed: int = 0,
                  num_steps: int = NUM_STEPS, batch_size: int = BATCH_SIZE, save: bool = True,
                  **train_kwargs) -> tuple[Any, dict[str, Any]]:
  """The classifier cached in the file `cache_path`, trained by `train_classifier` if missing.

  The cache is keyed by a hash of the training images, labels, hyper-parameters and architecture: a cache
  written for other data or settings is retrained and overwritten, never silently reused; an unreadable one
  (truncated, garbage) is logged as a warning, retrained and overwritten. The file is
  written whole (temporary file + rename), through epath (local or `gs://`). Training is deterministic, so
  on multi-host jobs every process may call it and one of them (`save`) writes the cache.

  Args:
    cache_path: the cache file, e.g. `Workdir.classifier_cache` (its folder is created if missing).
    images: f32[N, H, W, C] in [-1, 1], the training split.
    labels: i32[N].
    seed, num_steps, batch_size, **train_kwargs: passed to `train_classifier`.
    save: write the cache after training (False on all but one process of a multi-host job).

  Returns:
    (params, meta) as from `train_classifier`; meta['cached'] tells whether it was loaded.
  """
  images, labels = _check_images(images, labels)
  hyper = dict(seed=seed, num_steps=num_steps, batch_size=batch_size, **train_kwargs)
  # The key holds every hyper-parameter, defaults included, so changing a default invalidates old caches.
  bound = inspect.signature(train_classifier).bind(images, labels, **hyper)
  bound.apply_defaults()
  full = {k: list(v) if isinstance(v, tuple) else v
          for k, v in bound.arguments.items() if k not in ("images", "labels")}
  key = _cache_key(images, labels, full)
  path = epath.Path(cache_path)
  cached = _read_cache(path)
  if cached is not None and cached[1].get("cache_key") == key:
    return cached[0], dict(cached[1], cached=True)
  params, meta = train_classifier(images, labels, **hyper)
  meta["cache_key"] = key
  if save:
    files_lib.write_bytes(path, serialization.msgpack_serialize(
        {"params": serialization.to_state_dict(params), "meta": json.dumps(meta)}))
  return params, dict(meta, cached=False)


def _read_cache(path: epath.Path) -> tuple[Any, dict[str, Any]] | None:
  """(params, meta) stored in the cache file `path`, or None if there is none or it cannot be read."""
  if not path.exists():
    return None
  # Any failure to read it (msgpack, JSON, the layout) means the same: the cache is disposable and training
  # rebuilds it deterministically, so the classifier is retrained rather than the evaluation stopped.
  try:
    blob = serialization.msgpack_restore(path.read_bytes())
    params, meta = blob["params"], json.loads(blob["meta"])
    if not isinstance(params, dict) or not isinstance(meta, dict):
      raise TypeError(f"params are a {type(params).__name__}, meta a {type(meta).__name__}")
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Classifier cache %s cannot be read (%s: %s); retraining the classifier to rebuild it.",
                    path, type(e).__name__, e)
    return None
  return params, meta


def labelled_split(data_config: Any, split: str, *, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """All examples of `split` with their labels, through the project's own eval pipeline.

  Reads with `process_count=1`, so every host gets the whole split (the classifier is trained and
  evaluated identically everywhere).

  Args:
    data_config: the `config.data` section (a TFDS source with a 'label' feature, e.g. MNIST-5k).
    split: split name, e.g. `data_config.train_split` or `data_config.eval_split`.
    batch_size: examples per pipeline batch (padding is dropped).

  Returns:
    (images f32[N, S, S, C] in [-1, 1], labels i32[N]).
  """
  from vqddm_jax import data  # Lazily: importing the data package imports TensorFlow.
  images, labels = [], []
  for batch in data.eval_batches(data_config, split=split, global_batch_size=batch_size, num_shards=1,
                                 with_labels=True, process_index=0, process_count=1):
    mask = batch["mask"].reshape(-1)
    images.append(batch["image"].reshape((-1,) + batch["image"].shape[2:])[mask])
    labels.append(batch["label"].reshape(-1)[mask])
  return np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int32)
