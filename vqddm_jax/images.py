"""Pixels and pictures: the conversions between images in [-1, 1] and 8-bit pixels, and image grids.

Every picture the code writes (reconstruction grids, samples, inpaintings, the evaluation's grid) and every
array of pixels `vqddm_jax.load` returns or accepts goes through these, so a saved PNG and a returned array
hold the same values.
"""
from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """`u8[...]` pixels 0..255 of images `f32[...]` in [-1, 1] (clipped, rounded): what a saved PNG holds."""
  return np.round((np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
  """`f32[...]` in [-1, 1] of pixels `u8[...]`: the input pipeline's mapping (`data.preprocess.to_unit_range`)
  in NumPy, so that images given as arrays encode exactly as the stored data do."""
  return np.asarray(pixels).astype(np.float32) / 127.5 - 1.0


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles images into one picture.

  Args:
    images: f32[N, H, W, C] in [-1, 1] (C = 1 or 3).
    ncol: columns (default: about sqrt(N)).
    pad: pixels of white border between tiles.

  Returns:
    u8[rows*(H+pad)+pad, ncol*(W+pad)+pad, C].
  """
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  pixels = to_uint8(images)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = pixels[i]
  return grid
