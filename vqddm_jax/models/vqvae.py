"""Stage 1: a VQGAN-style VQ-VAE in linen (docs/method.md §2).

Encoder: conv_in, per level `num_res_blocks` ResNet blocks (+ self-attention at the listed resolutions) and a
stride-2 downsampling (pad (0,1), 3×3 VALID) except at the last level, a middle block (res, attn, res), then
GroupNorm, swish, conv to `z_channels`; a 1×1 `quant_conv` maps to the code dimension d. The decoder mirrors
it with `num_res_blocks + 1` blocks per level and nearest ×2 upsampling followed by a 3×3 conv. The codebook
`f32[K, d]` is the parameter `codebook`; quantisation is the pure functions of `quantizer.py`.

Parameter tree (top level): `encoder`, `quant_conv`, `codebook`, `post_quant_conv`, `decoder` — ReFiT freezes
the first two by name.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqddm_jax.models import quantizer
from vqddm_jax.models.conv import Conv

Dtype = Any


class ResnetBlock(nn.Module):
  """GroupNorm → swish → conv3×3, twice, with a 1×1 shortcut when the width changes."""
  out_ch: int
  groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
    h = Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv1")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = Conv(self.out_ch, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual connection."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, hh, ww, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    w = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    return x + nn.Dense(c, dtype=self.dtype, name="proj_out")(h)


class _Tower(nn.Module):
  """What the encoder and the decoder share: their sizes, the ResnetBlock/AttnBlock/ResnetBlock middle and
  the GroupNorm-swish-conv head (`channels` out)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  channels: int
  groups: int = 32
  dropout: float = 0.0
  attn_at_resolution: int = 0
  dtype: Dtype = jnp.float32

  def _block(self, features: int) -> nn.Module:
    return ResnetBlock(features, self.groups, self.dropout, self.dtype)

  def _attends(self, h: jnp.ndarray, nominal: int) -> bool:
    """Whether a level gets attention: its map size is in `attn_resolutions`, the actual size or, with
    `attn_at_resolution`, the size `nominal` it has for inputs of that many pixels (taming's rule)."""
    return (nominal if self.attn_at_resolution else h.shape[1]) in self.attn_resolutions

  def _middle(self, h: jnp.ndarray, train: bool) -> jnp.ndarray:
    h = self._block(h.shape[-1])(h, train=train)
    h = AttnBlock(self.groups, self.dtype)(h)
    return self._block(h.shape[-1])(h, train=train)

  def _head(self, h: jnp.ndarray) -> jnp.ndarray:
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
    return Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_out")(h)


class Encoder(_Tower):
  """Images `f32[B, H, W, C]` → features `f32[B, H/f, W/f, channels]`, f = 2**(len(ch_mult) - 1)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    h = Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = self._block(self.ch * mult)(h, train=train)
        if self._attends(h, self.attn_at_resolution >> level):
          h = AttnBlock(self.groups, self.dtype)(h)
      if level != len(self.ch_mult) - 1:
        # Asymmetric (0, 1) padding then a VALID stride-2 conv, as in the authors' VQGAN.
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = Conv(h.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype)(h)
    return self._head(self._middle(h, train))


class Decoder(_Tower):
  """Features `f32[B, h, w, z_channels]` → images `f32[B, h*f, w*f, channels]` (not clipped)."""

  @nn.compact
  def __call__(self, z: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    h = Conv(self.ch * self.ch_mult[-1], (3, 3), dtype=self.dtype, name="conv_in")(z)
    h = self._middle(h, train)
    last = len(self.ch_mult) - 1
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = self._block(self.ch * self.ch_mult[level])(h, train=train)
        # taming's decoder counts up from the deepest size, (N // 2**last) * 2**(last - level).
        if self._attends(h, (self.attn_at_resolution >> last) << (last - level)):
          h = AttnBlock(self.groups, self.dtype)(h)
      if level != 0:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, hh * 2, ww * 2, c), method="nearest")
        h = Conv(c, (3, 3), dtype=self.dtype)(h)
    return self._head(h)


def _codebook_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jnp.ndarray:
  # Uniform(-1/K, 1/K), as taming-transformers initialises its embedding.
  return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


class VQVAE(nn.Module):
  """The whole stage-1 model; see the module docstring for the parameter layout.

  `attn_at_resolution`: 0 places attention at the levels whose actual feature-map size (height) is in
  `attn_resolutions`; N > 0 at the levels whose size would be in it for N×N inputs, whatever the input size
  (taming-transformers' rule with its `resolution` = N: a tokenizer trained at 256 px keeps its attention
  levels on 384 px images). Both agree on N×N inputs.
  """
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  z_channels: int
  embed_dim: int
  codebook_size: int
  out_channels: int
  groups: int = 32
  dropout: float = 0.0
  attn_at_resolution: int = 0
  dtype: Dtype = jnp.float32

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), groups=self.groups,
                  dropout=self.dropout, attn_at_resolution=self.attn_at_resolution, dtype=self.dtype)
    self.encoder = Encoder(channels=self.z_channels, **common)
    self.quant_conv = Conv(self.embed_dim, (1, 1), dtype=self.dtype)
    self.codebook = self.param("codebook", _codebook_init, (self.codebook_size, self.embed_dim))
    self.post_quant_conv = Conv(self.z_channels, (1, 1), dtype=self.dtype)
    self.decoder = Decoder(channels=self.out_channels, **common)

  def encode(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Pre-quantisation features (after quant_conv): `f32[B, h, w, d]` for `x: f32[B, H, W, C]` in [-1, 1]."""
    return self.quant_conv(self.encoder(x, train=train)).astype(jnp.float32)

  def decode(self, z_q: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Images `f32[B, H, W, C]` (unclipped) from quantised features `z_q: f32[B, h, w, d]`."""
    return self.decoder(self.post_quant_conv(z_q), train=train).astype(jnp.float32)

  def encode_to_indices(self, x: jnp.ndarray) -> jnp.ndarray:
    """Code maps `i32[B, h, w]` for images `x: f32[B, H, W, C]` in [-1, 1]."""
    return quantizer.nearest_code(self.encode(x), self.codebook)

  def decode_indices(self, codes: jnp.ndarray) -> jnp.ndarray:
    """Images `f32[B, H, W, C]` clipped to [-1, 1] for code maps `codes: i32[B, h, w]`."""
    return jnp.clip(self.decode(quantizer.lookup(codes, self.codebook)), -1.0, 1.0)

  def __call__(self, x: jnp.ndarray, train: bool = False
               ) -> tuple[jnp.ndarray, quantizer.Quantized]:
    """Reconstruction `f32[B, H, W, C]` (unclipped) and the quantiser's outputs."""
    q = quantizer.quantize(self.encode(x, train), self.codebook)
    return self.decode(q.z_q, train), q


def build_vqvae(section: Any, channels: int, codebook_size: int | None = None) -> VQVAE:
  """The VQVAE of the `config.vqvae` section, whose keys are its attributes, for images with `channels`
  channels; `codebook_size` overrides the section's K (ReFiT). The dtype is named ("bfloat16")."""
  fields = {**section, "dtype": getattr(jnp, section["dtype"])}
  fields["codebook_size"] = codebook_size or fields["codebook_size"]
  return VQVAE(**fields, out_channels=channels)

