#!/usr/bin/env python3
"""Runs vqddm_jax on a Cloud TPU VM (one host or a pod slice) through gcloud.

  python launch/tpu.py {create,setup,sync,run,status,logs,stop,delete,watch} --name=N --zone=Z [flags]

`--help` lists the commands, `COMMAND --help` their flags; docs/multihost.md is the runbook. `--dry_run` prints
the gcloud commands (one a line) and runs none. Every gcloud call goes through `gcloud()`; `$GCLOUD` may name
the binary (tpu_vm.py holds the gcloud side). On each worker (paths relative to the home directory):
`vqddm/` is the synced tree (its VERSION file holds the stamp of the synced files; `.vqddm_synced` marks it as
sync's, which sync alone may replace), `vqddm_venv/` the Python environment (launch/worker_setup.sh; it deletes
only one holding its `.vqddm_venv`), `vqddm_run/` the job's log, exit code and pid (launch/worker_run.sh).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

# launch/ is not a package: make its sibling module importable however this file is loaded.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tpu_vm import (DEFAULT_VERSION, REPO_ROOT, TPU_NAME, WORKER_RUN, LaunchError, Tpu,  # noqa: E402
                    check_workdir, job_reports, job_summary, num_workers, setup, start_job, sync)
from tpu_vm import RESUMABLE_EXIT_CODES  # noqa: E402


def _say(message: str) -> None:
  print(f"[watch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _deploy(tpu: Tpu, args: argparse.Namespace, overrides: list[str], workers: int) -> None:
  setup(tpu)
  sync(tpu)
  start_job(tpu, args, overrides, workers)


def cmd_watch(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> int:
  """Keeps a run alive on a preemptible TPU: recreate, set up, sync and rerun (which resumes) when it is lost."""
  workers = args.num_workers or num_workers(args.accelerator_type)
  check_workdir(args.workdir, workers)
  if tpu.dry_run:  # the commands of one poll and of one recovery
    tpu.state()
    tpu.delete()
    tpu.create(args.accelerator_type, args.version, args.spot, args.reserved)
    _deploy(tpu, args, overrides, workers)
    job_reports(tpu)
    return 0
  restarts, deploy, unreadable, idle_polls = 0, False, 0, 0

  def use_restart(why: str) -> None:
    nonlocal restarts
    if restarts >= args.max_restarts:
      raise LaunchError(f"{why}, but all --max_restarts={args.max_restarts} restarts are used")
    restarts += 1
    _say(f"{why}: restart {restarts} of {args.max_restarts}")

  def attempt(step, *step_args) -> bool:
    """Runs a step that needs the VM; False (instead of an error) when the VM was lost meanwhile."""
    try:
      step(*step_args)
      return True
    except LaunchError as e:
      if tpu.state() not in tpu.lost_states:
        raise
      _say(f"lost {tpu.name} again ({e})")
      return False

  while True:
    state = tpu.state()
    unreadable = unreadable + 1 if state is None else 0
    if unreadable >= 5:
      raise LaunchError(f"cannot describe {tpu.name} (5 tries in a row)")
    if state in tpu.lost_states:
      use_restart(f"{tpu.name} is {state}: deleting and recreating it")
      tpu.delete()
      tpu.create(args.accelerator_type, args.version, args.spot, args.reserved)
      deploy = True
    elif state == tpu.ready_state and deploy:
      _say(f"{tpu.name} is {state}: setup, sync, run")
      deploy = not attempt(_deploy, tpu, args, overrides, workers)
    elif state == tpu.ready_state:
      reports = job_reports(tpu)
      summary = job_summary(reports, workers)
      idle_polls = idle_polls + 1 if summary == "idle" else 0
      if summary == "finished":
        _say(f"the job finished on all {workers} workers")
        return 0
      if summary == "failed":
        failed = ", ".join(f"worker {w} exit {r.get('rc')}" for w, r in reports.items() if r["state"] == "failed")
        raise LaunchError(f"the job failed ({failed}): see python launch/tpu.py logs --name={tpu.name} "
                          f"--zone={tpu.zone} --worker=N")
      if summary == "stalled":  # A hung phase ended the job (the watchdog): rerunning resumes.
        codes = ", ".join(f"worker {w} exit {r.get('rc')}" for w, r in reports.items() if r["state"] == "failed")
        why = "; ".join(sorted({RESUMABLE_EXIT_CODES[r["rc"]] for r in reports.values()
                                if r.get("rc") in RESUMABLE_EXIT_CODES}))
        use_restart(f"the job stalled ({codes}: {why})")
        attempt(start_job, tpu, args, overrides, workers)
        time.sleep(args.poll_seconds)
        continue
      # Stopped but not finished (e.g. SIGTERM before a maintenance event): rerunning resumes. Seen twice, as a
      # job stopped by an imminent preemption would otherwise be restarted on a VM about to go.
      if idle_polls >= 2:
        use_restart("the job is not running and has not finished")
        idle_polls = 0
        attempt(start_job, tpu, args, overrides, workers)
      else:
        _say(f"{tpu.name} is {state}, job {summary}")
    else:
      _say(f"{tpu.name} is {state or 'not readable'}: waiting")
    time.sleep(args.poll_seconds)


# --- command line --------------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM name (also the queued resource's, with --queued): "
                      "lowercase letters, digits and hyphens, a letter first, at most 63 characters")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", default=None, help="default: gcloud's configured project")
  common.add_argument("--queued", action="store_true", help="the TPU is (to be) made through a queued resource")
  common.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run none")
  common.add_argument("--repo_root", type=pathlib.Path, default=REPO_ROOT, help="the tree to sync")
  shape = argparse.ArgumentParser(add_help=False)
  shape.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
  shape.add_argument("--num_workers", type=int, default=None, help="default: derived from --accelerator_type")
  make = argparse.ArgumentParser(add_help=False)
  make.add_argument("--version", default=DEFAULT_VERSION, help="TPU software version (VM image)")
  tier = make.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="spot capacity (preemptible; see watch)")
  tier.add_argument("--reserved", action="store_true", help="use the project's reservation")
  job = argparse.ArgumentParser(add_help=False)
  job.add_argument("--config", required=True, help="config file[:arg], relative to the repository root")
  job.add_argument("--workdir", required=True, help="the run's directory (gs://... on multi-worker TPUs)")
  job.add_argument("--mode", default=None, help="vqddm_jax.main --mode (default: all)")
  job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. JAX_COORDINATOR_PORT=8476 (repeatable)")
  job.add_argument("--skip_preflight", action="store_true", help="start without vqddm_jax.preflight")

  parser = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__.split("\n\n")[0],
                                   epilog="run/watch pass every --config.a.b=value on to vqddm_jax.main")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, parents, helptext in (
      ("create", [common, shape, make], "create the TPU VM (on-demand, --spot, --reserved; --queued)"),
      ("setup", [common], "Python 3.11 environment, requirements and jax[tpu] on every worker; device check"),
      ("sync", [common], "copy the working tree (git's tracked and unignored files) to every worker"),
      ("run", [common, shape, job], "start the job on every worker, detached, one log per worker"),
      ("status", [common], "describe the VM and the job on each worker"),
      ("logs", [common], "the end of one worker's log"),
      ("stop", [common], "SIGTERM the job (it saves a checkpoint), SIGKILL leftovers after a grace period"),
      ("delete", [common], "delete the TPU VM (or the queued resource)"),
      ("watch", [common, shape, make, job], "when the TPU is preempted: recreate, setup, sync, run (resumes)")):
    sub = commands.add_parser(name, parents=parents, help=helptext, description=helptext)
    if name == "logs":
      sub.add_argument("--worker", default="0", help="worker index (default 0)")
      sub.add_argument("--lines", type=int, default=100)
    elif name == "stop":
      sub.add_argument("--grace_seconds", type=int, default=300, help="time to save a checkpoint")
    elif name == "watch":
      sub.add_argument("--max_restarts", type=int, default=10)
      sub.add_argument("--poll_seconds", type=float, default=60.0)
  return parser


def _run_command(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> int:
  command = args.command
  if command == "create":
    if args.num_workers is None:
      num_workers(args.accelerator_type)  # refuses an unknown type before gcloud does, with the known ones
    tpu.create(args.accelerator_type, args.version, args.spot, args.reserved)
  elif command == "setup":
    setup(tpu)
  elif command == "sync":
    sync(tpu)
  elif command == "run":
    start_job(tpu, args, overrides, args.num_workers or num_workers(args.accelerator_type))
  elif command == "status":
    tpu.describe()
    tpu.ssh(f"{WORKER_RUN} status", check=False)
  elif command == "logs":
    tpu.ssh(f"{WORKER_RUN} logs {args.lines}", worker=args.worker)
  elif command == "stop":
    tpu.ssh(f"{WORKER_RUN} stop {args.grace_seconds}")
  elif command == "delete":
    tpu.delete()
  elif command == "watch":
    return cmd_watch(args, tpu, overrides)
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Overrides go to vqddm_jax.main untouched: taken out before argparse, which would split or reject them.
  overrides = [a for a in argv if a.startswith("--config.")]
  if bad := [o for o in overrides if "=" not in o]:
    print(f"tpu.py: write overrides as --config.a.b=value (one argument): {bad}", file=sys.stderr)
    return 2
  args = _build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
  if overrides and args.command not in ("run", "watch"):
    print(f"tpu.py {args.command}: --config.* overrides belong to run/watch: {overrides}", file=sys.stderr)
    return 2
  if not TPU_NAME.fullmatch(args.name):
    print(f"tpu.py {args.command}: --name={args.name!r} is not a TPU name: lowercase letters, digits and hyphens, "
          f"a letter first, no hyphen last, at most 63 characters ({TPU_NAME.pattern})", file=sys.stderr)
    return 2
  tpu = Tpu(args.name, args.zone, args.project, args.queued, args.dry_run, args.repo_root.resolve())
  try:
    return _run_command(args, tpu, overrides)
  except LaunchError as e:
    print(f"tpu.py {args.command}: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
