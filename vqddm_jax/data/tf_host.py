"""TensorFlow for the host input pipeline only: imported through here, it never sees an accelerator.

TF would otherwise reserve GPU memory that JAX needs; hiding the devices must happen before TF initialises
them, so every module of this package that uses TF imports it from here.
"""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere; nothing more we can do here.
  pass

__all__ = ["tf"]
