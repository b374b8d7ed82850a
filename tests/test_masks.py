"""Inpainting masks: named and random specs, PNG masks (white or opaque = known), and the PNG masks refused
with a message: unreadable, not square, not binary, nothing known or nothing to inpaint."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vqddm_jax import masks
from vqddm_jax.errors import ConfigError

SIZE, CODES = 32, (8, 8)  # 32×32 images, 8×8 code maps: a code covers 4×4 pixels.


def _left_known(side: int, white: int = 255, dtype=np.uint8) -> np.ndarray:
  """A side×side mask whose left half is `white` (known), the right half 0."""
  m = np.zeros((side, side), dtype)
  m[:, :side // 2] = white
  return m


def _code_mask(path) -> np.ndarray:
  return masks.code_mask(str(path), 2, CODES, SIZE, seed=0)


def test_named_and_random_masks():
  left = masks.code_mask("left_half", 3, CODES, SIZE, seed=0)
  assert left.shape == (3, 8, 8) and left[:, :, :4].all() and not left[:, :, 4:].any()
  drawn = masks.code_mask("random:0.25", 64, CODES, SIZE, seed=1)
  assert 0.7 < drawn.mean() < 0.8 and not np.array_equal(drawn[0], drawn[1])
  for spec in ("random:0", "random:1.0"):
    with pytest.raises(ConfigError, match=r"strictly between 0 and 1"):
      masks.check_mask_spec(spec)
  with pytest.raises(ConfigError, match=r"'center': on the 2×2 code grid no position is known"):
    masks.code_mask("center", 1, (2, 2), 8, seed=0)


def test_png_masks_white_or_opaque_is_known(tmp_path):
  expected = np.broadcast_to(_left_known(8, True, bool), (2, 8, 8))
  variants = {
      "l8.png": Image.fromarray(_left_known(SIZE)),
      "zero_one.png": Image.fromarray(_left_known(SIZE, 1)),  # 0/1, as saved from a boolean array.
      "grey16.png": Image.fromarray(_left_known(SIZE, 65535, np.uint16)),  # PIL mode 'I;16'.
      "bilevel.png": Image.fromarray(_left_known(SIZE)).convert("1"),
      "small.png": Image.fromarray(_left_known(8)),  # Square, resized to 32×32.
      "large.png": Image.fromarray(_left_known(128)),
      # Colours black everywhere: the alpha channel is the mask (opaque = known).
      "alpha.png": Image.fromarray(np.dstack([np.zeros((SIZE, SIZE, 3), np.uint8), _left_known(SIZE)])),
      # Fully opaque alpha says nothing: the grey levels are the mask.
      "opaque.png": Image.fromarray(np.dstack([np.repeat(_left_known(SIZE)[..., None], 3, -1),
                                               np.full((SIZE, SIZE), 255, np.uint8)])),
      "grey_alpha.png": Image.fromarray(np.dstack([255 - _left_known(SIZE), _left_known(SIZE)])),  # LA.
  }
  for name, im in variants.items():
    im.save(tmp_path / name)
    masks.check_mask_spec(str(tmp_path / name))
    np.testing.assert_array_equal(_code_mask(tmp_path / name), expected, err_msg=name)
  # A palette PNG whose transparent entry (index 1, white too) marks the hole.
  indices = np.zeros((SIZE, SIZE), np.uint8)
  indices[:, SIZE // 2:] = 1
  palette = Image.new("P", (SIZE, SIZE))
  palette.putpalette([255, 255, 255] * 2)
  palette.putdata(indices.reshape(-1).tolist())
  palette.save(tmp_path / "palette.png", transparency=1)
  np.testing.assert_array_equal(_code_mask(tmp_path / "palette.png"), expected)
  # A code is known only when all 16 pixels of its patch are: one hidden pixel hides its code.
  one = np.full((SIZE, SIZE), 255, np.uint8)
  one[5, 9] = 0
  Image.fromarray(one).save(tmp_path / "one_pixel.png")
  m = _code_mask(tmp_path / "one_pixel.png")
  assert (~m[0]).sum() == 1 and not m[0, 1, 2]


@pytest.mark.parametrize("name, pixels, message", [
    ("wide.png", np.zeros((30, 100), np.uint8),
     r"the mask is 100×30 pixels but the images are (square|32×32) \(config\.data\.image_size\); crop"),
    ("grey.png", np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)),
     r"the mask must be binary.*it has 32 grey values \(0, 8, 16, 24, 32, 40, \.\.\.\)"),
    ("one_255.png", np.where(_left_known(SIZE) > 0, 255, 1).astype(np.uint8),
     r"the mask must be binary.*it has 2 grey values \(1, 255\)"),
    ("white.png", np.full((SIZE, SIZE), 255, np.uint8), r"every pixel is known .*: nothing to inpaint"),
    ("ones.png", np.ones((SIZE, SIZE), np.uint8), r"every pixel is known"),
    ("black.png", np.zeros((SIZE, SIZE), np.uint8), r"no pixel is known .*--mode=sample"),
    ("rgba.png", np.dstack([np.zeros((SIZE, SIZE, 3), np.uint8), _left_known(SIZE) // 2]),
     r"the mask must be binary.*it has 2 alpha values \(0, 127\)"),
    ("text.png", None, r"cannot read it as an image"),
    ("absent.png", False, r"no such mask PNG file"),
])
def test_bad_png_masks_are_refused_with_a_message(tmp_path, name, pixels, message):
  path = tmp_path / name
  if pixels is None:
    path.write_text("not an image\n")
  elif pixels is not False:
    Image.fromarray(pixels).save(path)
  pattern = rf"config\.inpaint\.mask = '{path}': {message}"
  with pytest.raises(ConfigError, match=pattern):
    masks.check_mask_spec(str(path))
  with pytest.raises(ConfigError, match=pattern):
    _code_mask(path)


def test_mask_degenerate_on_the_code_grid_is_refused(tmp_path):
  # Every 4×4 patch has one pixel to inpaint: fine as pixels, but no code is known.
  grid = np.full((SIZE, SIZE), 255, np.uint8)
  grid[::4, ::4] = 0
  Image.fromarray(grid).save(tmp_path / "dots.png")
  masks.check_mask_spec(str(tmp_path / "dots.png"))
  with pytest.raises(ConfigError, match=r"'.*dots\.png': on the 8×8 code grid no position is known "
                                         r"\(a code is known only when all 4×4 pixels"):
    _code_mask(tmp_path / "dots.png")


def test_png_mask_is_checked_when_the_config_is_loaded(tmp_path):
  from conftest import load_config
  from vqddm_jax import config_schema
  config = load_config("configs/mnist.py")
  Image.fromarray(np.zeros((30, 100), np.uint8)).save(tmp_path / "wide.png")
  config.inpaint.mask = str(tmp_path / "wide.png")
  with pytest.raises(ConfigError, match=r"config\.inpaint\.mask = .*wide\.png': the mask is 100×30 pixels"):
    config_schema.validate_config(config)


def test_mask_names_never_collide(tmp_path):
  """Output folders are named by the spec: a PNG by its name and a hash of its path and bytes."""
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  pixels = np.zeros((32, 32), np.uint8)
  pixels[:, 16:] = 255
  for folder in ("a", "b"):
    Image.fromarray(pixels).save(tmp_path / folder / "mask.png")
  a, b = (masks.mask_name(str(tmp_path / f / "mask.png")) for f in ("a", "b"))
  assert a != b and a.startswith("mask.png-") and b.startswith("mask.png-")
  assert masks.mask_name(str(tmp_path / "a" / "mask.png")) == a  # Stable.
  Image.fromarray(255 - pixels).save(tmp_path / "a" / "mask.png")
  assert masks.mask_name(str(tmp_path / "a" / "mask.png")) != a  # Edited in place: a new folder.
  assert masks.mask_name("left_half") == "left_half" and masks.mask_name("random:0.5") == "random_0.5"
