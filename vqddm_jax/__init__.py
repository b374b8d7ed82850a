"""VQ-DDM in JAX. The command line is `python -m vqddm_jax.main`; from Python, `vqddm_jax.load(workdir)`.

Importing the package imports nothing else (no JAX, no TensorFlow), so `python -m vqddm_jax.main --help`
stays cheap; `load` imports what it needs when called.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from vqddm_jax.inference import Pipeline


def load(workdir: str | os.PathLike | Any, config: Any = None) -> Pipeline:
  """Restores a trained work directory for sampling, inpainting, encoding and decoding from Python.

      pipe = vqddm_jax.load("runs/mnist")
      images = pipe.sample(16, seed=1)   # uint8 [16, H, W, C], as --mode=sample draws them

  Args:
    workdir: the work directory of a run whose prior is trained (a path, a gs:// URI or a `Workdir`).
    config: None (default) for the config the run stored in `W/config.json`; else an ml_collections config
      that agrees with the stored one in every field that defines the run.

  Returns:
    A `vqddm_jax.inference.Pipeline`: `.sample(n, seed=, steps=, temperature=)`, `.sample_codes(...)`,
    `.inpaint(images, mask)`, `.encode(images)`, `.decode(codes)` (see its module doc for devices).

  Raises:
    vqddm_jax.errors.UserError: no stored config, no checkpoint or code maps yet, a config that does not
      fit the run, or a stale prior (its subclasses say which; the message says what to do).
  """
  from vqddm_jax import inference
  return inference.load(workdir, config)
