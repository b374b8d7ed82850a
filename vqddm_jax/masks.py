"""Inpainting masks: which code positions of a map are known.

A mask spec (`config.inpaint.mask`) is one of the named masks, `random:FRACTION` (that fraction of the code
positions hidden, drawn per image) or the path of a PNG whose white pixels are known. This module imports
neither JAX nor TensorFlow, so the config schema can check a spec when a config is loaded.
"""
from __future__ import annotations

import io
import re

import numpy as np
from etils import epath

from vqddm_jax.errors import ConfigError, UserError

NAMED_MASKS = ("left_half", "top_half", "center")
_RANDOM = re.compile(r"^random:(0(\.\d+)?|1(\.0+)?)$")


def check_mask_spec(spec: str) -> None:
  """Raises ConfigError unless `spec` is a named mask, `random:FRACTION` or an existing `.png` file."""
  if spec in NAMED_MASKS or _RANDOM.match(spec):
    return
  if spec.lower().endswith(".png"):
    if not epath.Path(spec).is_file():
      raise ConfigError(f"config.inpaint.mask = {spec!r}: no such mask PNG file")
    return
  raise ConfigError(f"config.inpaint.mask = {spec!r} is not allowed: one of {', '.join(NAMED_MASKS)}, "
                    "'random:FRACTION' (FRACTION in [0, 1] of the code positions hidden) or a PNG path "
                    "(white = known pixels)")


def mask_name(spec: str) -> str:
  """A file-name-safe name for a spec (`left_half`, `random_0.5`, `mask.png` for `/some/dir/mask.png`)."""
  return re.sub(r"[^A-Za-z0-9_.-]", "_", spec.rsplit("/", 1)[-1])


def code_mask(spec: str, num: int, code_shape: tuple[int, int], image_size: int,
              seed: int) -> np.ndarray:
  """`bool[num, h, w]`, True where the code is KNOWN.

  Args:
    spec: a mask spec (see `check_mask_spec`).
    num: number of maps.
    code_shape: (h, w) of the code maps.
    image_size: side of the images in pixels (a PNG mask is resized to it).
    seed: seed of the `random:` masks.

  Raises:
    ConfigError: a bad spec. UserError: a PNG mask that cannot be read as an image.
  """
  check_mask_spec(spec)
  h, w = code_shape
  mask = np.ones((h, w), bool)
  if spec == "left_half":
    mask[:, w // 2:] = False
  elif spec == "top_half":
    mask[h // 2:, :] = False
  elif spec == "center":
    mask[h // 4:h - h // 4, w // 4:w - w // 4] = False
  elif spec.startswith("random:"):
    hidden = float(spec.split(":", 1)[1])
    return np.random.default_rng(seed).random((num, h, w)) >= hidden
  else:
    mask = _png_code_mask(spec, code_shape, image_size)
  return np.broadcast_to(mask, (num, h, w)).copy()


def _png_code_mask(path: str, code_shape: tuple[int, int], image_size: int) -> np.ndarray:
  """A code is known only when every pixel of its f×f patch is known (white)."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as im:
      pixels = np.asarray(im.convert("L").resize((image_size, image_size), Image.NEAREST))
  except (UnidentifiedImageError, OSError) as e:
    raise UserError(f"config.inpaint.mask = {path!r}: cannot read it as an image ({e})") from None
  h, w = code_shape
  f = image_size // h
  return (pixels.reshape(h, f, w, f) > 127).all(axis=(1, 3))
