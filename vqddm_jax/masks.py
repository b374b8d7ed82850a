"""Inpainting masks: which code positions of a map are known.

A mask spec (`config.inpaint.mask`) is one of the named masks, `random:FRACTION` (that fraction of the code
positions hidden, drawn per image; 0 < FRACTION < 1) or the path of a PNG mask. This module imports neither
JAX nor TensorFlow, so the config schema can check a spec, PNG file included, when a config is loaded.

A PNG mask is read and checked as follows (`check_mask_spec` at config load; `code_mask` adds the code grid):
- White pixels (the largest value: 255, or 65535 in a 16-bit PNG) are known, black (0) ones are inpainted.
  A 0/1 PNG, which is what `Image.fromarray(mask.astype(np.uint8))` writes for a boolean mask, is accepted
  with 1 = known: its two levels cannot mean anything else, and refusing it would only make the user rescale.
- When the file has transparency (an alpha channel, or a palette or colour key with transparent entries) and
  some pixel is not fully opaque, the alpha channel is the mask and the colours are ignored: opaque = known,
  transparent = inpainted (a hole cut with an eraser). A fully opaque alpha (an RGBA save of a black-and-white
  mask) says nothing, and the grey levels are used.
- Any other level (antialiased edges, greys, colours) is refused: threshold the mask first.
- It must be square, as the model's images are (`config.data.image_size` on a side); a square mask of another
  side is resized to the images' side (nearest neighbour), a 100×30 one is refused rather than stretched.
- A mask with no known pixel, or no pixel to inpaint, is refused, and so is one that becomes so on the code
  grid, where a code is known only when every pixel of its f×f patch is known.
"""
from __future__ import annotations

import hashlib
import io
import os
import re

import numpy as np
from etils import epath

from vqddm_jax.errors import ConfigError

NAMED_MASKS = ("left_half", "top_half", "center")
_RANDOM = re.compile(r"^random:(0(\.\d+)?|1(\.0+)?)$")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # PIL modes of a 16-bit greyscale PNG.


def check_mask_spec(spec: str, image_size: int | None = None, field: str = "inpaint.mask") -> None:
  """Raises ConfigError unless `spec` is a named mask, `random:FRACTION` or a usable PNG mask (see the module
  doc; reading a mask PNG is cheap). `image_size`, when given, is named in the message about a non-square
  mask; `field` is the config field the messages name."""
  if spec in NAMED_MASKS:
    return
  if _RANDOM.match(spec):
    if not 0 < float(spec.split(":", 1)[1]) < 1:
      raise ConfigError(f"config.{field} = {spec!r} is not allowed: FRACTION must lie strictly "
                        "between 0 and 1 (0 hides nothing; 1 hides everything, which is --mode=sample)")
    return
  if spec.lower().endswith(".png"):
    _known_pixels(spec, image_size, field)
    return
  raise ConfigError(f"config.{field} = {spec!r} is not allowed: one of {', '.join(NAMED_MASKS)}, "
                    "'random:FRACTION' (FRACTION in (0, 1) of the code positions hidden) or a PNG path "
                    "(white = known pixels)")


def mask_name(spec: str) -> str:
  """A file-name-safe name for a spec: `left_half`, `random_0.5`; for a PNG its file name and 8 hex digits of
  a hash of its absolute path and its bytes (`mask.png-1a2b3c4d`), so that `/a/mask.png` and `/b/mask.png`,
  or a mask edited in place, never share an output folder."""
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.rsplit("/", 1)[-1])
  if spec in NAMED_MASKS or spec.startswith("random:"):
    return base
  path = epath.Path(spec if "://" in spec else os.path.abspath(os.path.expanduser(spec)))
  digest = hashlib.sha256(str(path).encode() + b"\0" + (path.read_bytes() if path.exists() else b""))
  return f"{base}-{digest.hexdigest()[:8]}"


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
    ConfigError: a bad spec or PNG mask, or a named or PNG mask that leaves no code known or none unknown.
  """
  h, w = code_shape
  if spec.lower().endswith(".png"):
    mask = _png_code_mask(spec, code_shape, image_size)
  else:
    check_mask_spec(spec)
    if spec.startswith("random:"):
      hidden = float(spec.split(":", 1)[1])
      return np.random.default_rng(seed).random((num, h, w)) >= hidden
    mask = np.ones((h, w), bool)
    if spec == "left_half":
      mask[:, w // 2:] = False
    elif spec == "top_half":
      mask[h // 2:, :] = False
    else:  # center
      mask[h // 4:h - h // 4, w // 4:w - w // 4] = False
  if mask.all() or not mask.any():
    f = image_size // h
    raise ConfigError(f"config.inpaint.mask = {spec!r}: on the {h}×{w} code grid "
                      f"{'every' if mask.all() else 'no'} position is known (a code is known only when all "
                      f"{f}×{f} pixels of its patch are known); the mask must leave some codes known and "
                      "some to inpaint")
  return np.broadcast_to(mask, (num, h, w)).copy()


def _png_code_mask(path: str, code_shape: tuple[int, int], image_size: int) -> np.ndarray:
  """bool[h, w]: a code is known only when every pixel of its f×f patch is known."""
  from PIL import Image
  known = _known_pixels(path, image_size)
  if known.shape != (image_size, image_size):
    pixels = Image.fromarray(known.astype(np.uint8) * 255).resize((image_size, image_size), Image.NEAREST)
    known = np.asarray(pixels) > 127
  return pixels_to_codes(known, code_shape)


def pixels_to_codes(known: np.ndarray, code_shape: tuple[int, int]) -> np.ndarray:
  """`bool[..., h, w]` of a pixel mask `bool[..., H, W]` (True = known): a code is known only when every
  pixel of its f×f patch is known (f = H / h)."""
  h, w = code_shape
  f = known.shape[-2] // h
  return known.reshape(known.shape[:-2] + (h, f, w, f)).all(axis=(-3, -1))


def _mask_levels(im) -> tuple[np.ndarray, int, str]:
  """(the mask's values [H, W], the value of white, 'alpha' or 'grey') of an open PIL image."""
  if im.has_transparency_data:
    alpha = np.asarray(im.convert("RGBA"))[..., 3]
    if alpha.min() < 255:
      return alpha, 255, "alpha"
  if im.mode in _SIXTEEN_BIT:
    return np.asarray(im).astype(np.int64), 65535, "grey"
  return np.asarray(im.convert("L")), 255, "grey"


def _known_pixels(path: str, image_size: int | None, field: str = "inpaint.mask") -> np.ndarray:
  """bool[H, W] of a PNG mask, True where known, after every check of the module doc but the code grid's."""
  from PIL import Image, UnidentifiedImageError
  where = f"config.{field} = {path!r}"
  if not epath.Path(path).is_file():
    raise ConfigError(f"{where}: no such mask PNG file")
  try:
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as im:
      values, white, what = _mask_levels(im)
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
    raise ConfigError(f"{where}: cannot read it as an image ({e})") from None
  h, w = values.shape
  if h != w:
    images = f"{image_size}×{image_size}" if image_size else "square"
    raise ConfigError(f"{where}: the mask is {w}×{h} pixels but the images are {images} "
                      "(config.data.image_size); crop or pad the mask to a square rather than have it "
                      "stretched (a square mask of any side is resized to the images' side)")
  levels = np.unique(values)
  if set(levels.tolist()) <= {0, white}:
    known = values == white
  elif set(levels.tolist()) <= {0, 1}:
    known = values == 1
  else:
    shown = ", ".join(str(v) for v in levels[:6]) + (", ..." if len(levels) > 6 else "")
    raise ConfigError(f"{where}: the mask must be binary, 0 (inpaint) and {white} (known) or 0 and 1, but "
                      f"it has {len(levels)} {what} values ({shown}); threshold it first")
  if known.all():
    raise ConfigError(f"{where}: every pixel is known ({what} values all {levels[0]}): nothing to inpaint")
  if not known.any():
    raise ConfigError(f"{where}: no pixel is known ({what} values all 0): nothing to condition on (unconditional "
                      "samples come from --mode=sample)")
  return known
