"""Drop-in replacements for `nn.Conv` / `nn.ConvTranspose` that avoid XLA:CPU's slow convolutions.

XLA:CPU runs some convolutions at about 1 GFLOP/s: k x k convs on small maps (a 3x3 conv on a 2x2x1024 map,
B 8, takes ~0.5-0.8 s forward and ~1-1.6 s with its gradient), and the kernel gradients of transposed
convs (at every size) and of 1x1 convs. The same convolutions written as matmuls run at matmul speed: im2col
(pad, k*k shifted slices concatenated on the channel axis, one matmul with the reshaped kernel) and, for a
transposed conv, one im2col conv per output phase on the undilated input (sub-pixel form). `Conv` and
`ConvTranspose` pick, at trace time, `lax.conv_general_dilated` / `lax.conv_transpose` (flax's call, bit for
bit) or the matmul form, by shape and backend: the rule and its measurements are in `use_im2col`.

Both modules keep flax's parameter names, shapes (`kernel` [*kernel_size, C_in, features], `bias`
[features]) and initialisers, so they create the same parameters from the same key as `nn.Conv` /
`nn.ConvTranspose` and load the same checkpoints.

Which path: the module attribute `impl` ('auto', 'xla' or 'im2col'), or when it is None the environment
variable VQDDM_CONV_IMPL (default 'auto'), read at trace time: a function already jitted keeps its path.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Padding = str | int | Sequence[int | tuple[int, int]]

IMPL_ENV = "VQDDM_CONV_IMPL"
IMPLS = ("auto", "xla", "im2col")

# Where im2col beats XLA:CPU for k x k > 1 kernels, as (largest H * W of the input, smallest
# sqrt(C_in * C_out), smallest stride) triples; see `use_im2col`.
_IM2COL_REGION = ((4, 0, 1), (16, 256, 1), (16, 0, 2), (64, 1024, 1))


def use_im2col(spatial: Sequence[int], in_features: int, out_features: int, kernel_size: Sequence[int],
               strides: Sequence[int] = (1, 1), *, transpose: bool = False,
               backend: str | None = None) -> bool:
  """Whether the matmul (im2col) form beats XLA's convolution for this shape on this backend.

  Measured on XLA:CPU (benchmarks/conv.py --sweep and its model tables: 2 shared cores, JAX 0.10.2, widths
  64..2048, B 8, 32 and 64, forward and forward + backward; ratio = XLA time / im2col time, noisy to ~1.5x):
  - k x k convs, stride 1: on maps of H * W <= 4 (2x2, 1x1) XLA is 3-190x slower at every width (2x2x1024
    B 8: ~0.8 s vs 21 ms forward, 1.6 s vs 49 ms with the gradient; B 64: 6.5 s vs 34 ms). On 4x4 maps
    it is a wash below width 256 (0.5-1.0x) and 1.1-10x from 256. On 8x8 maps it is 0.4-1.3x below
    width 1024 and 1.5-4x at 1024; from 16x16 within ~1.5x either way (XLA usually ahead forward).
  - k x k convs, stride 2: XLA's kernel gradient of a strided conv is slow on small maps: on 4x4 inputs
    3.7x (width 64) to 55x (1024) with the gradient; from 8x8 0.5-1.3x forward and 1.0-2x with it.
  - 1x1 convs: the same matmul either way forward (0.6-2x), but XLA's gradient is 1.2-7x slower from
    width 256 and a wash below, at every map size: always the matmul.
  - transposed convs (4x4 stride 2): the forward is a wash from 4x4 maps (0.6-1.7x) and 2-40x on smaller
    ones, but XLA's kernel gradient is 7-100x slower at every size (16x16x512 B 8: 75 s vs 0.8 s): always
    the sub-pixel im2col form.
  GPU and TPU convolutions are never replaced.

  Args:
    spatial: the input's spatial sizes (H, W).
    in_features: C_in.
    out_features: C_out.
    kernel_size: the kernel's spatial sizes.
    strides: the strides (of the forward conv; ignored for transposed convs).
    transpose: a transposed convolution.
    backend: the platform ('cpu', 'gpu', 'tpu'); default `jax.default_backend()`.

  Returns:
    True for the im2col form.
  """
  if (backend or jax.default_backend()) != "cpu":
    return False
  if transpose or math.prod(kernel_size) == 1:
    return True
  positions, width, stride = math.prod(spatial), math.sqrt(in_features * out_features), min(strides)
  return any(positions <= p and width >= w and stride >= s for p, w, s in _IM2COL_REGION)


def _resolve_impl(impl: str | None, x_shape, features: int, kernel_size, strides, transpose=False) -> bool:
  """True for im2col: `impl`, else $VQDDM_CONV_IMPL, else 'auto' (then the rule `use_im2col`)."""
  impl = impl or os.environ.get(IMPL_ENV, "auto")
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return use_im2col(x_shape[1:-1], x_shape[-1], features, kernel_size, strides, transpose=transpose)
  return impl == "im2col"


def _tuple(x: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
  if x is None:
    return (1,) * n
  return (x,) * n if isinstance(x, int) else tuple(x)


def _accumulate_type(dtype) -> Any:
  # XLA's convolutions accumulate half-precision products in float32; ask the matmul for the same.
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating) else None


def _live_taps(size: int, low: int, k: int, stride: int, out: int) -> range:
  """The range of kernel offsets along one dim, from the first to the last that reads an input element.

  Padded position p holds input element p - low; offset t reads p = t + m * stride for m < out. Offsets
  outside the range read only padding, and add zeros.
  """
  live = [t for t in range(k) if any(0 <= t + m * stride - low < size for m in range(out))] or [0]
  return range(live[0], live[-1] + 1)


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
  """A convolution as pad, shifted slices concatenated on the channel axis, and one matmul.

  Equals `lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC/HWIO/NHWC)`.

  Args:
    x: f[B, *S, C_in], channels last, any number of spatial dims.
    kernel: f[*K, C_in, C_out] (HWIO), the same dtype as x.
    strides: one stride per spatial dim.
    padding: explicit (low, high) pairs per spatial dim; negative values crop.
    precision: the matmul's `lax.Precision` (None: the default for the dtype).

  Returns:
    x.dtype[B, *O, C_out] with O = (S + low + high - K) // stride + 1.
  """
  ksize, cin, cout = kernel.shape[:-2], kernel.shape[-2], kernel.shape[-1]
  sizes = x.shape[1:-1]
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)])
  out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], ksize, strides)]
  if min(out) < 1:
    raise ValueError(f"empty convolution output {out} for input {x.shape} and kernel {kernel.shape}")
  # Taps that only ever read padding add zeros (e.g. 8 of the 9 on a 1x1 map): leave them out. A slice,
  # not a gather, of the kernel: its gradient is a pad, which XLA fuses with what it is added to.
  keep = [_live_taps(n, lo, k, s, m) for n, (lo, _), k, s, m in zip(sizes, padding, ksize, strides, out)]
  for axis, taps in enumerate(keep):
    if len(taps) < ksize[axis]:
      kernel = lax.slice_in_dim(kernel, taps[0], taps[-1] + 1, axis=axis)
  # Offsets in row-major order of the kernel's spatial axes, channels minor: the order of kernel.reshape.
  cols = []
  for offs in itertools.product(*keep):
    limit = [o + (m - 1) * s + 1 for o, m, s in zip(offs, out, strides)]
    cols.append(lax.slice(x, (0, *offs, 0), (x.shape[0], *limit, cin), (1, *strides, 1)))
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # [B, *O, taps * C_in]
  # One 2-D matmul over all positions: a dot_general with the batch and spatial dims left in the operands
  # lowers on XLA:CPU to layout copies around it, and its kernel gradient ran about 2x slower (the 8x8
  # attention projections of the MNIST-size denoiser: 16 ms against 9 ms forward + backward).
  flat = patches.reshape(-1, patches.shape[-1])
  y = lax.dot_general(flat, kernel.reshape(-1, cout), (((1,), (0,)), ((), ())), precision=precision,
                      preferred_element_type=_accumulate_type(x.dtype))
  y = y.reshape(patches.shape[:-1] + (cout,))
  return y.astype(x.dtype)


def transpose_padding(kernel_size: Sequence[int], strides: Sequence[int],
                      padding: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """Explicit (low, high) padding of the dilated input that `lax.conv_transpose` uses for `padding`.

  Explicit pairs are used as given; 'SAME' gives an output of S * stride, 'VALID' of (S - 1) * stride +
  max(K, stride) (Keras' Conv2DTranspose conventions, which `lax.conv_transpose` follows).
  """
  if not isinstance(padding, str):
    return [tuple(p) for p in padding]
  pads = []
  for k, s in zip(kernel_size, strides):
    if padding == "SAME":
      total = k + s - 2
      low = k - 1 if s > k - 1 else -(-total // 2)
    elif padding == "VALID":
      total = k + s - 2 + max(k - s, 0)
      low = k - 1
    else:
      raise ValueError(f"unsupported transposed-conv padding {padding!r}")
    pads.append((low, total - low))
  return pads


def _phase_taps(size: int, k: int, s: int, low: int, high: int) -> tuple[list, int, int]:
  """One spatial dim of a transposed conv split into s output phases (the sub-pixel form).

  Output o = s * m + r of the dilated-and-padded convolution reads kernel tap j at dilated position
  o + j - low, which holds input i = (o + j - low) / s when that is an integer: so phase r reads input
  i = m + d with tap j = s * d + low - r, for the offsets d that put j in [0, k).

  Returns:
    ([(first offset d0, taps j as a list) per phase r], M = outputs per phase, L_out).
  """
  out = (size - 1) * s + 1 + low + high - k + 1
  phases = []
  for r in range(s):
    d0 = -((low - r) // s)  # smallest d with s * d + low - r >= 0
    phases.append((d0, list(range(s * d0 + low - r, k, s))))
  return phases, -(-out // s), out


def im2col_conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                          padding: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
  """A 2-D transposed convolution as sy * sx im2col convolutions of the undilated input (sub-pixel form).

  Equals `lax.conv_transpose(x, kernel, strides, padding)` (NHWC / HWIO, `transpose_kernel=False`), i.e. a
  stride-1 convolution of the input dilated by `strides` and padded by `padding`, without multiplying the
  inserted zeros: output phase (ry, rx) (positions = r mod stride) is a stride-1 convolution of x with the
  taps of the kernel that land on input elements (2x2 of the 4x4 kernel for stride 2); the phases are then
  interleaved.

  Args:
    x: f[B, H, W, C_in].
    kernel: f[K_y, K_x, C_in, C_out], the same dtype as x.
    strides: (sy, sx).
    padding: explicit (low, high) pairs of the dilated input (see `transpose_padding`).
    precision: the matmuls' `lax.Precision`.

  Returns:
    x.dtype[B, H_out, W_out, C_out], H_out = (H - 1) * sy + 1 + low + high - K_y + 1 (likewise W_out).
  """
  b, h, w, _ = x.shape
  (phy, my, hout), (phx, mx, wout) = (_phase_taps(n, k, s, *p) for n, k, s, p in
                                      zip((h, w), kernel.shape[:2], strides, padding))
  rows = []
  for d0y, ty in phy:
    row = []
    for d0x, tx in phx:
      if not ty or not tx:  # no tap lands on an input element: this phase is all zeros
        row.append(jnp.zeros((b, my, mx, kernel.shape[3]), x.dtype))
        continue
      # Phase output m reads x[m + d0 + t] with tap ty[t]: a conv of x with low padding -d0.
      sub = lax.slice(kernel, (ty[0], tx[0], 0, 0), (ty[-1] + 1, tx[-1] + 1) + kernel.shape[2:],
                      (strides[0], strides[1], 1, 1))
      pads = [(-d0y, my + d0y + len(ty) - 1 - h), (-d0x, mx + d0x + len(tx) - 1 - w)]
      row.append(im2col_conv(x, sub, (1, 1), pads, precision))  # [B, M_y, M_x, C_out]
    rows.append(jnp.stack(row, axis=3))  # [B, M_y, M_x, sx, C_out]
  y = jnp.stack(rows, axis=2).reshape(b, my * strides[0], mx * strides[1], kernel.shape[3])
  return y[:, :hout, :wout]


def _flatten_batch(x: jax.Array, nsp: int) -> tuple[jax.Array, tuple[int, ...] | None]:
  """Folds all leading batch dims into one, as flax's convolutions do; returns the original batch shape."""
  nbatch = x.ndim - nsp - 1
  if nbatch == 1:
    return x, None
  return x.reshape((-1,) + x.shape[nbatch:]), x.shape[:nbatch]


def _canonical_padding(padding: Padding, nsp: int) -> str | list[tuple[int, int]]:
  """'SAME' / 'VALID' as is, an int or per-dim ints / pairs as (low, high) pairs (flax's conventions)."""
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or explicit, got {padding!r} (no CIRCULAR etc.)")
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * nsp
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  if len(pads) != nsp or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding {padding!r} does not give a (low, high) pair for each of {nsp} spatial dims")
  return pads


class _ConvLayer(nn.Module):
  """The attributes, parameters and input handling `Conv` and `ConvTranspose` share (those of `nn.Conv`).

  Attributes:
    features: C_out.
    kernel_size: spatial kernel sizes (an int means the same for each spatial dim).
    strides: stride per spatial dim (an int: all).
    padding: 'SAME', 'VALID', an int or a (low, high) pair / int per spatial dim.
    impl: 'auto' (`use_im2col`), 'xla' or 'im2col'; None reads $VQDDM_CONV_IMPL (default 'auto').
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] | None = 1
  padding: Padding = "SAME"
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  impl: str | None = None

  def _inputs(self, inputs: jax.Array) -> tuple:
    """(x [B, *spatial, C_in], kernel, bias or None, ksize, strides, padding, batch_shape), promoted to
    `dtype`; creates the parameters 'kernel' then 'bias', as flax does."""
    # An int kernel_size is one spatial dim, as in flax.
    ksize = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    nsp = len(ksize)
    strides = _tuple(self.strides, nsp)
    x, batch_shape = _flatten_batch(inputs, nsp)
    kernel = self.param("kernel", self.kernel_init, ksize + (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return x, kernel, bias, ksize, strides, _canonical_padding(self.padding, nsp), batch_shape

  @staticmethod
  def _output(y: jax.Array, bias: jax.Array | None, batch_shape: tuple | None) -> jax.Array:
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])


class Conv(_ConvLayer):
  """`nn.Conv` (2-D, no dilation, groups or masks) with an im2col path where XLA:CPU is slow.

  `x: f[B, H, W, C_in] -> dtype[B, H', W', features]`; same attributes, parameters and results as `nn.Conv`
  (equal to float rounding on the im2col path, bit for bit on the XLA path), plus `impl` (`_ConvLayer`).
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    x, kernel, bias, ksize, strides, pad, batch_shape = self._inputs(inputs)
    nsp = len(ksize)
    if _resolve_impl(self.impl, x.shape, self.features, ksize, strides):
      if isinstance(pad, str):
        pad = lax.padtype_to_pads(x.shape[1:-1], ksize, strides, pad)
      y = im2col_conv(x, kernel, strides, pad, self.precision)
    else:
      # Exactly flax's call, so this path reproduces nn.Conv bit for bit.
      dn = lax.ConvDimensionNumbers((0, nsp + 1, *range(1, nsp + 1)), (nsp + 1, nsp, *range(nsp)),
                                    (0, nsp + 1, *range(1, nsp + 1)))  # NHWC, HWIO, NHWC
      y = lax.conv_general_dilated(x, kernel, strides, pad, lhs_dilation=(1,) * nsp,
                                   rhs_dilation=(1,) * nsp, dimension_numbers=dn, feature_group_count=1,
                                   precision=self.precision)
    return self._output(y, bias, batch_shape)


class ConvTranspose(_ConvLayer):
  """`nn.ConvTranspose` (2-D, `transpose_kernel=False`, no dilation or masks) with an im2col path.

  `x: f[B, H, W, C_in] -> dtype[B, H', W', features]` with `lax.conv_transpose`'s output size (explicit
  padding is that of the stride-dilated input: kernel 4, stride 2, padding ((2, 2), (2, 2)) doubles H and W).
  Same attributes, parameters and results as `nn.ConvTranspose`, plus `impl` (see `_ConvLayer`).
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    x, kernel, bias, ksize, strides, pad, batch_shape = self._inputs(inputs)
    nsp = len(ksize)
    if nsp == 2 and _resolve_impl(self.impl, x.shape, self.features, ksize, strides, transpose=True):
      y = im2col_conv_transpose(x, kernel, strides, transpose_padding(ksize, strides, pad), self.precision)
    else:
      y = lax.conv_transpose(x, kernel, strides, pad, rhs_dilation=(1,) * nsp, transpose_kernel=False,
                             precision=self.precision)
    return self._output(y, bias, batch_shape)
