"""The stage-2 denoiser: a U-Net over code maps (docs/method.md §3.4).

A port of the authors' `Unet` (VQ-DDM `DDM/model/unet.py`, itself the 2021 `denoising-diffusion-pytorch`
U-Net with an embedding input), in NHWC:

  z_t i32[B,h,w] -> Embed(K, ch) -> per level l (width ch*ch_mult[l]):
      num_res_blocks ResnetBlocks, Residual(ReZero(LinearAttention)), stride-2 3x3 conv (not at the deepest)
  -> middle: ResnetBlock, Residual(ReZero(LinearAttention)), ResnetBlock
  -> up path over levels L-1..1: concat skip, num_res_blocks ResnetBlocks, attention, 4x4 stride-2
     transposed conv
  -> head: Block(-> ch), 1x1 conv to K logits f32[B,h,w,K].

Two details of the original that the short description "the up path mirrors the down path" hides, kept here
because they are what gives the authors' 117.4 M parameters (K 512, ch 128, ch_mult (1,2,4,8)):
- the up path has len(ch_mult) - 1 levels, each of which upsamples; the skip of level 0 (full resolution,
  width ch*ch_mult[0]) is never concatenated (a mirrored 4-level up path would count 118.3 M);
- the first up block of level l takes 2 * width(l) channels (the deepest output and the level-l skip) and
  outputs width(l - 1).

Time index: t = 1..T, passed to the network as a float as is (times `time_scale`; the authors rescale t to
t * 4000 / T, i.e. `time_scale = 4000 / T`, which is 1 for their T = 4000 configs).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.models.conv import Conv, ConvTranspose

Dtype = Any

# PyTorch's GroupNorm default, which the authors' network uses (flax defaults to 1e-6).
_GN_EPS = 1e-5


def mish(x: jax.Array) -> jax.Array:
  """Mish activation x * tanh(softplus(x)), elementwise, same shape and dtype as x.

  Computed as x * n / (n + 2) with n = e^x (e^x + 2), which is the same function (tanh(log(1 + e^x)) =
  ((1 + e^x)^2 - 1) / ((1 + e^x)^2 + 1)) with one exponential instead of an exponential, a log1p and a tanh:
  on XLA:CPU 1.5 ms against 4.4 ms forward + backward over 1 M floats, equal to float32 rounding (relative
  5e-7). e^x is clamped at x = 20, where n / (n + 2) is already 1 in float32 and bfloat16 (and its
  gradient 0), so nothing overflows.
  """
  e = jnp.exp(jnp.minimum(x, 20.0))
  n = e * (e + 2.0)
  return x * (n / (n + 2.0))


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Transformer-style sinusoidal embedding of the diffusion step.

  Args:
    t: f32[B] step values (t = 1..T, already multiplied by any time scale); integer input is cast to f32.
    dim: even embedding width, at least 4.

  Returns:
    f32[B, dim]: [sin(t * w_i), cos(t * w_i)] with w_i = 10000^(-i / (dim/2 - 1)), i = 0..dim/2-1.
  """
  if dim % 2 or dim < 4:
    raise ValueError(f"time embedding width must be even and >= 4, got {dim}")
  half = dim // 2
  # The frequency table is a math table: float64 NumPy, cast once.
  freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / (half - 1)))
  angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Block(nn.Module):
  """Conv3x3 -> GroupNorm -> Mish: `f[B,H,W,C] -> dtype[B,H,W,features]`."""
  features: int
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)
    x = nn.GroupNorm(num_groups=self.groups, epsilon=_GN_EPS, dtype=self.dtype, name="norm")(x)
    return mish(x)


class ResnetBlock(nn.Module):
  """Two Blocks with the time embedding added in between, plus a (1x1-conv when widths differ) residual.

  `x: f[B,H,W,C], temb: f[B,E] -> dtype[B,H,W,features]`.
  """
  features: int
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = Block(self.features, self.groups, self.dtype, name="block1")(x)
    h = h + nn.Dense(self.features, dtype=self.dtype, name="time_proj")(mish(temb))[:, None, None, :]
    h = Block(self.features, self.groups, self.dtype, name="block2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), dtype=self.dtype, name="res_conv")(x)
    return h + x


class LinearAttention(nn.Module):
  """Linear attention over the H*W positions, `f[B,H,W,C] -> dtype[B,H,W,C]`.

  k is normalised by a softmax over positions and (with `softmax_q`) q by a softmax over its features, so the
  cost is O(H*W * dim_head^2) rather than O((H*W)^2). The authors' network leaves q unnormalised
  (`softmax_q=False`); normalising q bounds each output by the values (the later `denoising-diffusion-pytorch`
  form). Neither choice changes the parameter count.
  """
  heads: int = 4
  dim_head: int = 32
  softmax_q: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    hidden = self.heads * self.dim_head
    qkv = Conv(3 * hidden, (1, 1), use_bias=False, dtype=self.dtype, name="to_qkv")(x)
    # Channel order (qkv, heads, dim_head) as in the original's rearrange.
    qkv = qkv.reshape(b, hgt * wid, 3, self.heads, self.dim_head)
    q, k, v = (qkv[:, :, i] for i in range(3))  # each [B, N, heads, d]
    # Softmaxes in float32: under bf16 compute the sums over N positions lose digits otherwise.
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(self.dtype)
    if self.softmax_q:
      q = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(self.dtype)
    context = jnp.einsum("bnhd,bnhe->bhde", k, v)
    out = jnp.einsum("bhde,bnhd->bnhe", context, q).reshape(b, hgt, wid, hidden)
    return Conv(c, (1, 1), dtype=self.dtype, name="to_out")(out)


class ReZeroAttention(nn.Module):
  """Residual(ReZero(LinearAttention)): x + g * attn(x), with the scalar g initialised to 0.

  At initialisation the block is the identity, so attention is switched in gradually by training.
  `f[B,H,W,C] -> dtype[B,H,W,C]`.
  """
  softmax_q: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g = self.param("rezero_scale", nn.initializers.zeros_init(), (), jnp.float32)
    y = LinearAttention(softmax_q=self.softmax_q, dtype=self.dtype, name="attn")(x)
    return x + g.astype(self.dtype) * y


def _attention_flags(attention: Sequence[bool] | Sequence[int] | bool, levels: int) -> tuple[bool, ...]:
  """Normalises `attention` (one bool, a bool per level, or level indices) to a bool per level."""
  if isinstance(attention, (bool, np.bool_)):
    return (bool(attention),) * levels
  attention = tuple(attention)
  if attention and all(isinstance(a, (bool, np.bool_)) for a in attention):
    if len(attention) != levels:
      raise ValueError(f"attention has {len(attention)} flags for {levels} levels (ch_mult); give one per "
                       "level or a tuple of level indices")
    return tuple(bool(a) for a in attention)
  if not all(isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) and 0 <= a < levels
             for a in attention):
    raise ValueError(f"attention level indices must be integers in [0, {levels}), got {attention}")
  return tuple(i in attention for i in range(levels))


class UNet(nn.Module):
  """The denoiser: code map and step to K logits per position.

  Attributes:
    num_classes: K, the codebook size (embedding rows and output logits).
    ch: base width (the embedding and time-embedding width).
    ch_mult: width multiplier per level; level l has width ch * ch_mult[l] and resolution / 2**l.
    num_res_blocks: ResnetBlocks per level (the authors: 2).
    attention: which levels get a ReZero linear-attention block: True/False for all, one bool per level, or a
      tuple of level indices (the authors: every level). Up-path level l follows the flag of level l.
    mid_attention: attention between the two middle ResnetBlocks (the authors: yes).
    groups: GroupNorm groups; every width must be divisible by it.
    dropout: dropout rate after each down-path ResnetBlock but the last of its level (where the authors
      put it); active only with `train=True`, which then needs a 'dropout' rng.
    softmax_q: normalise q in the linear attention (see LinearAttention); False is the authors' network.
    time_scale: t is fed to the sinusoidal embedding as t * time_scale (authors: 4000 / T).
    num_labels: image classes C of a class-conditional prior (0: unconditional, no label input). A label
      embedding of C + 1 rows (row C is the null label of classifier-free guidance) is added to the time
      embedding after the time MLP, where the authors' `edit_unet.py` adds theirs.
    dtype: activation / compute dtype (e.g. jnp.bfloat16); parameters are always float32 and the returned
      logits float32.
  """
  num_classes: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 8)
  num_res_blocks: int = 2
  attention: Sequence[bool] | Sequence[int] | bool = True
  mid_attention: bool = True
  groups: int = 8
  dropout: float = 0.0
  softmax_q: bool = True
  time_scale: float = 1.0
  num_labels: int = 0
  dtype: Dtype = jnp.float32

  def _add_label(self, temb: jax.Array, labels: jax.Array | None) -> jax.Array:
    """temb + label embedding (f32[B, ch]) for a conditional network; temb unchanged for an unconditional one."""
    if self.num_labels == 0:
      if labels is not None:
        raise ValueError("labels were given to an unconditional network (num_labels = 0)")
      return temb
    if labels is None:
      labels = jnp.full((temb.shape[0],), self.num_labels, jnp.int32)
    labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (temb.shape[0],))
    # N(0, 1) rows, as the authors' torch.nn.Embedding.
    embed = nn.Embed(self.num_labels + 1, self.ch, embedding_init=nn.initializers.normal(1.0), dtype=self.dtype,
                     name="label_embed")
    return temb + embed(labels)

  def _check(self, z_t: jax.Array) -> None:
    if z_t.ndim != 3:
      raise ValueError(f"z_t must be i32[B, h, w] code indices, got shape {z_t.shape}")
    factor = 2 ** (len(self.ch_mult) - 1)
    if z_t.shape[1] % factor or z_t.shape[2] % factor:
      raise ValueError(f"code map size {z_t.shape[1]}x{z_t.shape[2]} is not divisible by "
                       f"2**(len(ch_mult) - 1) = {factor} (ch_mult={tuple(self.ch_mult)})")
    if self.num_res_blocks < 1:
      raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
    widths = [self.ch] + [self.ch * m for m in self.ch_mult]
    if any(w % self.groups for w in widths):
      raise ValueError(f"groups={self.groups} must divide every width {widths} (ch * ch_mult)")

  @nn.compact
  def __call__(self, z_t: jax.Array, t: jax.Array, labels: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Logits of the network for a batch of code maps.

    Args:
      z_t: i32[B, h, w] codes in 0..K-1; h and w divisible by 2**(len(ch_mult) - 1).
      t: i32 or f32[B] (or a scalar, broadcast) diffusion step, t = 1..T (the table index; not t - 1).
      labels: i32[B] class labels in 0..num_labels (num_labels = the null label) of a conditional network;
        None there means the null label. Must be None when num_labels is 0.
      train: enables dropout.

    Returns:
      f32[B, h, w, K] logits.

    Raises:
      ValueError: z_t is not 3-D, h or w is not divisible by 2**(len(ch_mult) - 1), `groups` does not divide
        every width, or `attention` / `num_res_blocks` is malformed (raised while tracing, e.g. at init).
    """
    self._check(z_t)
    levels = len(self.ch_mult)
    attn = _attention_flags(self.attention, levels)
    widths = [self.ch * m for m in self.ch_mult]
    kw = dict(groups=self.groups, dtype=self.dtype)

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z_t.shape[0],)) * self.time_scale
    temb = sinusoidal_embedding(t, self.ch).astype(self.dtype)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype, name="time_dense_0")(temb)
    temb = nn.Dense(self.ch, dtype=self.dtype, name="time_dense_1")(mish(temb))
    temb = self._add_label(temb, labels)

    # N(0, 1) rows as torch.nn.Embedding, so the first conv sees unit-scale inputs.
    x = nn.Embed(self.num_classes, self.ch, embedding_init=nn.initializers.normal(1.0),
                 dtype=self.dtype, name="embed")(z_t)

    skips = []
    for lvl, width in enumerate(widths):
      for j in range(self.num_res_blocks):
        x = ResnetBlock(width, name=f"down_{lvl}_res_{j}", **kw)(x, temb)
        if j < self.num_res_blocks - 1:
          x = nn.Dropout(self.dropout, deterministic=not train)(x)
      if attn[lvl]:
        x = ReZeroAttention(self.softmax_q, self.dtype, name=f"down_{lvl}_attn")(x)
      skips.append(x)
      if lvl < levels - 1:
        x = Conv(width, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                 name=f"down_{lvl}_downsample")(x)

    x = ResnetBlock(widths[-1], name="mid_res_0", **kw)(x, temb)
    if self.mid_attention:
      x = ReZeroAttention(self.softmax_q, self.dtype, name="mid_attn")(x)
    x = ResnetBlock(widths[-1], name="mid_res_1", **kw)(x, temb)

    # Levels L-1..1 only: the level-0 skip is unused, as in the authors' network (see the module docstring).
    for lvl in reversed(range(1, levels)):
      x = jnp.concatenate([x, skips[lvl]], axis=-1)
      for j in range(self.num_res_blocks):
        x = ResnetBlock(widths[lvl - 1], name=f"up_{lvl}_res_{j}", **kw)(x, temb)
      if attn[lvl]:
        x = ReZeroAttention(self.softmax_q, self.dtype, name=f"up_{lvl}_attn")(x)
      # Kernel 4, stride 2, padding 2 on the dilated input = PyTorch ConvTranspose2d(4, 2, padding=1):
      # exactly doubles H and W.
      x = ConvTranspose(widths[lvl - 1], (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                        dtype=self.dtype, name=f"up_{lvl}_upsample")(x)

    x = Block(self.ch, name="head_block", **kw)(x)
    x = Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head_out")(x)
    return x.astype(jnp.float32)


def param_shapes(model: UNet, height: int, width: int) -> Any:
  """The parameter tree of `model` for h x w code maps as `jax.ShapeDtypeStruct`s (no memory is allocated)."""
  z = jax.ShapeDtypeStruct((1, height, width), jnp.int32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda zz, tt: model.init(jax.random.PRNGKey(0), zz, tt), z, t)["params"]


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
