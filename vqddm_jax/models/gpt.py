"""The autoregressive (AR) prior: a causal transformer over raster-ordered code maps.

The layout follows the GPT of taming-transformers (the VQGAN paper's stage-2 model):

  inputs i32[B, n] -> token embedding (K + 1 rows: codes 0..K-1 and START = K) + learned position embedding
  -> dropout -> num_layers pre-LayerNorm blocks  x + attn(LN(x)),  x + mlp(LN(x))
  -> final LayerNorm -> Dense(K, no bias) -> logits f32[B, n, K].

Input 0 is START and input i is code i - 1 (raster order), so output i holds the logits of code i given the
codes before it (`autoregressive.shifted_inputs` builds the inputs from a code map).

Initialisation is taming's: Dense kernels and the token embedding ~ N(0, 0.02), biases 0, LayerNorm scale 1
and bias 0, and the position embedding 0 (it is a bare parameter there, which its weight init never touches).
LayerNorm epsilon is PyTorch's 1e-5 and GELU is the exact (erf) form, as in `torch.nn.GELU()`.

Decoding one position at a time (`decode=True`) keeps each layer's keys and values in the "cache" collection;
`init_cache(model, batch)` makes an empty cache, or equivalently
`model.init(key, jnp.zeros((batch, model.length), jnp.int32), decode=True)["cache"]`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_LN_EPS = 1e-5    # PyTorch's LayerNorm default (flax's is 1e-6).
_INIT = nn.initializers.normal(stddev=0.02)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention, `x: f[B, n, width] -> dtype[B, n, width]`.

  In decode mode the layer keeps `cached_key` and `cached_value`, dtype[B, L, heads, head_dim], in the
  "cache" collection; the n new positions are written at `cache_index` and attend to every cached position
  up to their own, so the result equals the full causal pass.
  """
  num_heads: int
  length: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool = False, cache_index: jax.Array | None = None) -> jax.Array:
    """Causal attention of n positions.

    Args:
      x: f[B, n, width].
      decode: keep keys and values in the cache (and create it when it is missing).
      cache_index: i32[], the absolute position of x[:, 0] in decode mode; None while `init` creates the
        cache (then the layer runs the plain causal pass and leaves the cache empty).

    Returns:
      dtype[B, n, width].
    """
    b, n, width = x.shape
    head_dim = width // self.num_heads
    q, k, v = (nn.Dense(width, dtype=self.dtype, kernel_init=_INIT, name=name)(x)
               .reshape(b, n, self.num_heads, head_dim) for name in ("query", "key", "value"))
    offset = 0
    if decode:
      shape = (b, self.length, self.num_heads, head_dim)
      cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
      if cache_index is not None:
        cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k, cache_index, axis=1)
        cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v, cache_index, axis=1)
        k, v, offset = cached_k.value, cached_v.value, cache_index
    # Query i (absolute position offset + i) sees keys 0..offset + i: the cache's unwritten tail is masked.
    visible = jnp.arange(k.shape[1])[None, :] <= (offset + jnp.arange(n))[:, None]
    # Scores and softmax in float32: under bfloat16 compute the normalisation would lose digits.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=_INIT, name="out")(out)


class Block(nn.Module):
  """Pre-LayerNorm transformer block, `x: f32[B, n, width] -> f32[B, n, width]`.

  The residual stream stays float32; the branches compute in `dtype` and are added back (promoted).
  """
  num_heads: int
  length: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, decode: bool, cache_index: jax.Array | None, train: bool) -> jax.Array:
    width = x.shape[-1]
    h = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="ln_attn")(x)
    h = CausalSelfAttention(self.num_heads, self.length, self.dtype, name="attention")(
        h, decode=decode, cache_index=cache_index)
    # nn.Dropout returns its input unchanged when deterministic or at rate 0, and then needs no rng.
    x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="ln_mlp")(x)
    h = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, kernel_init=_INIT, name="fc")(h)
    h = nn.Dense(width, dtype=self.dtype, kernel_init=_INIT, name="proj")(nn.gelu(h, approximate=False))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class GPT(nn.Module):
  """Causal transformer over L raster positions and K codes; START is token K.

  Attributes:
    num_classes: K, the number of codes; the token embedding has K + 1 rows, the last being START.
    length: L = h * w, the number of raster positions (the block size).
    width: the model width; a multiple of `num_heads`.
    num_layers: the number of blocks.
    num_heads: attention heads per block.
    mlp_ratio: the MLP's hidden width is mlp_ratio * width.
    dropout: rate of the dropout on the embeddings and on both residual branches (train=True only).
    dtype: compute dtype; parameters are float32 and logits are returned in float32.
  """
  num_classes: int
  length: int
  width: int = 256
  num_layers: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, decode: bool = False, train: bool = False) -> jax.Array:
    """Logits of the next code at each input position.

    Args:
      tokens: i32[B, n], inputs at positions 0..n-1 (input 0 is START = K, input i is code i - 1), n <= L.
        With `decode=True`: the next n inputs (usually n = 1) after those already in the cache.
      decode: run on the cache in the "cache" collection (apply with `mutable=["cache"]`); each call appends
        n positions, and the cache's position index also selects the position embeddings. The caller must
        not append past L positions (inside jit this cannot be checked: writes past L are clamped).
      train: turn on dropout (needs the "dropout" rng when `dropout` > 0).

    Returns:
      f32[B, n, K]: output i holds the logits of the code at position (cache index +) i given the codes before.
    """
    if self.width % self.num_heads:
      raise ValueError(f"GPT width {self.width} is not a multiple of num_heads {self.num_heads}")
    b, n = tokens.shape
    if n > self.length:
      raise ValueError(f"GPT got {n} input positions, more than its length {self.length}")
    position_table = self.param("position_embedding", nn.initializers.zeros_init(), (self.length, self.width),
                                jnp.float32)
    cache_index = None
    if decode:
      creating = not self.has_variable("cache", "index")
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      # While `init` creates the cache it must stay empty (index 0), so that call runs the plain pass.
      if not creating:
        cache_index = index.value
        index.value = cache_index + n
    positions = jax.lax.dynamic_slice_in_dim(position_table, 0 if cache_index is None else cache_index, n)
    x = nn.Embed(self.num_classes + 1, self.width, embedding_init=_INIT, name="token_embedding")(tokens)
    x = nn.Dropout(self.dropout, deterministic=not train)(x + positions[None])
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.length, self.mlp_ratio, self.dropout, self.dtype, name=f"block_{i}")(
          x, decode=decode, cache_index=cache_index, train=train)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="ln_final")(x)
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=_INIT, name="head")(x)
    return logits.astype(jnp.float32)


def init_cache(model: GPT, batch: int) -> Any:
  """An empty decode cache for `batch` sequences: zeros, position index 0.

  The same pytree as `model.init(key, jnp.zeros((batch, model.length), jnp.int32), decode=True)["cache"]`,
  built from shapes alone (`jax.eval_shape`), so no parameters are initialised. Per block:
  `block_i/attention/cached_key` and `cached_value`, dtype[batch, L, heads, width // heads]; plus `index`, i32[].
  """
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, 1), jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])
