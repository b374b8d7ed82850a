"""The autoregressive prior as the rest of the code uses it: the GPT of the `config.ar` section over the code
maps of a run, read in raster order.

Training, sampling, inpainting and evaluation all build the model through these functions, so they cannot
disagree on its size or its sequence length.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vqddm_jax.models.gpt import GPT


def build_gpt(config: Any, num_classes: int, code_shape: tuple[int, int]) -> GPT:
  """The GPT of `config.ar` (its keys are the module's attributes) over `num_classes` codes (K, or K' after
  ReFiT) and h·w raster positions; the start token is its index K. The dtype is named ("bfloat16")."""
  h, w = code_shape
  return GPT(**{**config.ar, "dtype": getattr(jnp, config.ar.dtype)}, num_classes=num_classes, length=h * w)


def init_params(model: GPT, key: jax.Array) -> Any:
  """Fresh parameters (jitted: op by op, initialising is slower than compiling it)."""
  tokens = jnp.zeros((1, model.length), jnp.int32)
  return jax.jit(lambda k: model.init(k, tokens)["params"])(key)
