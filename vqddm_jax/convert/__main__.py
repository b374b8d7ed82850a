"""`python -m vqddm_jax.convert taming_vqgan|authors_unet --ckpt=FILE --out=DIR`: converts a peer checkpoint.

  python -m vqddm_jax.convert taming_vqgan --ckpt=last.ckpt [--config=model.yaml | --resolution=256] --out=DIR
  python -m vqddm_jax.convert authors_unet --ckpt=unet.pth [--num_steps=4000] --out=DIR

Reads the file without PyTorch (`lightning_ckpt`: objects of unknown classes are never imported or run; a
file that would call one is refused), infers the model's config, maps every tensor onto our model's
parameters (or stops, listing missing, unexpected and mis-shaped names), writes DIR (`imported`) and prints
what it did. A user's mistake prints one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vqddm_jax.convert import authors_unet, imported, lightning_ckpt, mapping, taming
from vqddm_jax.errors import UserError
from vqddm_jax.models import unet

PROG = "python -m vqddm_jax.convert"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="kind", required=True)
  vq = sub.add_parser("taming_vqgan", help="taming-transformers VQGAN (.ckpt) -> config.vqvae + params")
  vq.add_argument("--config", help="the model's taming yaml (model.params.ddconfig): its resolution places "
                  "attention, and it is checked against the checkpoint")
  vq.add_argument("--resolution", type=int, help=f"the nominal image size without --config (default "
                  f"{taming.DEFAULT_RESOLUTION}, every released tokenizer's)")
  un = sub.add_parser("authors_unet",
                      help="the VQ-DDM authors' UNet (state dict or .ckpt) -> config.prior + params")
  un.add_argument("--num_steps", type=int, default=authors_unet.AUTHORS_STEPS,
                  help="T the network was trained with (sets time_scale = 4000 / T)")
  for p in (vq, un):
    p.add_argument("--ckpt", required=True,
                   help="the PyTorch file (Lightning .ckpt or torch.save'd state dict)")
    p.add_argument("--out", required=True, help="a new folder for the converted model")
  return parser


def _source_line(path: str, state: dict, info: dict) -> str:
  if not info:
    return f"read {path}: a state dict of {len(state)} tensors"
  meta = ", ".join(f"{k} {info[k]}" for k in ("epoch", "global_step", "pytorch-lightning_version") if k in info)
  return (f"read {path}: a Lightning checkpoint ({meta or 'no epoch/step'}; other entries, not read as "
          f"weights: {', '.join(info['other_entries']) or 'none'}); state_dict: {len(state)} tensors")


def _report(kind: str, path: str, state: dict, info: dict, conv: mapping.Conversion) -> dict[str, Any]:
  dtypes = sorted({str(state[e.torch].dtype) for e in conv.names.entries})
  return {"source": os.path.abspath(path), "kind": kind, "checkpoint_entries": info,
          "tensors_in_file": len(state), "tensors_mapped": len(conv.names.entries),
          "parameters": unet.count_params(conv.params), "source_dtypes": dtypes, "notes": conv.notes,
          "ignored": conv.ignored, "names": {e.path: e.torch for e in conv.names.entries}}


def convert(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the command line `argv` (without the program name) and returns the report it wrote."""
  args = _parser().parse_args(argv)
  state, info = lightning_ckpt.read_checkpoint(args.ckpt)
  if args.kind == "taming_vqgan":
    conv = taming.convert(state, source=args.ckpt, config=args.config, resolution=args.resolution)
  else:
    conv = authors_unet.convert(state, source=args.ckpt, num_steps=args.num_steps)
  report = _report(args.kind, args.ckpt, state, info, conv)
  imported.write(args.out, args.kind, conv, report)
  section = imported.SECTIONS[args.kind]
  print(_source_line(args.ckpt, state, info))
  print(f"{args.kind} -> config.{section}: " + ", ".join(f"{k}={v}" for k, v in conv.fields.items()))
  print("  also: " + ", ".join(f"{k}={v}" for k, v in conv.record.items()))
  for note in conv.notes:
    print(f"  note: {note}")
  ignored = f"; ignored {len(conv.ignored)} tensors ({_ignored_what(args.kind)})" if conv.ignored else ""
  print(f"mapped {report['tensors_mapped']} tensors ({', '.join(report['source_dtypes'])}) onto "
        f"{report['tensors_mapped']} arrays, {report['parameters']:,} parameters, none missing or left over"
        f"{ignored}")
  print(f"wrote {args.out}/: {imported.CHECKPOINT}/ (Orbax), {imported.MODEL_JSON}, {imported.REPORT_JSON}")
  return report


def _ignored_what(kind: str) -> str:
  return (f"under '{taming.IGNORED_PREFIX}': taming's LPIPS and discriminator, not part of the tokenizer"
          if kind == "taming_vqgan" else "outside the network's prefix")


def main(argv: list[str] | None = None) -> int:
  try:
    convert(argv)
  except UserError as e:  # A refused, missing or mismatched input: one line, no traceback (as argparse does).
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
