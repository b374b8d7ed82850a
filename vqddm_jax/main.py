"""Entry point: `python -m vqddm_jax.main --config=configs/mnist.py[:arg] --workdir=DIR [--mode=MODE]`.

Dispatch only, in this order: the config is validated without touching a device (after `--config.a.b=value`
overrides); `jax.distributed` starts on multi-host jobs; the checks that need the device count run; then the
stages of the registry (`vqddm_jax.stages`) run in order, each skipped when it is done. A user's mistake (bad
config, data not prepared, a missing checkpoint, a work directory made with another config) ends with one
line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys

# TensorFlow serves only the input pipeline: keep its logs quiet and its hands off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vqddm_jax import stages  # noqa: E402  (imports no JAX: stage modules load on use)
from vqddm_jax.errors import UserError  # noqa: E402

MODES = {"all": "run every pipeline stage below in order, skipping finished ones",
         **{s.name: s.help + ("" if s.in_pipeline else "; not in 'all'") for s in stages.REGISTRY}}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, optionally FILE:arg (e.g. configs/mnist.py:tiny); "
    "override fields with --config.section.field=value", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory (or gs:// URI) holding every stage of one run "
                               "(stable path: a restarted job resumes from it)")
_MODE = flags.DEFINE_string("mode", "all", "what to run: 'all', or one stage or a comma-separated list of "
                            "stages run in that order (e.g. train_prior,sample): " + "; ".join(
                                f"{name} = {text}" for name, text in MODES.items()))
flags.register_validator("mode", lambda m: all(part in MODES for part in m.split(",")) and (
    m == "all" or "all" not in m.split(",")), message=f"--mode must be 'all' or stages among "
    f"{', '.join(s.name for s in stages.REGISTRY)} (comma-separated)")
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", None, "reverse steps for --mode=sample/all (config.sample.steps) and --mode=inpaint "
    "(config.inpaint.steps): 0 = all T, S < T = a strided subset")
flags.mark_flags_as_required(["config", "workdir"])


def selected_stages(mode: str) -> tuple[stages.Stage, ...]:
  """The stages `--mode` names: the pipeline for 'all', else the listed stages in the given order."""
  return stages.PIPELINE if mode == "all" else tuple(stages.BY_NAME[m] for m in mode.split(","))


def prepare_config(config, *, mode: str, sample_steps: int | None):
  """Folds `--sample_steps` into the config and validates it (no device needed).

  Raises:
    ConfigError: naming the field (or flag), the value and what is allowed.
  """
  from vqddm_jax import config_schema
  from vqddm_jax.errors import ConfigError
  if sample_steps is not None:
    if not 0 <= sample_steps <= config.diffusion.num_steps:
      raise ConfigError(f"--sample_steps = {sample_steps} is not allowed: an integer in [0, "
                        f"{config.diffusion.num_steps}] (0 = all T = config.diffusion.num_steps)")
    section = config.inpaint if "inpaint" in mode.split(",") else config.sample
    section.steps = sample_steps
  return config_schema.validate_config(config)


def check_processes_agree(config, mode: str) -> None:
  """On multi-host jobs: every process runs the same code, mode and config (the distributed section aside,
  which names each process); raises MismatchError naming what differs."""
  from vqddm_jax import parallel
  from vqddm_jax.code_version import code_version
  parallel.check_same_on_every_process("code", {"code version": code_version(), "mode": mode})
  flat = {k: v for k, v in _flatten(config.to_dict()).items() if not k.startswith("config.distributed.")}
  parallel.check_same_on_every_process("config", flat)


def _flatten(tree: dict, prefix: str = "config.") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def run_pipeline(config, workdir, mode: str) -> list[stages.StageResult]:
  """Runs the stages of `mode` in order; stops after a stage that did not complete (SIGTERM)."""
  results = []
  for stage in selected_stages(mode):
    logging.info("=== %s ===", stage.name)
    result = stages.run_stage(stage, config, workdir)
    results.append(result)
    if not result.completed:
      logging.warning("stopped during %s (SIGTERM); rerun the same command to resume", stage.name)
      break
  return results


def execute(config, workdir_path: str, mode: str, sample_steps: int | None = None) -> int:
  """Everything after flag parsing; returns the exit code: 0, or 2 after printing a user's mistake."""
  try:
    config = prepare_config(config, mode=mode, sample_steps=sample_steps)
    from vqddm_jax import config_schema, parallel  # JAX is imported from here on.
    parallel.use_host_cores(config.cpu_devices, config_schema.global_batch_sizes(config))
    parallel.initialize_distributed(config.distributed)
    parallel.set_ordered_reductions(config.ordered_reductions)
    check_processes_agree(config, mode)
    config_schema.validate_for_devices(config, parallel.device_count(), parallel.process_count())
    from vqddm_jax.workdir import Workdir
    workdir = Workdir(workdir_path)
    logging.info("config:\n%s", config)
    results = run_pipeline(config, workdir, mode)
  except UserError as e:
    print(f"vqddm_jax: {e}", file=sys.stderr)
    return 2
  if all(r.completed for r in results):
    logging.info("done: %s", workdir.root)
    if parallel.is_main_process():
      print(where_results_are(workdir))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sys.exit(execute(_CONFIG.value, _WORKDIR.value, _MODE.value, _SAMPLE_STEPS.value))


def where_results_are(workdir) -> str:
  """The lines printed (by process 0) at the end of a run: where the samples and the reports are."""
  lines = [f"vqddm_jax: finished in {workdir.root}"]
  grid = workdir.latest_samples_grid()
  if grid is not None:
    lines.append(f"  samples: {grid}")
  for name, path in (("evaluation report", workdir.eval_report("md")),
                     ("ReFiT report", workdir.refit_report("md"))):
    if path.exists():
      lines.append(f"  {name}: {path}")
  lines.append(f"  TensorBoard: tensorboard --logdir {workdir.root}")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
