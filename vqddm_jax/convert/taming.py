"""taming-transformers' VQGAN (`taming.models.vqgan.VQModel`) -> this project's `models.vqvae.VQVAE`.

The model's config is read from the tensors' shapes: `ch` and the input channels from `encoder.conv_in`, the
levels and `ch_mult` from `encoder.down.{l}.block.0.conv1`, `num_res_blocks` from the blocks of level 0, the
levels with attention from `encoder.down.{l}.attn.*`, `z_channels` and `embed_dim` from `quant_conv`, K from
`quantize.embedding`. One thing is not in the shapes: the nominal `resolution` (the training image size)
that turns attention levels into `attn_resolutions`; it comes from the model's yaml (`--config`, whose
`ddconfig` is then checked against the shapes) or `--resolution`, else every released tokenizer's 256.
`attn_at_resolution` is set to it, so attention sits where taming puts it at any input size.

Name map (creation order of our modules; L levels): `encoder.down.{l}.block.{b}` -> `ResnetBlock_{n}` and
`.attn.{b}` -> `AttnBlock_{n}` counting up; `encoder.down.{l}.downsample.conv` -> `Conv_{l}`; the encoder's
middle follows its levels; the decoder's middle comes first (`ResnetBlock_0`, `AttnBlock_0`,
`ResnetBlock_1`), then `decoder.up.{l}` for l = L-1..0 with `up.{l}.upsample.conv` -> `Conv_{L-1-l}`;
`quantize.embedding.weight` -> `codebook`. Tensors under `loss.` (taming's LPIPS and discriminator, which
train the tokenizer but are not part of it) are ignored and counted in the report.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax.convert import mapping
from vqddm_jax.errors import MismatchError, MissingInputError
from vqddm_jax.models import vqvae
from vqddm_jax.safe_pickle import WeightsFileError

WHAT = "taming-transformers VQGAN"
GROUPS = 32  # taming's `Normalize`: GroupNorm with 32 groups (eps 1e-6), fixed in its code.
DEFAULT_RESOLUTION = 256  # The size every released taming tokenizer was trained at.
IGNORED_PREFIX = "loss."


def read_yaml(path: str) -> dict[str, Any]:
  """`model.params` of a taming model yaml: {'ddconfig': {...}, 'embed_dim': d, 'n_embed': K, ...}."""
  import yaml  # pylint: disable=g-import-not-at-top  (PyYAML comes with flax, orbax and ml_collections)
  if not os.path.isfile(path):
    raise MissingInputError(f"no taming config at {path!r} (--config: the model's yaml, e.g. "
                            "'configs/model.yaml' beside its checkpoint)")
  try:
    with open(path, encoding="utf-8") as f:
      cfg = yaml.safe_load(f)
    params = cfg["model"]["params"]
    if not isinstance(params.get("ddconfig"), dict):
      raise KeyError("ddconfig")
  except (yaml.YAMLError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise MismatchError(f"{path}: not a taming-transformers model config: model.params.ddconfig is not "
                        f"there ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  return params


def _shape_fields(state: Mapping[str, np.ndarray], source: str) -> tuple[dict, list[int], int, int]:
  """(fields read from the shapes, levels with attention, input channels, output channels)."""
  def need(name, ndim):
    return mapping.require(state, name, ndim, source=source, what=WHAT)

  ch, in_channels = need("encoder.conv_in.weight", 4)[:2]
  levels = mapping.count(state, lambda l: f"encoder.down.{l}.")
  blocks = mapping.count(state, lambda b: f"encoder.down.0.block.{b}.")
  mult = []
  for level in range(levels):
    width = need(f"encoder.down.{level}.block.0.conv1.weight", 4)[0]
    if width % ch:
      raise WeightsFileError(f"{source}: not a {WHAT}: level {level} is {width} wide, not a multiple of "
                             f"ch={ch}")
    mult.append(width // ch)
  embed_dim, z_channels = need("quant_conv.weight", 4)[:2]
  fields = dict(ch=ch, ch_mult=tuple(mult), num_res_blocks=blocks, z_channels=z_channels, embed_dim=embed_dim,
                codebook_size=need("quantize.embedding.weight", 2)[0], groups=GROUPS, dropout=0.0)
  attn = [l for l in range(levels) if any(k.startswith(f"encoder.down.{l}.attn.") for k in state)]
  return fields, attn, in_channels, need("decoder.conv_out.weight", 4)[0]


def _check_yaml(params: Mapping[str, Any], fields: dict, attn: list[int], channels: tuple[int, int],
                config: str, source: str) -> None:
  """Refuses a yaml whose ddconfig does not describe the checkpoint's shapes."""
  dd = params["ddconfig"]
  levels = len(fields["ch_mult"])
  nominal, attn_res = int(dd.get("resolution", 0)), tuple(dd.get("attn_resolutions", ()))
  yaml_attn = [l for l in range(levels) if (nominal >> l) in attn_res]
  pairs = [("ddconfig.ch", dd.get("ch"), fields["ch"]),
           ("ddconfig.ch_mult", tuple(dd.get("ch_mult", ())), fields["ch_mult"]),
           ("ddconfig.num_res_blocks", dd.get("num_res_blocks"), fields["num_res_blocks"]),
           ("ddconfig.z_channels", dd.get("z_channels"), fields["z_channels"]),
           ("ddconfig.in_channels", dd.get("in_channels"), channels[0]),
           ("ddconfig.out_ch", dd.get("out_ch"), channels[1]),
           ("ddconfig.double_z", bool(dd.get("double_z", False)), False),
           ("embed_dim", params.get("embed_dim"), fields["embed_dim"]),
           ("n_embed", params.get("n_embed"), fields["codebook_size"]),
           ("levels with attention (ddconfig.attn_resolutions at ddconfig.resolution)", yaml_attn, attn)]
  for key, said, found in pairs:
    if said != found:
      raise MismatchError(f"{config}: {key} is {said!r}, but the checkpoint {source} has {found!r}: give "
                          "the yaml this checkpoint was trained with (or none: its shapes describe the model)")


def infer(state: Mapping[str, np.ndarray], *, source: str, config: str | None = None,
          resolution: int | None = None) -> tuple[dict, dict, list[str]]:
  """(config.vqvae fields, the rest of the record: data channels and image size, notes for the report)."""
  fields, attn, in_ch, out_ch = _shape_fields(state, source)
  notes = []
  if config is not None:
    params = read_yaml(config)
    _check_yaml(params, fields, attn, (in_ch, out_ch), config, source)
    yaml_res = int(params["ddconfig"]["resolution"])
    if resolution is not None and resolution != yaml_res:
      raise MismatchError(f"--resolution={resolution} disagrees with {config}'s ddconfig.resolution {yaml_res}")
    resolution = yaml_res
    fields["dropout"] = float(params["ddconfig"].get("dropout", 0.0))
    notes.append(f"resolution {resolution} and dropout from {config}")
  elif resolution is None:
    resolution = DEFAULT_RESOLUTION
    notes.append(f"resolution {resolution} assumed (every released taming tokenizer's; no --config or "
                 "--resolution given): it sets which map sizes attn_resolutions names")
  if in_ch != out_ch:
    raise WeightsFileError(f"{source}: a {WHAT} with {in_ch} input and {out_ch} output channels; this "
                           "project's tokenizer reconstructs its input, so they must be equal")
  fields.update(attn_resolutions=tuple(resolution >> l for l in attn), attn_at_resolution=resolution,
                dtype="float32")
  return fields, {"data": {"channels": in_ch, "image_size": resolution}}, notes


def _resnet(names: mapping.NameMap, flax: str, torch: str) -> None:
  for i in (1, 2):
    names.norm(f"{flax}/norm{i}", f"{torch}.norm{i}")
    names.conv(f"{flax}/conv{i}", f"{torch}.conv{i}")
  if names.has(f"{flax}/nin_shortcut"):
    names.conv(f"{flax}/nin_shortcut", f"{torch}.nin_shortcut")


def _attn(names: mapping.NameMap, flax: str, torch: str) -> None:
  names.norm(f"{flax}/norm", f"{torch}.norm")
  for part in ("q", "k", "v", "proj_out"):
    names.conv(f"{flax}/{part}", f"{torch}.{part}", mapping.CONV1X1_AS_DENSE)


class _Counter:
  """Hands out our modules' automatic names (`ResnetBlock_0`, `ResnetBlock_1`, ...) in creation order."""

  def __init__(self, prefix: str):
    self.prefix, self.used = prefix, {}

  def __call__(self, kind: str) -> str:
    n = self.used.get(kind, 0)
    self.used[kind] = n + 1
    return f"{self.prefix}/{kind}_{n}"


def name_map(fields: Mapping[str, Any], expected: Mapping[str, tuple]) -> mapping.NameMap:
  """The map from taming's names to our VQVAE's parameters `expected` ({flax path: shape})."""
  names = mapping.NameMap(expected)
  levels, blocks = len(fields["ch_mult"]), fields["num_res_blocks"]
  res = fields["attn_at_resolution"]
  enc, dec = _Counter("encoder"), _Counter("decoder")
  names.conv("encoder/conv_in", "encoder.conv_in")
  for level in range(levels):
    for b in range(blocks):
      _resnet(names, enc("ResnetBlock"), f"encoder.down.{level}.block.{b}")
      if (res >> level) in fields["attn_resolutions"]:
        _attn(names, enc("AttnBlock"), f"encoder.down.{level}.attn.{b}")
    if level != levels - 1:
      names.conv(f"encoder/Conv_{level}", f"encoder.down.{level}.downsample.conv")
  for net, counter in (("encoder", enc), ("decoder", dec)):
    if net == "decoder":
      names.conv("decoder/conv_in", "decoder.conv_in")
    _resnet(names, counter("ResnetBlock"), f"{net}.mid.block_1")
    _attn(names, counter("AttnBlock"), f"{net}.mid.attn_1")
    _resnet(names, counter("ResnetBlock"), f"{net}.mid.block_2")
    if net == "encoder":
      names.norm("encoder/norm_out", "encoder.norm_out")
      names.conv("encoder/conv_out", "encoder.conv_out")
  for level in reversed(range(levels)):
    for b in range(blocks + 1):
      _resnet(names, dec("ResnetBlock"), f"decoder.up.{level}.block.{b}")
      if ((res >> (levels - 1)) << (levels - 1 - level)) in fields["attn_resolutions"]:
        _attn(names, dec("AttnBlock"), f"decoder.up.{level}.attn.{b}")
    if level != 0:
      names.conv(f"decoder/Conv_{levels - 1 - level}", f"decoder.up.{level}.upsample.conv")
  names.norm("decoder/norm_out", "decoder.norm_out")
  names.conv("decoder/conv_out", "decoder.conv_out")
  names.conv("quant_conv", "quant_conv")
  names.conv("post_quant_conv", "post_quant_conv")
  names.add("codebook", "quantize.embedding.weight")
  return names


def convert(state: Mapping[str, np.ndarray], *, source: str, config: str | None = None,
            resolution: int | None = None) -> mapping.Conversion:
  """Our VQVAE's fields and parameters for a taming state dict (see `mapping.Conversion`).

  Raises:
    WeightsFileError: the tensors are not a taming VQGAN (missing, unexpected, mis-shaped names listed).
    MismatchError: `config`'s model does not describe the tensors.
  """
  fields, record, notes = infer(state, source=source, config=config, resolution=resolution)
  size, channels = record["data"]["image_size"], record["data"]["channels"]
  model = vqvae.build_vqvae(fields, channels)
  expected = mapping.flat_shapes(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))["params"])
  names = name_map(fields, expected)
  ignored = [k for k in state if k.startswith(IGNORED_PREFIX)]
  params = mapping.apply(state, names, source=source, what=WHAT, ignored=ignored)
  return mapping.Conversion(fields, record, params, names, ignored, notes)
