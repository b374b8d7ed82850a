"""The Inception-v3 network that FID uses, in Flax linen: pytorch-fid's "pool_3" 2048-d features.

Architecture: torchvision's Inception3 with the FID-specific blocks of pytorch-fid (the TF 2015-12-05 graph
that the original FID code used): average pools in Mixed_5b-d, 6b-e and 7b do not count padding, and
Mixed_7c's pool branch is a max pool. No auxiliary classifier and no final fc layer: only the features, the
global average of the last 8×8×2048 map. 21,785,568 trainable parameters (conv kernels, BN scale and bias)
plus BN running statistics. When the weights file holds the graph's 1008-way classifier (`params/fc`),
`inception_features_and_logits` also gives the class logits the Inception Score needs.

Weights. This project cannot download anything where it is built and tested, so the weights come from a file
the user gives (`load_inception(path)`). Module names mirror the PyTorch state-dict names, which makes the
conversion mechanical; `inception_layout.py` documents the .npz layout and `inception_weights.py` converts
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` into it without PyTorch:

  python -m vqddm_jax.evaluation.inception_weights \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Input pipeline as in pytorch-fid: images of any size are resized bilinearly (half-pixel centres, no
antialiasing: `F.interpolate(..., align_corners=False)`) to 299×299 and scaled to [-1, 1]; the project's
images already are in [-1, 1], and bilinear resizing commutes with that affine map. Grey images are repeated
to three channels.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.evaluation import inception_layout

INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008
Padding = Any  # "VALID" or ((top, bottom), (left, right)).


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) → BatchNorm (eps 1e-3, running statistics) → ReLU; submodules 'conv' and 'bn'."""

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = "VALID"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # HIGHEST: on TPUs (bf16 passes) and recent GPUs (TF32) the default f32 convolution precision is lower,
    # and FID must not depend on the accelerator it was computed on. On CPU it changes nothing.
    x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool3(x: jax.Array) -> jax.Array:
  # count_include_pad=False: the FID graph's average pools ignore the zero padding at the borders.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1 (64+64+96+pool_features channels)."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35→17 reduction: 3×3/2 | 1×1→3×3→3×3/2 | max-pool/2 (384+96+C_in channels)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17×17 block with factorised 7×7 convolutions (4 × 192 = 768 channels)."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17→8 reduction: 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2 (320+192+C_in channels)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8×8 block with split 1×3 / 3×1 branches (320+768+768+192 = 2048 channels).

  `max_pool_branch`: Mixed_7c of the FID graph pools with max, Mixed_7b with an average (no padding count).
  """

  max_pool_branch: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool_branch:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
    else:
      pooled = _avg_pool3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 trunk: f32[B, 299, 299, 3] in [-1, 1] → pool_3 features f32[B, 2048]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)     # 149
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)                     # 147
    x = BasicConv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool3_s2(x)                                                   # 73
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)                    # 71
    x = _max_pool3_s2(x)                                                   # 35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)                                     # 17
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)                                     # 8
    x = InceptionE(max_pool_branch=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array) -> jax.Array:
  """Network input from project images.

  Args:
    images: f32[B, H, W, C] in [-1, 1], C = 1 or 3, any H and W.

  Returns:
    f32[B, 299, 299, 3] in [-1, 1]: bilinear, half-pixel centres, no antialiasing (pytorch-fid's resize).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be f32[B, H, W, 1 or 3], got shape {images.shape}")
  images = images.astype(jnp.float32)
  if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    images = jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, images.shape[-1]),
                              method="bilinear", antialias=False)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return images


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  abstract = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return tuple((k, tuple(v.shape)) for k, v in inception_layout.flatten(abstract).items())


def variable_shapes() -> dict[str, tuple[int, ...]]:
  """The flat layout of the weights file: {'params/Mixed_5b/branch1x1/conv/kernel': shape, ...}.

  Computed once with `jax.eval_shape` (tracing only: no FLOPs, no parameter memory) and cached.
  """
  return dict(_variable_shapes())


def init_variables(seed: int = 0) -> dict[str, Any]:
  """Randomly initialised variables {'params', 'batch_stats'} (tests and shape checks, not for FID)."""
  return InceptionV3().init(jax.random.PRNGKey(seed), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))


def load_inception(path: str) -> dict[str, Any]:
  """Loads the FID Inception variables from a .npz in the layout of `inception_layout.py`.

  Nothing is downloaded. To produce the file, download pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
  (the release asset "fid_weights" of the pytorch-fid GitHub project) on a machine with network access and
  convert it with `python -m vqddm_jax.evaluation.inception_weights --pth=... --out=...` (no PyTorch needed).

  Args:
    path: the converted .npz.

  Returns:
    {'params': ..., 'batch_stats': ...} ready for `inception_features`.

  Raises:
    FileNotFoundError: `path` does not exist (the message says how to produce it).
    ValueError: the file is not in the expected layout (missing / unexpected keys, wrong shapes).
  """
  return inception_layout.load_npz(path, variable_shapes(), inception_layout.FC_SHAPES)


def has_classifier(variables) -> bool:
  """Whether `variables` hold the fc layer (the weights file was converted with it), so IS can be computed."""
  return "fc" in variables["params"]


@jax.jit
def _features(variables, images):
  return InceptionV3().apply(variables, preprocess(images))


@jax.jit
def _features_and_logits(variables, images):
  pool3 = InceptionV3().apply(variables, preprocess(images))
  # No bias: the original Inception Score code multiplies pool_3 by the 'softmax/logits/MatMul' weights only.
  logits = jnp.dot(pool3, variables["params"]["fc"]["kernel"], precision=jax.lax.Precision.HIGHEST)
  return pool3, logits


def _batched(fn, variables, images: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, ...]]:
  """`fn(variables, batch)` over jitted batches (the last one padded so shapes compile once)."""
  images = np.asarray(images, np.float32)
  variables = jax.device_put(variables)  # Once, not with every batch (87 MB of weights).
  out = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    n = chunk.shape[0]
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
    result = fn(variables, chunk)
    out.append(tuple(np.asarray(r)[:n] for r in (result if isinstance(result, tuple) else (result,))))
  return out


def inception_features(variables, images, *, batch_size: int = 50) -> np.ndarray:
  """pool_3 features of images, computed in jitted batches (the last one padded so shapes compile once).

  Args:
    variables: from `load_inception` (or `init_variables` for tests).
    images: f32[N, H, W, C] in [-1, 1], C = 1 or 3.
    batch_size: images per call (each 299×299 image costs ~5.7 G multiply-adds).

  Returns:
    f32[N, 2048].
  """
  out = _batched(_features, variables, images, batch_size)
  return np.concatenate([o[0] for o in out]) if out else np.zeros((0, FEATURES), np.float32)


def inception_features_and_logits(variables, images, *,
                                  batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """pool_3 features and the classifier's logits (for the Inception Score) in one pass.

  Args:
    variables: from `load_inception` of a file with the fc layer (`has_classifier`).
    images: f32[N, H, W, C] in [-1, 1], C = 1 or 3.
    batch_size: images per call.

  Returns:
    (f32[N, 2048], f32[N, 1008]); the logits are pool_3 · W_fc without the fc bias (see `_features_and_logits`).
  """
  if not has_classifier(variables):
    raise ValueError("the Inception weights hold no fc layer (params/fc): convert pytorch-fid's .pth again "
                     "with `python -m vqddm_jax.evaluation.inception_weights` to keep it")
  out = _batched(_features_and_logits, variables, images, batch_size)
  if not out:
    return np.zeros((0, FEATURES), np.float32), np.zeros((0, CLASSES), np.float32)
  return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def count_parameters(shapes: dict[str, tuple[int, ...]], collection: str = "params") -> int:
  """Scalars in one collection ('params' or 'batch_stats') of a flat layout such as `variable_shapes()`."""
  return int(sum(np.prod(s, dtype=np.int64) for k, s in shapes.items() if k.split("/")[0] == collection))
