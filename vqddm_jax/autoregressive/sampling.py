"""Sampling an autoregressive prior over code maps in raster order.

The samplers see the model only through a `Decoder` (a cache, one decoding step, and the teacher-forced
logits of a whole sequence), so any model with known conditionals can stand in for the GPT. Inputs follow the
GPT's convention: input 0 is START (index K) and input i is code i - 1, so output i predicts code i.

Position i of `sample` draws with the key fold_in(key, i), whatever the batch and the known codes. All
functions are pure and jit-able; the sampling options (temperature, top_k, top_p) are Python numbers,
compiled in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vqddm_jax.models import gpt


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What the samplers need of an AR model over L positions and K codes.

  Attributes:
    num_classes: K; the START input is index K.
    length: L, the number of raster positions.
    init_cache: `batch -> cache`, the state before position 0.
    step: `(cache, inputs: i32[B]) -> (logits f32[B, K], cache)`: feeds the next input (START first, then
      each code in turn) and returns the logits of the next code.
    logits: `inputs: i32[B, L] -> f32[B, L, K]`, the teacher-forced pass over START + the shifted codes.
  """
  num_classes: int
  length: int
  init_cache: Callable[[int], Any]
  step: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  logits: Callable[[jax.Array], jax.Array]


def gpt_decoder(model: gpt.GPT, params: Any) -> Decoder:
  """The `Decoder` of a linen `GPT` with the given parameters (no dropout).

  Under `jax.jit`, build the decoder inside the jitted function from parameters passed as an argument:
  closed-over concrete parameters would be compiled into the program as constants.
  """
  def step(cache, inputs):
    logits, variables = model.apply({"params": params, "cache": cache}, inputs[:, None], decode=True,
                                    mutable=["cache"])
    return logits[:, 0], variables["cache"]

  return Decoder(num_classes=model.num_classes, length=model.length,
                 init_cache=lambda batch: gpt.init_cache(model, batch), step=step,
                 logits=lambda inputs: model.apply({"params": params}, inputs))


def shifted_inputs(codes: jax.Array, start: int) -> jax.Array:
  """The teacher-forcing inputs of a code sequence: `[START, codes[:, :-1]]`.

  Args:
    codes: i32[B, L], codes in raster order.
    start: the START index (K).

  Returns:
    i32[B, L]: input 0 is `start`, input i is codes[:, i - 1].
  """
  codes = jnp.asarray(codes, jnp.int32)
  return jnp.concatenate([jnp.full((codes.shape[0], 1), start, jnp.int32), codes[:, :-1]], axis=1)


def log_probs(decoder: Decoder, codes: jax.Array) -> jax.Array:
  """Teacher-forced log p(code_i | codes_<i) under the model itself (no temperature, no filtering).

  Args:
    decoder: the model.
    codes: i32[B, L], codes in raster order.

  Returns:
    f32[B, L], the log-probability of each code given the codes before it.
  """
  codes = jnp.asarray(codes, jnp.int32)
  logits = decoder.logits(shifted_inputs(codes, decoder.num_classes)).astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_p, codes[..., None], axis=-1)[..., 0]


def _check_filter(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 keeps every code), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 keeps every code), got {top_p}")


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Tempered, top-k and nucleus (top-p) filtered logits; the codes filtered out get -inf.

  In order: the logits are divided by `temperature`; then only codes whose logit is at least the top_k-th
  largest are kept (0 keeps all; codes tied with the k-th value are all kept, so ties can keep more than
  k); then, under the softmax of what is left, the smallest set of most probable codes whose probability is at
  least `top_p` is kept (1.0 keeps all; the most probable code is always kept; codes tied with the least
  probable code of that set are kept too).

  Args:
    logits: f[..., K].
    temperature: τ > 0; τ < 1 sharpens, τ > 1 flattens.
    top_k: how many of the most likely codes to keep; 0 (or >= K) keeps every code.
    top_p: the probability mass of the nucleus, in (0, 1].

  Returns:
    f32[..., K], the filtered logits (not normalised).
  """
  _check_filter(temperature, top_k, top_p)
  x = jnp.asarray(logits, jnp.float32) / jnp.float32(temperature)
  num_classes = x.shape[-1]
  if 0 < top_k < num_classes:
    kth = jax.lax.top_k(x, int(top_k))[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if top_p < 1:
    ordered = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # A code is in the nucleus when the codes more probable than it hold less than top_p: this is the
    # smallest such prefix, and it always holds the most probable code (mass before it is 0 < top_p).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    size = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, size - 1, axis=-1)
    x = jnp.where(x >= cutoff, x, -jnp.inf)
  return x


def _check_known(decoder: Decoder, batch: int, known: Any, known_mask: Any) -> tuple[jax.Array, jax.Array]:
  """`known, known_mask` as i32[B, L], bool[B, L] arrays after checking that they come together and fit."""
  if (known is None) != (known_mask is None):
    raise ValueError("known and known_mask must be given together (or both None for plain sampling)")
  known, known_mask = jnp.asarray(known, jnp.int32), jnp.asarray(known_mask, bool)
  want = (batch, decoder.length)
  if known.shape != want or known_mask.shape != want:
    raise ValueError(f"known and known_mask must have shape (batch, L) = {want}, got {known.shape} and "
                     f"{known_mask.shape}")
  return known, known_mask


def sample(decoder: Decoder, key: jax.Array, batch: int, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, known: jax.Array | None = None,
           known_mask: jax.Array | None = None) -> jax.Array:
  """Ancestral sampling in raster order, one `lax.scan` over the L positions with the decoder's cache.

  Position i draws from `filter_logits` of the model's logits with the key fold_in(key, i). With `known`,
  the protocol is "prefix-forced": where known_mask[:, i] is True the code known[:, i] is written instead of
  the draw (and conditions every later position), the rest is sampled. That is the exact conditional only
  when the known codes are a raster prefix; for other masks see `reweight.inpaint_reweighted`.

  Args:
    decoder: the model.
    key: the sampling key.
    batch: B, the number of sequences.
    temperature, top_k, top_p: see `filter_logits`.
    known: i32[B, L] codes to force (values where the mask is False are ignored), or None.
    known_mask: bool[B, L], True where `known` is forced, or None (plain sampling).

  Returns:
    i32[B, L], codes in raster order.
  """
  _check_filter(temperature, top_k, top_p)
  if known is None and known_mask is None:   # Plain sampling: nothing forced, the where keeps every draw.
    known = jnp.zeros((batch, decoder.length), jnp.int32)
    known_mask = jnp.zeros((batch, decoder.length), bool)
  else:
    known, known_mask = _check_known(decoder, batch, known, known_mask)

  def body(carry, xs):
    cache, inputs = carry
    position, known_i, mask_i = xs
    logits, cache = decoder.step(cache, inputs)
    logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    drawn = jax.random.categorical(jax.random.fold_in(key, position), logits, axis=-1).astype(jnp.int32)
    code = jnp.where(mask_i, known_i, drawn)
    return (cache, code), code

  start = jnp.full((batch,), decoder.num_classes, jnp.int32)
  xs = (jnp.arange(decoder.length, dtype=jnp.int32), known.T, known_mask.T)
  _, codes = jax.lax.scan(body, (decoder.init_cache(batch), start), xs)
  return codes.T
