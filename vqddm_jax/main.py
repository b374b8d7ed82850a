"""Entry point: `python -m vqddm_jax.main --config=configs/mnist.py[:arg] --workdir=DIR [--mode=MODE]`.

Dispatch only, in this order: the config is validated without touching a device (after `--config.a.b=value`
overrides); `jax.distributed` starts on multi-host jobs; the checks that need the device count run; then the
stages of the registry (`vqddm_jax.stages`) run in order, each skipped when it is done. A user's mistake (bad
config, data not prepared, a missing checkpoint, a work directory made with another config) ends with one
line on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
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
    "override fields with --config.section.field=value. Without it, the config stored in the work "
    "directory (W/config.json, written by its first run) is used", lock_config=True)
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
flags.mark_flags_as_required(["workdir"])


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
  from vqddm_jax import agreement
  from vqddm_jax.code_version import code_version
  agreement.check_same_on_every_process("code", {"code version": code_version(), "mode": mode})
  flat = {k: v for k, v in _flatten(config.to_dict()).items() if not k.startswith("config.distributed.")}
  agreement.check_same_on_every_process("config", flat)


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
  """Everything after flag parsing; returns the exit code: 0, or 2 after printing a user's mistake.

  `config` None runs on the config stored in the work directory (`W/config.json`)."""
  try:
    from vqddm_jax import run_config
    from vqddm_jax.workdir import Workdir, check_not_in_synced_tree
    check_not_in_synced_tree(workdir_path)
    workdir = Workdir(workdir_path)
    if config is None:
      config = run_config.stored_config(workdir)
      logging.info("no --config: using the config stored in %s", workdir.config_json)
    config = prepare_config(config, mode=mode, sample_steps=sample_steps)
    from vqddm_jax import config_schema, parallel  # JAX is imported from here on.
    from vqddm_jax.training import watchdog
    parallel.use_host_cores(config.cpu_devices, config_schema.global_batch_sizes(config))
    parallel.initialize_distributed(config.distributed)
    parallel.set_ordered_reductions(config.ordered_reductions)
    watchdog.set_limit(config.train_watchdog_minutes)
    check_processes_agree(config, mode)
    config_schema.validate_for_devices(config, parallel.device_count(), parallel.process_count())
    with _workdir_lock(workdir):
      _check_stored_config(config, workdir)
      logging.info("config:\n%s", config)
      results = run_pipeline(config, workdir, mode)
  except UserError as e:
    print(f"vqddm_jax: {e}", file=sys.stderr)
    from vqddm_jax import job_end
    job_end.end_every_process(2, str(e))  # Multi-host: the others stop too (and this never returns).
    return 2
  if all(r.completed for r in results):
    logging.info("done: %s", workdir.root)
    if parallel.is_main_process():
      print(where_results_are(workdir))
  return 0


@contextlib.contextmanager
def _workdir_lock(workdir):
  """Process 0 holds `W/lock.json` while the stages run; a refusal ends every process of the job."""
  from vqddm_jax import agreement, parallel, run_lock
  lock, error = None, ""
  if parallel.is_main_process():
    lock = run_lock.WorkdirLock(workdir.lock_file)
    try:
      lock.acquire()
    except UserError as e:
      lock, error = None, str(e)
    else:
      from vqddm_jax import job_end
      job_end.before_leaving(lock.release)  # Also when the job ends through `job_end.leave` (os._exit).
  agreement.raise_if_any_process_failed(error)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _check_stored_config(config, workdir) -> None:
  """Refuses a config that differs from the work directory's in a field that defines the run; logs the
  accepted changes (run_config)."""
  from vqddm_jax import parallel, run_config
  from vqddm_jax.code_version import code_version
  accepted = run_config.check_or_record(config, workdir, code_version=code_version(),
                                        write=parallel.is_main_process())
  for field, old, new in accepted:
    logging.warning("config.%s: %r in %s, now %r (a rerun may change it)", field, old, workdir.config_json,
                    new)
  parallel.barrier("config.json written")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sys.exit(execute(_CONFIG.value, _WORKDIR.value, _MODE.value, _SAMPLE_STEPS.value))


def where_results_are(workdir) -> str:
  """The lines printed (by process 0) at the end of a run: where the samples and the reports are."""
  lines = [f"vqddm_jax: finished in {workdir.root}"]
  for name, prior in (("samples", "prior"), ("AR prior's samples", "ar")):
    grid = workdir.latest_samples_grid(prior)
    if grid is not None:
      lines.append(f"  {name}: {grid}")
  for name, path in (("evaluation report", workdir.eval_report("md")),
                     ("ReFiT report", workdir.refit_report("md"))):
    if path.exists():
      lines.append(f"  {name}: {path}")
  lines.append(f"  TensorBoard: tensorboard --logdir {workdir.root}")
  return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where a bad flag or a `--config.x.y=v` naming no field ends with one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: the override names a field the config lacks.
    name = str(e).strip("'\"")
    given = [a for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0].split(".")]
    message = (f"unknown config field {name!r} in {given[0] if given else 'a --config override'}: "
               "the config file defines the fields (see its get_config and vqddm_jax/config_schema.py)")
  print(f"vqddm_jax: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
