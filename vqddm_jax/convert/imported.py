"""A converted model's folder: written by `python -m vqddm_jax.convert`, read by `load_vqvae` / `load_unet`.

Layout of DIR:
- `checkpoint/0/params`: our parameter tree, an Orbax item written through `vqddm_jax.checkpointing`;
- `model.json`: {'format', 'kind' ('taming_vqgan' | 'authors_unet'), the model's config section under its
  config key ('vqvae' | 'prior', keys = the module's attributes, so `build_vqvae(fields, channels)` /
  `UNet(**fields, num_classes=K)` rebuild it), and what else building it needs: 'data' {channels,
  image_size} for a tokenizer, 'num_codes' (K) and 'diffusion' {num_steps} for a denoiser};
- `conversion.json`: the report: source file, its checkpoint entries, parameter and tensor counts, notes, the
  ignored tensors and the name map {our path: PyTorch name}.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
from etils import epath

from vqddm_jax import checkpointing, files
from vqddm_jax.convert import authors_unet, mapping
from vqddm_jax.errors import MismatchError, MissingInputError
from vqddm_jax.models import unet, vqvae

FORMAT = "vqddm_jax.imported.v1"
SECTIONS = {"taming_vqgan": "vqvae", "authors_unet": "prior"}  # kind -> the config section of its fields.
MODEL_JSON, REPORT_JSON, CHECKPOINT = "model.json", "conversion.json", "checkpoint"


@flax.struct.dataclass
class _Weights:
  params: Any


def write(out: str | os.PathLike, kind: str, conversion: mapping.Conversion, report: Mapping[str, Any]) -> None:
  """Writes DIR (see the module docstring); DIR must be new or empty."""
  out = epath.Path(out)
  if out.exists() and any(out.iterdir()):
    raise MismatchError(f"--out={out} is not empty: converting writes a new folder (give a new path)")
  ckpt = checkpointing.Checkpointer(out / CHECKPOINT, max_to_keep=1)
  try:
    ckpt.save(0, _Weights(conversion.params), meta={"format": FORMAT, "kind": kind})
  finally:
    ckpt.close()
  files.write_json(out / MODEL_JSON, {"format": FORMAT, "kind": kind, SECTIONS[kind]: conversion.fields,
                                      **conversion.record})
  files.write_json(out / REPORT_JSON, dict(report))


def read_record(directory: str | os.PathLike, kind: str | None = None) -> dict:
  """`model.json` of a converted folder, lists turned back into tuples; `kind` checks what it holds.

  Raises:
    MissingInputError: no converted model there.
    MismatchError: it holds another kind of model, or another format.
  """
  path = epath.Path(directory) / MODEL_JSON
  record = files.read_json(path) if path.exists() else None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise MissingInputError(f"{directory} is not a converted model (no {MODEL_JSON} of format {FORMAT}): "
                            "make it with `python -m vqddm_jax.convert taming_vqgan|authors_unet "
                            "--ckpt=FILE --out=DIR`")
  if kind is not None and record.get("kind") != kind:
    raise MismatchError(f"{directory} holds a converted {record.get('kind')!r}, not a {kind!r}")
  for section in SECTIONS.values():
    if section in record:
      record[section] = {k: tuple(v) if isinstance(v, list) else v for k, v in record[section].items()}
  return record


def _restore(directory: str | os.PathLike, abstract: Any) -> Any:
  ckpt = checkpointing.Checkpointer(epath.Path(directory) / CHECKPOINT, read_only=True)
  try:
    return ckpt.restore_item("params", abstract, 0)
  finally:
    ckpt.close()


def load_vqvae(directory: str | os.PathLike) -> tuple[dict, Any]:
  """(config.vqvae fields, params) of a converted tokenizer; the params restore into
  `models.vqvae.build_vqvae(fields, channels)`'s tree, channels = `read_record(directory)['data']['channels']`.

  Raises:
    MissingInputError / MismatchError: not a converted tokenizer, or its arrays do not fit its model.json.
  """
  record = read_record(directory, "taming_vqgan")
  fields, data = record["vqvae"], record["data"]
  model = vqvae.build_vqvae(fields, data["channels"])
  x = jax.ShapeDtypeStruct((1, data["image_size"], data["image_size"], data["channels"]), jnp.float32)
  abstract = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), x)["params"]
  return fields, _restore(directory, abstract)


def load_unet(directory: str | os.PathLike) -> tuple[dict, Any]:
  """(config.prior fields, params) of a converted denoiser; the params restore into
  `models.unet.UNet(**fields, num_classes=K)`'s tree (dtype named), K = `read_record(directory)['num_codes']`.

  Raises:
    MissingInputError / MismatchError: not a converted denoiser, or its arrays do not fit its model.json.
  """
  record = read_record(directory, "authors_unet")
  fields = record["prior"]
  side = 2 ** (len(fields["ch_mult"]) - 1)
  abstract = unet.param_shapes(authors_unet.model_of(fields, record["num_codes"]), side, side)
  return fields, _restore(directory, abstract)
