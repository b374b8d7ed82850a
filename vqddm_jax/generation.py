"""Generating with a trained pipeline: sampling and inpainting code maps on every local device, and decoding.

The sample, inpaint and evaluate stages share these. Chains run in chunks of reverse steps (one compiled
program per chunk length, the state kept on the devices between chunks, a progress line per chunk); each
device draws from `fold_in(key, global device index)`, so the same seed gives the same samples.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqddm_jax import checkpointing, data, diffusion, masks, parallel, restore
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax import workdir as workdir_lib
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import ConfigError
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Generator:
  """Both trained stages, restored read-only, and what sampling needs to know about the code maps."""
  prior: restore.Restored
  tokenizer: restore.Restored
  sched: diffusion.Schedule
  heldout_codes: np.ndarray  # i32[N, h, w]: the held-out code maps, in stored order
  parametrization: str
  temperature: float = 1.0  # τ of the x̂_0 logits while sampling and inpainting (`diffusion.tempered`)
  models: dict | None = None  # `current_record` when restored: what outputs made with it record
  ar: restore.Restored | None = None  # the autoregressive prior, when enabled (`ar_generation`)
  ar_models: dict | None = None  # `ar_record` when restored: what the AR prior's outputs record
  ar_sampling: dict | None = None  # config.ar_sample: temperature, top_k, top_p, candidates
  heldout_labels: np.ndarray | None = None  # i32[N]: the held-out maps' class labels (conditional prior)
  guidance_scale: float = 1.0  # s of classifier-free guidance (`prior_lib.guided_logits_fn`)

  @property
  def code_shape(self) -> tuple[int, int]:
    return tuple(self.heldout_codes.shape[1:])

  @property
  def num_labels(self) -> int:
    """C, the classes of a conditional prior (0: unconditional); label C is the null label."""
    return self.prior.model.num_labels

  def sampling_logits_fn(self, params: Any, labels: jax.Array | None = None,
                         guidance_scale: float | None = None) -> Callable:
    """`(z_t, t) -> f32[B, h, w, K]`: the logits of x̂_0 that sampling and inpainting draw from (tempered).

    A conditional prior given `labels: i32[B]` is guided at `guidance_scale` (default: the generator's); without
    labels it draws from the null label (its unconditional model)."""
    if labels is None:
      fn = prior_lib.logits_fn(self.prior.model, params, self.parametrization)
    else:
      scale = self.guidance_scale if guidance_scale is None else guidance_scale
      fn = prior_lib.guided_logits_fn(self.prior.model, params, self.parametrization, labels, float(scale))
    return diffusion.tempered(fn, self.temperature)


def load_generator(config: Any, workdir: Workdir) -> Generator:
  """Restores the prior and the final tokenizer for the code maps in this host's store.

  Raises:
    MissingInputError: no code maps or no checkpoint yet (the message names the mode that makes it).
  """
  store = workdir.code_store
  num_classes = int(codes_lib.require_meta(store)["codebook_size"])
  heldout, labels = codes_lib.load_labelled_codes(store, config.data.eval_split, config.prior.num_classes)
  prior = restore.restore_prior(config, workdir, num_classes, tuple(heldout.shape[1:]))
  tokenizer = restore.restore_tokenizer(config, workdir)
  ar = (restore.restore_ar(config, workdir, num_classes, tuple(heldout.shape[1:]))
        if config.ar_train.enabled else None)
  return Generator(prior, tokenizer, prior_lib.build_schedule(config, num_classes), heldout,
                   config.diffusion.parametrization, float(config.sample.temperature),
                   current_record(config, workdir), ar, ar_record(config, workdir),
                   config.ar_sample.to_dict() if ar is not None else None, labels,
                   float(config.sample.guidance_scale))


def current_record(config: Any, workdir: Workdir) -> dict | None:
  """Which checkpoints (and sampling temperature) an output made now is made from: what `load_generator`
  restores (cheap; stored next to outputs, compared on reruns), or None while a checkpoint is missing."""
  stage, _ = restore.tokenizer_stage(config)
  prior_step = checkpointing.latest_step(workdir.prior.checkpoints)
  tokenizer_step = checkpointing.latest_step(workdir.train(stage).checkpoints)
  if prior_step is None or tokenizer_step is None:
    return None
  record = {"prior_step": prior_step, "tokenizer": stage, "tokenizer_step": tokenizer_step,
            "temperature": float(config.sample.temperature)}
  if config.prior.num_classes:  # Only then: an unconditional run's records stay as they were.
    record.update(guidance_scale=float(config.sample.guidance_scale),
                  class_labels=list(config.sample.class_labels))
  return record


def ar_record(config: Any, workdir: Workdir) -> dict | None:
  """What an output of the AR prior made now is made from (its checkpoint, the tokenizer's, the sampling
  filter), or None while the AR prior is disabled or a checkpoint is missing. Apart from `current_record`:
  training one prior further never redoes the other's outputs."""
  if not config.ar_train.enabled:
    return None
  stage, _ = restore.tokenizer_stage(config)
  ar_step = checkpointing.latest_step(workdir.ar.checkpoints)
  tokenizer_step = checkpointing.latest_step(workdir.train(stage).checkpoints)
  if ar_step is None or tokenizer_step is None:
    return None
  a = config.ar_sample
  return {"ar_step": ar_step, "tokenizer": stage, "tokenizer_step": tokenizer_step,
          "temperature": float(a.temperature), "top_k": int(a.top_k), "top_p": float(a.top_p)}


def device_key(key: jax.Array) -> jax.Array:
  """Inside pmap: this device's key, fold_in(key, global device index)."""
  return jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS))


def device_indices() -> jnp.ndarray:
  """Global indices of this host's devices (what `lax.axis_index` gives inside pmap)."""
  n = parallel.local_device_count()
  return jnp.arange(n) + parallel.process_index() * n


def run_chunks(p_chunk: Callable, z: Any, ts: np.ndarray, chunk: int, what: str) -> Any:
  """Runs `z = p_chunk(z, ts[i : i + chunk + 1])` over the descending steps `ts`, logging progress."""
  t0 = time.perf_counter()
  steps_total = len(ts) - 1
  for start in range(0, steps_total, chunk):
    z = p_chunk(z, jnp.asarray(ts[start:start + chunk + 1]))
    done = min(start + chunk, steps_total)
    z.block_until_ready()
    elapsed = time.perf_counter() - t0
    logging.info("%s: %d/%d reverse steps (t = %d), %.1fs, ETA %.0fs", what, done, steps_total,
                 int(ts[done]), elapsed, elapsed / done * (steps_total - done))
  return z


_PROGRAMS: dict = {}  # {key: program} of one generator, `_PROGRAMS_OWNER`.
_PROGRAMS_OWNER: list = [None]


def program_for(gen: Generator, key: Any, make: Callable[[], Callable]) -> Callable:
  """The pmapped program `key` of `gen`, made once by `make()`. A new pmap of a new closure compiles again,
  so a function that builds its program per call recompiles on every call (each evaluation draw, each
  inpainting mask); this keeps the programs of the newest generator (only: they hold its model)."""
  if _PROGRAMS_OWNER[0] is not gen:
    _PROGRAMS.clear()
    _PROGRAMS_OWNER[0] = gen
  if key not in _PROGRAMS:
    _PROGRAMS[key] = make()
  return _PROGRAMS[key]


def reverse_program(gen: Generator, guidance_scale: float | None = None) -> Callable:
  """The pmapped reverse-chunk program `(rparams, z, key, ts_chunk, labels) -> z` of `gen`'s prior (one per
  generator and guidance scale: every `sample_code_maps` call reuses its compilation). `labels` (i32[per
  device] per device) are ignored by an unconditional prior; a conditional one is guided at
  `guidance_scale` (None: the generator's)."""
  sched = gen.sched
  # The scale in effect names the program, so None and the generator's own scale share one compilation.
  scale = float(gen.guidance_scale if guidance_scale is None else guidance_scale) if gen.num_labels else None

  def chunk_fn(params, z, key, ts_chunk, labels):
    logits_fn = gen.sampling_logits_fn(params, labels if gen.num_labels else None, scale)
    return diffusion.reverse_chunk(device_key(key), z, ts_chunk, logits_fn, sched)

  return program_for(gen, ("reverse", scale),
                     lambda: parallel.pmap(chunk_fn, in_axes=(0, 0, None, None, 0)))


def host_labels(gen: Generator, labels: np.ndarray | None, per_device: int) -> jax.Array:
  """This host's share of the chains' labels on its devices, `[local devices, per_device]`.

  `labels: i32[n]` give the first n of the devices · per_device chains (all hosts' chains in device order); the
  chains after them (a last chunk's surplus, padding to the device count), or all when None, take the null
  label."""
  n = parallel.device_count() * per_device
  chains = np.full((n,), gen.num_labels, np.int32)
  if labels is not None:
    if len(labels) > n:
      raise ValueError(f"{len(labels)} labels for {n} chains")
    chains[:len(labels)] = labels
  return parallel.to_devices(parallel.shard(chains[parallel.host_slice(n)]))


def sample_code_maps(gen: Generator, rparams: Any, *, key: jax.Array, per_device: int,
                     num_sampling_steps: int | None, chunk: int, program: Callable | None = None,
                     labels: np.ndarray | None = None) -> np.ndarray:
  """Ancestral (or strided) sampling on every device of every host: `i32[devices * per_device, h, w]`
  (all hosts' chains, in device order, on every host).

  Args:
    gen: the restored stages.
    rparams: the prior's EMA parameters replicated on the local devices.
    key: the sampling key.
    per_device: chains per device.
    num_sampling_steps: None for all T reverse steps, S < T for a strided subset of S.
    chunk: reverse steps per compiled call.
    program: `reverse_program(gen)`, to reuse its compilation across calls; None builds a new one.
    labels: i32[n <= devices * per_device], the class of the first n chains (conditional prior, guided at the
      program's scale); the others, or all when None: the null label (no label for an unconditional prior).
  """
  sched = gen.sched
  labels_d = host_labels(gen, labels, per_device)
  ts = diffusion.sampling_timesteps(sched.num_steps, num_sampling_steps)
  p_chunk = program or reverse_program(gen)
  # z_T per device from fold_in(fold_in(key, global device index), 0), as `diffusion.sample` draws it.
  z = parallel.to_devices(np.asarray(jax.vmap(lambda d: diffusion.uniform_codes(
      jax.random.fold_in(jax.random.fold_in(key, d), 0), (per_device,) + tuple(gen.code_shape),
      sched.num_classes))(device_indices())))
  z = run_chunks(lambda z, ts_chunk: p_chunk(rparams, z, key, ts_chunk, labels_d), z, ts, chunk, "sampling")
  return parallel.gather_rows(parallel.unshard(z))


def sample_in_chunks(gen: Generator, rparams: Any, *, key: jax.Array, num: int, chunk_size: int,
                     num_sampling_steps: int | None, chunk_steps: int, labels: np.ndarray | None = None,
                     guidance_scale: float | None = None) -> Iterator[tuple[int, np.ndarray]]:
  """`num` code maps sampled `chunk_size` at a time (rounded up to a multiple of the global device count),
  so that evaluating 10k-50k samples never holds more than one chunk.

  Chunk c draws with `fold_in(key, c)`; every host takes part in every chunk and gets all of its maps.
  `labels: i32[num]` give each map's class (conditional prior, guided at `guidance_scale`, None: the
  generator's); None: the null label.

  Yields:
    (start, i32[n, h, w]): maps start .. start + n − 1 of the `num` (the last chunk's surplus is dropped:
    one chunk shape, one compiled program).
  """
  ndev = parallel.device_count()
  per_device = max(1, -(-min(chunk_size, num) // ndev))
  per_chunk = per_device * ndev
  program = reverse_program(gen, guidance_scale)  # One compilation for every chunk.
  for index, start in enumerate(range(0, num, per_chunk)):
    # The last chunk's surplus chains take the null label (`host_labels`) and are dropped.
    chunk_labels = None if labels is None else labels[start:start + per_chunk]
    codes = sample_code_maps(gen, rparams, key=jax.random.fold_in(key, index), per_device=per_device,
                             num_sampling_steps=num_sampling_steps, chunk=chunk_steps, program=program,
                             labels=chunk_labels)
    yield start, codes[:min(per_chunk, num - start)]


def inpaint_code_maps(gen: Generator, rparams: Any, *, key: jax.Array, mask: np.ndarray,
                      known: np.ndarray, num_sampling_steps: int | None, chunk: int,
                      labels: np.ndarray | None = None) -> np.ndarray:
  """Completes `known: i32[N, h, w]` outside `mask: bool[N, h, w]` (True = known) on every device of every
  host (each host takes its contiguous share; all hosts get all N completions, in order). A conditional
  prior completes map i as class `labels[i]` (i32[N]; guided at the generator's scale; None: null label).

  N must divide by the global device count. Known positions are kept exactly; see docs/method.md §3.7.
  """
  sched = gen.sched
  ts = diffusion.sampling_timesteps(sched.num_steps, num_sampling_steps)
  labels_d = host_labels(gen, labels, len(known) // parallel.device_count())
  mine = parallel.host_slice(len(known))  # equal shares: N divides by the device count
  mask, known = mask[mine], known[mine]
  mask_d, known_d = parallel.to_devices(parallel.shard(mask)), parallel.to_devices(parallel.shard(known))

  def chunk_fn(params, z, m, z0, key_ts, y):
    key, ts_chunk = key_ts
    logits_fn = gen.sampling_logits_fn(params, y if gen.num_labels else None)
    return diffusion.inpaint_chunk(device_key(key), z, ts_chunk, logits_fn, sched, m, z0)

  p_chunk = program_for(gen, "inpaint", lambda: parallel.pmap(chunk_fn, in_axes=(0, 0, 0, 0, None, 0)))
  z = parallel.to_devices(np.asarray(jax.vmap(
      lambda d, m, z0: diffusion.inpaint_init(jax.random.fold_in(key, d), m, z0, sched))(
          device_indices(), jnp.asarray(parallel.shard(mask)), jnp.asarray(parallel.shard(known)))))
  z = run_chunks(lambda z, ts_chunk: p_chunk(rparams, z, mask_d, known_d, (key, ts_chunk), labels_d), z, ts,
                 chunk, "inpainting")
  return parallel.gather_rows(parallel.unshard(z))


@functools.partial(jax.jit, static_argnames="model")
def _decode(params: Any, z: jax.Array, model: Any) -> jax.Array:
  # Module level with the model static: repeated calls (evaluation decodes chunk after chunk) reuse one
  # compilation per batch shape.
  return model.apply({"params": params}, z, method=type(model).decode_indices)


def decode_codes(tokenizer: restore.Restored, codes: np.ndarray, batch_size: int) -> np.ndarray:
  """Images `f32[N, H, W, C]` in [-1, 1] for code maps `i32[N, h, w]`, in host batches."""
  return np.concatenate([np.asarray(_decode(tokenizer.params, jnp.asarray(codes[i:i + batch_size]),
                                            tokenizer.model))
                         for i in range(0, len(codes), batch_size)])


def inpaint_heldout(config: Any, gen: Generator, num_images: int, *, mask_spec: str | None = None,
                    complete: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, dict]] | None = None
                    ) -> dict[str, np.ndarray]:
  """Inpaints the first held-out images of this host with the mask `mask_spec` (default `config.inpaint.mask`).

  Args:
    config: the run's config (`inpaint.mask`, `inpaint.seed`, `inpaint.steps`, `sample.chunk_steps`).
    gen: the restored stages.
    num_images: how many held-out images (rounded up to a multiple of the global device count).
    mask_spec: the mask (`masks.check_mask_spec`); None for `config.inpaint.mask`.
    complete: `(mask, known) -> (i32[N, h, w] completions, extra arrays)`; None for the diffusion prior's
      completion (`inpaint_code_maps` from `jax.random.key(inpaint.seed)`; a conditional prior completes each
      image as its own class, guided at `sample.guidance_scale`). The AR prior's protocols pass theirs
      (`ar_generation`).

  Returns:
    {'mask': bool[N,h,w] (True = known), 'known': i32[N,h,w], 'codes': i32[N,h,w] (completed),
     'images': f32[N,H,W,C] (decoded completions), 'originals': f32[N,H,W,C]} and the extra arrays.

  Raises:
    ConfigError: fewer held-out code maps than images asked for.
  """
  icfg = config.inpaint
  spec = icfg.mask if mask_spec is None else mask_spec
  ndev = parallel.device_count()
  num = -(-num_images // ndev) * ndev
  known = gen.heldout_codes[:num]
  if len(known) < num:
    raise ConfigError(f"config.inpaint.num_images = {num_images}: only {len(known)} held-out code maps")
  mask = masks.code_mask(spec, num, gen.code_shape, config.data.image_size, icfg.seed)
  if complete is None:
    labels = None if gen.heldout_labels is None else gen.heldout_labels[:num]
    completed, extra = inpaint_code_maps(
        gen, parallel.replicate(gen.prior.params), key=jax.random.key(icfg.seed), mask=mask, known=known,
        num_sampling_steps=icfg.steps or None, chunk=config.sample.chunk_steps, labels=labels), {}
  else:
    completed, extra = complete(mask, known)
  images = decode_codes(gen.tokenizer, completed, config.sample.decode_batch_size)
  originals = data.first_images(config.data, config.data.eval_split, num)
  return {"mask": mask, "known": known, "codes": completed, "images": images, "originals": originals, **extra}


def save_inpainting(files: workdir_lib.OutputFiles, result: dict[str, np.ndarray], image_size: int,
                    record: dict) -> None:
  """Writes a grid (rows: masked input / completion / original; up to 8 columns), the arrays and the record."""
  mask, originals = result["mask"], result["originals"]
  f = image_size // mask.shape[1]
  pixel_mask = np.repeat(np.repeat(mask, f, axis=1), f, axis=2)[..., None]
  masked = np.where(pixel_mask, originals, 0.0)
  n = min(len(mask), 8)
  rows = np.concatenate([masked[:n], result["images"][:n], originals[:n]])
  files_lib.write_png(files.png, images_lib.image_grid(rows, ncol=n))
  files_lib.write_npz(files.npz, **result)
  files_lib.write_json(files.record, record)
