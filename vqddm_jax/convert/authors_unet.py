"""The VQ-DDM authors' denoiser (`DDM/model/unet.py`, class `Unet`) -> this project's `models.unet.UNet`.

Their network is ours with the `:authors` settings: q left unnormalised in the linear attention
(`softmax_q=False`), attention at every level and in the middle, GroupNorm with 8 groups, two ResnetBlocks
per level, and the step embedded as t * 4000 / T (`time_scale = 4000 / num_steps`; T is not stored in the
weights, hence `--num_steps`, default their 4000). It is fed the step as t − 1 where our networks get t
(t = 1..T): to reproduce their sampler's calls, call ours with t − 1.

The config is read from the shapes: K and `ch` from `embedding.weight`, the levels and `ch_mult` from
`downs.{l}.0.block1.block.0.weight`. Name map: `downs.{l}.{0,1}` -> `down_{l}_res_{0,1}`, `downs.{l}.2`
(Residual(Rezero(LinearAttention))) -> `down_{l}_attn` with `.fn.g` -> `rezero_scale`, `downs.{l}.3.conv` ->
`down_{l}_downsample`, `mid_block1` / `mid_attn` / `mid_block2` -> `mid_res_0` / `mid_attn` / `mid_res_1`,
`ups.{i}` -> `up_{L-1-i}` (`.3.conv`, a ConvTranspose2d, -> `up_{l}_upsample`), `mlp.0` / `mlp.2` ->
`time_dense_0` / `_1`, `final_conv.0` / `.1` -> `head_block` / `head_out`. A state dict whose names carry a
prefix (a wrapper module's, e.g. `_denoise_fn.` or `module.`) is read under that prefix; tensors outside it
(the wrapper's own buffers) are ignored and counted in the report.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from vqddm_jax.convert import mapping
from vqddm_jax.errors import ConfigError
from vqddm_jax.models import unet
from vqddm_jax.safe_pickle import WeightsFileError

WHAT = "VQ-DDM authors' UNet"
AUTHORS_STEPS = 4000  # Their T, the range their embedding rescales every T to.
_ANCHOR = "embedding.weight"


def find_prefix(state: Mapping[str, np.ndarray], source: str) -> str:
  """The prefix under which the network's names sit ('' for a bare state dict)."""
  found = [k[:-len(_ANCHOR)] for k in state
           if k.endswith(_ANCHOR) and f"{k[:-len(_ANCHOR)]}downs.0.0.block1.block.0.weight" in state]
  if len(found) != 1:
    raise WeightsFileError(f"{source}: not a {WHAT}: " + (
        f"several networks in one file (prefixes {found})" if found else
        f"no '{_ANCHOR}' beside 'downs.0.0.block1.block.0.weight' (the file's first names: "
        f"{', '.join(list(state)[:6])})"))
  return found[0]


def infer(state: Mapping[str, np.ndarray], *, source: str, num_steps: int) -> tuple[dict, dict]:
  """(config.prior fields, the rest of the record: K and T) from the shapes of a prefix-free state dict."""
  if num_steps < 1:
    raise ConfigError(f"--num_steps={num_steps}: T must be a positive number of diffusion steps")
  k, ch = mapping.require(state, _ANCHOR, 2, source=source, what=WHAT)
  levels = mapping.count(state, lambda l: f"downs.{l}.")
  mult = []
  for level in range(levels):
    width = mapping.require(state, f"downs.{level}.0.block1.block.0.weight", 4, source=source, what=WHAT)[0]
    if width % ch:
      raise WeightsFileError(f"{source}: not a {WHAT}: level {level} is {width} wide, not a multiple of "
                             f"ch={ch}")
    mult.append(width // ch)
  fields = dict(ch=ch, ch_mult=tuple(mult), num_res_blocks=2, attention=True, mid_attention=True, groups=8,
                dropout=0.0, softmax_q=False, time_scale=AUTHORS_STEPS / num_steps, dtype="float32")
  return fields, {"num_codes": k, "diffusion": {"num_steps": num_steps}}


def model_of(fields: Mapping[str, Any], num_codes: int) -> unet.UNet:
  return unet.UNet(**{**fields, "dtype": getattr(jnp, fields["dtype"])}, num_classes=num_codes)


def _resnet(names: mapping.NameMap, flax: str, torch: str) -> None:
  for i in (1, 2):
    names.conv(f"{flax}/block{i}/conv", f"{torch}.block{i}.block.0")
    names.norm(f"{flax}/block{i}/norm", f"{torch}.block{i}.block.1")
  names.conv(f"{flax}/time_proj", f"{torch}.mlp.1", mapping.LINEAR)
  if names.has(f"{flax}/res_conv"):
    names.conv(f"{flax}/res_conv", f"{torch}.res_conv")


def _attn(names: mapping.NameMap, flax: str, torch: str) -> None:
  names.add(f"{flax}/rezero_scale", f"{torch}.fn.g", mapping.SCALAR)
  names.conv(f"{flax}/attn/to_qkv", f"{torch}.fn.fn.to_qkv")
  names.conv(f"{flax}/attn/to_out", f"{torch}.fn.fn.to_out")


def name_map(levels: int, expected: Mapping[str, tuple], prefix: str) -> mapping.NameMap:
  """The map from the authors' names (under `prefix`) to our UNet's parameters `expected`."""
  names = mapping.NameMap(expected)
  p = prefix
  names.add("embed/embedding", f"{p}{_ANCHOR}")
  names.conv("time_dense_0", f"{p}mlp.0", mapping.LINEAR)
  names.conv("time_dense_1", f"{p}mlp.2", mapping.LINEAR)
  for level in range(levels):
    for j in (0, 1):
      _resnet(names, f"down_{level}_res_{j}", f"{p}downs.{level}.{j}")
    _attn(names, f"down_{level}_attn", f"{p}downs.{level}.2")
    if level < levels - 1:
      names.conv(f"down_{level}_downsample", f"{p}downs.{level}.3.conv")
  _resnet(names, "mid_res_0", f"{p}mid_block1")
  _attn(names, "mid_attn", f"{p}mid_attn")
  _resnet(names, "mid_res_1", f"{p}mid_block2")
  for i, level in enumerate(reversed(range(1, levels))):
    for j in (0, 1):
      _resnet(names, f"up_{level}_res_{j}", f"{p}ups.{i}.{j}")
    _attn(names, f"up_{level}_attn", f"{p}ups.{i}.2")
    names.conv(f"up_{level}_upsample", f"{p}ups.{i}.3.conv", mapping.CONV_TRANSPOSE)
  names.conv("head_block/conv", f"{p}final_conv.0.block.0")
  names.norm("head_block/norm", f"{p}final_conv.0.block.1")
  names.conv("head_out", f"{p}final_conv.1")
  return names


def convert(state: Mapping[str, np.ndarray], *, source: str, num_steps: int = AUTHORS_STEPS
            ) -> mapping.Conversion:
  """Our UNet's fields and parameters for their state dict (see `mapping.Conversion`).

  Raises:
    WeightsFileError: the tensors are not the authors' UNet (missing, unexpected, mis-shaped names listed).
    ConfigError: `num_steps` < 1.
  """
  prefix = find_prefix(state, source)
  inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  fields, record = infer(inner, source=source, num_steps=num_steps)
  model = model_of(fields, record["num_codes"])
  side = 2 ** (len(fields["ch_mult"]) - 1)
  expected = mapping.flat_shapes(unet.param_shapes(model, side, side))
  names = name_map(len(fields["ch_mult"]), expected, prefix)
  ignored = [k for k in state if not k.startswith(prefix)]
  params = mapping.apply(state, names, source=source, what=WHAT, ignored=ignored)
  notes = [f"time_scale = {AUTHORS_STEPS} / T with T = {num_steps} (--num_steps); their sampler feeds the "
           "network t - 1 for step t (t = 1..T)"]
  if prefix:
    notes.append(f"network read under the prefix {prefix!r}")
  return mapping.Conversion(fields, record, params, names, ignored, notes)
