"""Entry point: `python -m vqddm_jax.main --config=configs/mnist.py[:arg] --workdir=DIR [--mode=MODE]`.

Dispatch only: the config is validated (after `--config.a.b=value` overrides) before any work, then the
chosen stage runs. `--mode=all` runs every stage in order; each stage skips when its final checkpoint exists
and resumes when a partial one does.
"""
from __future__ import annotations

import os
import sys

# TensorFlow serves only the input pipeline: keep its logs quiet and its hands off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Mode name -> what it does (shown by --help); the pipeline runs them in this order for --mode=all.
MODES = {
    "all": "run every stage below in order, skipping finished ones",
    "train_vqvae": "stage 1: train the VQ-VAE on images (workdir/vqvae/)",
    "refit": "ReFiT: rebuild the codebook by k-means, fine-tune with the encoder frozen (workdir/refit/)",
    "encode": "encode training and held-out images to code maps (workdir/codes/)",
    "train_prior": "stage 2: train the discrete-diffusion prior on code maps (workdir/prior/)",
    "sample": "sample code maps with the prior and decode them (workdir/samples/<step>/)",
    "evaluate": "quality report: FD/KID/precision/recall, bits per code, usage, steps table (workdir/eval/)",
    "inpaint": "complete held-out images outside config.inpaint.mask (workdir/inpaint/); not in 'all'",
}
# Modes that --mode=all does not run.
EXTRA_MODES = ("inpaint",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, optionally FILE:arg (e.g. configs/mnist.py:tiny); "
    "override fields with --config.section.field=value", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory holding every stage of one run (stable path: "
                               "a restarted job resumes from it)")
_MODE = flags.DEFINE_enum("mode", "all", list(MODES), "what to run: " + "; ".join(
    f"{name} = {text}" for name, text in MODES.items()))
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", None, "reverse steps for --mode=sample and inpaint: 0 = all T, S < T = a strided subset "
    "(default: config.sample.steps)")
flags.mark_flags_as_required(["config", "workdir"])


def pipeline_modes() -> list[str]:
  return [m for m in MODES if m != "all" and m not in EXTRA_MODES]


def run_mode(mode: str, config, workdir: str, *, sample_steps: int | None = None) -> bool:
  """Runs one stage; returns False when it stopped early (SIGTERM) so the pipeline stops too."""
  if mode == "train_vqvae":
    from vqddm_jax.train.vqvae import train_vqvae
    return train_vqvae(config, workdir)[1]
  if mode == "refit":
    if not config.refit.enabled:
      logging.info("ReFiT disabled (config.refit.enabled = False): skipping")
      return True
    from vqddm_jax.train.refit import train_refit
    return train_refit(config, workdir)[1]
  if mode == "encode":
    from vqddm_jax.train.encode import encode_dataset
    return encode_dataset(config, workdir)
  if mode == "train_prior":
    from vqddm_jax.train.prior import train_prior
    return train_prior(config, workdir)[1]
  if mode == "sample":
    from vqddm_jax.sample import run_sample
    run_sample(config, workdir, sample_steps=sample_steps)
    return True
  if mode == "evaluate":
    from vqddm_jax.evaluate import run_evaluate
    run_evaluate(config, workdir)
    return True
  if mode == "inpaint":
    from vqddm_jax.inpaint import run_inpaint
    run_inpaint(config, workdir, sample_steps=sample_steps)
    return True
  raise ValueError(f"--mode={mode!r} is not one of {sorted(MODES)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from vqddm_jax import config_schema, parallel
  config = _CONFIG.value
  try:
    config_schema.validate_config(config)
    for field in ("vqvae_train.batch_size", "refit.batch_size", "encode.batch_size",
                  "prior_train.batch_size"):
      section, name = field.split(".")
      try:
        parallel.per_device_batch_size(config[section][name])
      except ValueError as e:
        raise ValueError(f"config.{field}: {e}") from None
    steps = _SAMPLE_STEPS.value
    if steps is not None and not 0 <= steps <= config.diffusion.num_steps:
      raise ValueError(f"--sample_steps = {steps} is not allowed: an integer in [0, "
                       f"{config.diffusion.num_steps}] (0 = all T = config.diffusion.num_steps)")
  except ValueError as e:
    print(f"vqddm_jax: invalid config: {e}", file=sys.stderr)
    sys.exit(2)
  parallel.maybe_initialize_distributed(config.distributed)
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  logging.info("config:\n%s", config)
  for mode in (pipeline_modes() if _MODE.value == "all" else [_MODE.value]):
    logging.info("=== %s ===", mode)
    if not run_mode(mode, config, workdir, sample_steps=_SAMPLE_STEPS.value):
      logging.warning("stopped during %s (SIGTERM); rerun the same command to resume", mode)
      return
  logging.info("done: %s", workdir)
  if _MODE.value == "all" and parallel.is_main_process():
    print(where_results_are(workdir))


def where_results_are(workdir: str) -> str:
  """The lines printed at the end of a pipeline run: where the samples and the report are."""
  import glob
  samples = sorted(glob.glob(os.path.join(workdir, "samples", "*", "samples_S*.png")),
                   key=os.path.getmtime)
  lines = [f"vqddm_jax: pipeline finished in {workdir}"]
  if samples:
    lines.append(f"  samples: {samples[-1]}")
  for name, path in (("evaluation report", "eval/report.md"), ("ReFiT report", "refit/report.md")):
    if os.path.exists(os.path.join(workdir, path)):
      lines.append(f"  {name}: {os.path.join(workdir, path)}")
  lines.append(f"  TensorBoard: tensorboard --logdir {workdir}")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
