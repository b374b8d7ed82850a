"""A trained work directory from Python: sample, inpaint, encode and decode with its prior and tokenizer.

`vqddm_jax.load(workdir)` returns a `Pipeline`:

    pipe = vqddm_jax.load("runs/mnist")
    images = pipe.sample(16)                  # u8[16, H, W, C], as --mode=sample draws them
    codes = pipe.encode(images)               # i32[16, h, w]
    completed = pipe.inpaint(images, "left_half")

Images go in and come out as `uint8 [N, H, W, C]` (0..255, what a PNG holds) at the config's
`data.image_size` and `data.channels`; code maps are `int32 [N, h, w]`. The keyword arguments of `sample` and
`inpaint` override `config.sample.*` / `config.inpaint.*` for that call and are checked as those fields are.

Devices: `load` uses the devices JAX has and sets no XLA flags (in a Python session JAX may have started
already, and the device count can no longer change). Sampling, inpainting and encoding run on every local
device; decoding runs in host batches of `config.sample.decode_batch_size` as the stages decode. Each device
draws its chains from its own key, so the same seed gives the same samples as `--mode=sample` on the same
number of devices. On a CPU-only machine JAX makes one device unless `JAX_NUM_CPU_DEVICES=N` is set (or
`jax.config.update("jax_num_cpu_devices", N)` runs) before the first computation. One process: a multi-host
job samples with `--mode=sample`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from vqddm_jax import config_schema, generation, lineage, masks, parallel, run_config
from vqddm_jax import images as images_lib
from vqddm_jax.config_checks import set_field
from vqddm_jax.errors import ConfigError, MismatchError, UserError
from vqddm_jax.workdir import Workdir


def load(workdir: str | os.PathLike | Workdir, config: ml_collections.ConfigDict | None = None) -> Pipeline:
  """Restores the prior and the tokenizer of a trained work directory (see `Pipeline`).

  Args:
    workdir: the work directory of a run whose prior is trained (a path, a gs:// URI or a `Workdir`).
    config: None for the config the run stored (`W/config.json`); else a config that must agree with the
      stored one in every field that defines the run (`run_config.MAY_CHANGE` lists those that may differ).

  Raises:
    MissingInputError: no stored config (and none given), no code maps or no checkpoint yet.
    ConfigError: a config field that is not allowed.
    MismatchError: `config` differs from the stored one in a field that defines the run, or the chain
      tokenizer → code maps → prior is stale (e.g. stage 1 trained further after the prior; `lineage`).
    UserError: more than one JAX process.
  """
  wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
  if config is None:
    config = run_config.stored_config(wd)
  config = config_schema.validate_config(config)
  run_config.check_or_record(config, wd, code_version="", write=False)  # Compares only: writes nothing.
  if parallel.process_count() > 1:
    raise UserError(f"vqddm_jax.load runs in one process, not {parallel.process_count()}: on a multi-host "
                    "job use --mode=sample or --mode=inpaint")
  lineage.check(config, wd, "prior")
  return Pipeline(config, wd, generation.load_generator(config, wd))


class Pipeline:
  """The restored stages of one work directory, with the config that made them.

  Attributes:
    config: the run's validated config.
    workdir: the run's `Workdir`.
    generator: the restored prior and tokenizer (`generation.Generator`, at `config.sample.temperature`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: Workdir, generator: generation.Generator):
    self.config, self.workdir, self.generator = config, workdir, generator
    self._cache: dict[Any, Any] = {}  # Device copies of the parameters and compiled programs, made on use.

  def __repr__(self) -> str:
    return (f"Pipeline({self.workdir.root}: prior step {self.generator.prior.step}, "
            f"{self.generator.tokenizer.stage} step {self.generator.tokenizer.step}, images "
            f"{self.image_shape}, codes {self.code_shape} of K = {self.codebook_size}, "
            f"{parallel.local_device_count()} device(s))")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images the tokenizer encodes and decodes."""
    size = int(self.config.data.image_size)
    return size, size, int(self.config.data.channels)

  @property
  def code_shape(self) -> tuple[int, int]:
    """(h, w) of the code maps."""
    return self.generator.code_shape

  @property
  def codebook_size(self) -> int:
    """K: codes are 0 .. K − 1."""
    return int(self.generator.sched.num_classes)

  def sample_codes(self, n: int, *, seed: int | None = None, steps: int | None = None,
                   temperature: float | None = None, labels: Any = None,
                   guidance_scale: float | None = None) -> np.ndarray:
    """`n` code maps `i32[n, h, w]` sampled by the prior, drawn as `--mode=sample` draws them.

    Args:
      n: how many.
      seed: the sampling seed (default `config.sample.seed`).
      steps: reverse steps, 0 = all T, S < T = a strided subset (default `config.sample.steps`).
      temperature: τ dividing the logits of x̂_0 (default `config.sample.temperature`).
      labels: a class-conditional prior's class per sample (n ints in [0, C)); None: the null label.
      guidance_scale: s of classifier-free guidance (default `config.sample.guidance_scale`).

    Raises:
      ConfigError: a value that `config.sample` would not allow (the message names that field).
      MismatchError: labels for an unconditional prior, not n of them, or outside [0, C).
    """
    cfg = self._overridden({"sample.num_samples": n, "sample.seed": seed, "sample.steps": steps,
                            "sample.temperature": temperature, "sample.guidance_scale": guidance_scale}).sample
    gen = self._generator(cfg.temperature)
    per_device = -(-cfg.num_samples // parallel.device_count())
    codes = generation.sample_code_maps(
        gen, self._replicated("prior", gen.prior.params), key=jax.random.key(cfg.seed), per_device=per_device,
        num_sampling_steps=cfg.steps or None, chunk=cfg.chunk_steps,
        program=self._program(gen, float(cfg.guidance_scale)), labels=self._check_labels(labels, n))
    return codes[:cfg.num_samples]

  def sample(self, n: int, *, seed: int | None = None, steps: int | None = None,
             temperature: float | None = None, labels: Any = None,
             guidance_scale: float | None = None) -> np.ndarray:
    """`n` sampled images `u8[n, H, W, C]`: `decode(sample_codes(...))` (same arguments)."""
    return self.decode(self.sample_codes(n, seed=seed, steps=steps, temperature=temperature, labels=labels,
                                         guidance_scale=guidance_scale))

  def _check_labels(self, labels: Any, n: int) -> np.ndarray | None:
    """i32[n] class labels of a conditional prior, checked; None stays None (the null label)."""
    c = self.generator.num_labels
    if labels is None:
      return None
    labels = np.asarray(labels)
    if not c or labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() >= c)):
      raise MismatchError(f"labels must be {n} class labels in [0, {c}) for this class-conditional prior"
                          if c else "labels were given, but this prior is unconditional (prior.num_classes = 0)")
    return labels.astype(np.int32)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Code maps `i32[N, h, w]` of images `u8[N, H, W, C]`, on every local device.

    Raises:
      MismatchError: not uint8, or not the config's image shape.
    """
    x = images_lib.from_uint8(self._check_images(images, "encode"))
    ndev = parallel.local_device_count()
    # Batches of config.encode.batch_size (fewer for few images), padded to a multiple of the devices.
    per_batch = -(-min(int(self.config.encode.batch_size), len(x)) // ndev) * ndev
    model = self.generator.tokenizer.model
    encode = self._cached("encode", lambda: parallel.pmap(
        lambda p, batch: model.apply({"params": p}, batch, method=type(model).encode_to_indices)))
    rparams = self._replicated("tokenizer", self.generator.tokenizer.params)
    out = []
    for start in range(0, len(x), per_batch):
      batch = x[start:start + per_batch]
      padded = np.concatenate([batch, np.zeros((per_batch - len(batch),) + batch.shape[1:], batch.dtype)])
      codes = parallel.unshard(encode(rparams, parallel.to_devices(parallel.shard(padded))))
      out.append(codes[:len(batch)])
    return np.concatenate(out).astype(np.int32)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """Images `u8[N, H, W, C]` of code maps `i32[N, h, w]` (any integer dtype, values 0 .. K − 1).

    Raises:
      MismatchError: not integers, not the model's code-map shape, or a code outside 0 .. K − 1.
    """
    codes = self._check_codes(codes)
    return images_lib.to_uint8(generation.decode_codes(self.generator.tokenizer, codes,
                                                    int(self.config.sample.decode_batch_size)))

  def inpaint_codes(self, images: np.ndarray, mask: str | np.ndarray, *, seed: int | None = None,
                    steps: int | None = None,
                    temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Completes the code maps of `images` outside the known part of `mask` (docs/method.md §3.7).

    Args:
      images: `u8[N, H, W, C]`.
      mask: a mask spec as `config.inpaint.mask` takes (`left_half`, `top_half`, `center`, `random:0.3`, a
        PNG path), or `bool[H, W]` / `bool[N, H, W]` pixels, True = known (white in a mask PNG). A code is
        known only when every pixel of its patch is known.
      seed: the inpainting seed, also of `random:` masks (default `config.inpaint.seed`).
      steps: reverse steps, 0 = all T (default `config.inpaint.steps`).
      temperature: τ (default `config.sample.temperature`).

    Returns:
      (completed `i32[N, h, w]`, known `bool[N, h, w]`): at known positions the completed codes are the
      images' own codes (`encode(images)`).

    Raises:
      ConfigError: a bad mask spec or argument value; a mask that leaves no code known or none to inpaint.
      MismatchError: images or a mask array of the wrong shape or dtype.
    """
    cfg = self._overridden({"inpaint.mask": mask if isinstance(mask, str) else None, "inpaint.seed": seed,
                            "inpaint.steps": steps, "sample.temperature": temperature})
    known_codes = self.encode(images)
    n = len(known_codes)
    if isinstance(mask, str):
      known = masks.code_mask(cfg.inpaint.mask, n, self.code_shape, self.image_shape[0], cfg.inpaint.seed)
    else:
      known = self._code_mask(mask, n)
    # inpaint_code_maps splits the maps evenly over the devices: pad with fully known maps, then drop them.
    total = -(-n // parallel.device_count()) * parallel.device_count()
    pad = ((0, total - n), (0, 0), (0, 0))
    gen = self._generator(cfg.sample.temperature)
    completed = generation.inpaint_code_maps(
        gen, self._replicated("prior", gen.prior.params), key=jax.random.key(cfg.inpaint.seed),
        mask=np.pad(known, pad, constant_values=True), known=np.pad(known_codes, pad),
        num_sampling_steps=cfg.inpaint.steps or None, chunk=cfg.sample.chunk_steps)
    return completed[:n], known

  def inpaint(self, images: np.ndarray, mask: str | np.ndarray, *, seed: int | None = None,
              steps: int | None = None, temperature: float | None = None) -> np.ndarray:
    """Inpainted images `u8[N, H, W, C]`: `decode` of `inpaint_codes(...)[0]` (same arguments). The known
    part is the decoded codes of the input, not its pixels."""
    return self.decode(self.inpaint_codes(images, mask, seed=seed, steps=steps, temperature=temperature)[0])

  def _overridden(self, fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config with the dotted `fields` that are not None replaced, validated as a config file is."""
    tree = self.config.to_dict()
    for dotted, value in fields.items():
      if value is not None:
        set_field(tree, dotted, value.item() if isinstance(value, np.generic) else value)  # np.int64 seeds.
    return config_schema.validate_config(ml_collections.ConfigDict(tree))

  def _generator(self, temperature: float) -> generation.Generator:
    if float(temperature) == self.generator.temperature:
      return self.generator
    return dataclasses.replace(self.generator, temperature=float(temperature))

  def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def _replicated(self, name: str, params: Any) -> Any:
    return self._cached(("params", name), lambda: parallel.replicate(params))

  def _program(self, gen: generation.Generator, guidance_scale: float) -> Callable:
    """The reverse-chunk program at `gen`'s temperature and a guidance scale, compiled once per pair."""
    return self._cached(("reverse", gen.temperature, guidance_scale),
                        lambda: generation.reverse_program(gen, guidance_scale))

  def _check_images(self, images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    want = "[N, " + ", ".join(map(str, self.image_shape)) + "]"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_shape or not len(images):
      raise MismatchError(
          f"Pipeline.{what}: images must be uint8 {want} (pixels 0..255; the run's config.data.image_size = "
          f"{self.image_shape[0]}, channels = {self.image_shape[2]}), got {images.dtype} "
          f"{list(images.shape)}" + (" (vqddm_jax.images.to_uint8 converts images in [-1, 1])"
                                     if images.dtype.kind == "f" else ""))
    return images

  def _check_codes(self, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    want = "[N, " + ", ".join(map(str, self.code_shape)) + "]"
    if codes.dtype.kind not in "iu" or codes.ndim != 3 or codes.shape[1:] != self.code_shape or not len(codes):
      raise MismatchError(f"Pipeline.decode: code maps must be integers {want}, got {codes.dtype} "
                          f"{list(codes.shape)}")
    if codes.min() < 0 or codes.max() >= self.codebook_size:
      raise MismatchError(f"Pipeline.decode: codes must lie in 0 .. {self.codebook_size - 1} (K = "
                          f"{self.codebook_size}), got {codes.min()} .. {codes.max()}")
    return codes.astype(np.int32)

  def _code_mask(self, mask: np.ndarray, n: int) -> np.ndarray:
    """`bool[n, h, w]` of a pixel mask `bool[H, W]` or `bool[n, H, W]` (True = known), by the rule of
    `masks`: a code is known only when every pixel of its f×f patch is."""
    mask = np.asarray(mask)
    size = self.image_shape[0]
    if mask.dtype != bool or mask.shape not in ((size, size), (n, size, size)):
      raise MismatchError(f"Pipeline.inpaint: a mask array must be bool [{size}, {size}] or [{n}, {size}, "
                          f"{size}] (True = known pixel), got {mask.dtype} {list(mask.shape)}")
    h, w = self.code_shape
    f = size // h
    known = masks.pixels_to_codes(np.broadcast_to(mask, (n, size, size)), self.code_shape)
    per_map = known.reshape(n, -1)
    if per_map.all(axis=1).any() or not per_map.any(axis=1).all():
      raise ConfigError(f"Pipeline.inpaint: on the {h}×{w} code grid the mask leaves "
                        f"{'every' if per_map.all(axis=1).any() else 'no'} position known in some image (a "
                        f"code is known only when all {f}×{f} pixels of its patch are known); it must leave "
                        "some codes known and some to inpaint")
    return known
