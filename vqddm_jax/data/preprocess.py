"""Image preprocessing shared by every source: uint8 HWC of any size -> f32 [S, S, C] in [-1, 1]."""
from __future__ import annotations

from vqddm_jax.data.tf_host import tf


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """Maps pixel values 0..255 (any float or int dtype) to f32 in [-1, 1]."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def center_crop_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Crops the central square, then resizes it to size x size with antialiasing.

  Args:
    image: u8[h, w, c] (h, w may be dynamic).
    size: output height and width.

  Returns:
    f32[size, size, c] with values 0..255.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  side = tf.minimum(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = tf.image.crop_to_bounding_box(image, top, left, side, side)
  # Antialiasing matters when shrinking (e.g. 1024 -> 256): plain bilinear would alias fine texture.
  resized = tf.image.resize(tf.cast(square, tf.float32), (size, size), method="bilinear", antialias=True)
  return tf.clip_by_value(resized, 0.0, 255.0)


def pad_or_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Pads smaller images symmetrically with the background value 0, centre-crops larger ones.

  Zero is the background of MNIST-like data (black), so 28x28 digits padded to 32x32 keep their statistics;
  an odd margin puts the extra pixel at the bottom/right.

  Args:
    image: u8[h, w, c].
    size: output height and width.

  Returns:
    f32[size, size, c] with values 0..255.
  """
  return tf.cast(tf.image.resize_with_crop_or_pad(image, size, size), tf.float32)


def preprocess(image: tf.Tensor, *, size: int, mode: str, channels: int) -> tf.Tensor:
  """The model input for one decoded image.

  Args:
    image: u8[h, w, channels], any h and w.
    size: output height and width (`config.data.image_size`).
    mode: 'pad' or 'center_crop' (`config.data.resize`).
    channels: 1 or 3, used to fix the static shape.

  Returns:
    f32[size, size, channels] in [-1, 1].
  """
  if mode == "pad":
    out = pad_or_crop(image, size)
  elif mode == "center_crop":
    out = center_crop_resize(image, size)
  else:
    raise ValueError(f"config.data.resize = {mode!r} is not allowed: 'pad' or 'center_crop'")
  out = tf.ensure_shape(out, (size, size, channels))
  return to_unit_range(out)
