#!/usr/bin/env python3
"""Runs vqddm_jax on a Cloud TPU VM (one host or a pod slice) through gcloud.

  python launch/tpu.py COMMAND --name=N --zone=Z [flags]

`--help` lists the commands (COMMANDS below is their one table), `COMMAND --help` their flags; docs/multihost.md
is the runbook. `--dry_run` prints the gcloud commands (one a line) and runs none. Every gcloud call goes through
`gcloud()`; `$GCLOUD` may name the binary (tpu_vm.py holds the gcloud side). launch/ is not a package: run as a
script, this file has launch/ first on sys.path, which is how `import tpu_vm` finds its sibling (tests load both
by path). On each worker (paths relative to the home directory):
`vqddm/` is the synced tree (its VERSION file holds the stamp of the synced files; `.vqddm_synced` marks it as
sync's, which sync alone may replace), `vqddm_venv/` the Python environment (launch/worker_setup.sh; it deletes
only one holding its `.vqddm_venv`), `vqddm_run/` the job's log, exit code and pid (launch/worker_run.sh).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

from tpu_vm import (DEFAULT_VERSION, REPO_ROOT, RESUMABLE_EXIT_CODES, TPU_NAME, WORKER_RUN, LaunchError, Tpu,
                    check_workdir, job_reports, job_summary, num_workers, setup, start_job, sync)


def _say(message: str) -> None:
  print(f"[watch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _deploy(tpu: Tpu, args: argparse.Namespace, overrides: list[str], workers: int) -> None:
  setup(tpu)
  sync(tpu)
  start_job(tpu, args, overrides, workers)


def _watch_dry_run(tpu: Tpu, args: argparse.Namespace, overrides: list[str], workers: int) -> int:
  """Prints the commands of one poll and of one recovery."""
  tpu.state()
  tpu.delete()
  tpu.create(args.accelerator_type, args.version, args.spot, args.reserved)
  _deploy(tpu, args, overrides, workers)
  job_reports(tpu)
  return 0


def _exits(reports: dict[str, dict[str, str]]) -> str:
  return ", ".join(f"worker {w} exit {r.get('rc')}" for w, r in reports.items() if r["state"] == "failed")


def cmd_watch(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> int:
  """Keeps a run alive on a preemptible TPU: recreate, set up, sync and rerun (which resumes) when it is lost."""
  workers = args.num_workers or num_workers(args.accelerator_type)
  check_workdir(args.workdir, workers)
  if tpu.dry_run:
    return _watch_dry_run(tpu, args, overrides, workers)
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
        raise LaunchError(f"the job failed ({_exits(reports)}): see python launch/tpu.py logs --name={tpu.name} "
                          f"--zone={tpu.zone} --worker=N")
      if summary == "stalled":  # A hung phase ended the job (the watchdog): rerunning resumes.
        why = "; ".join(sorted({RESUMABLE_EXIT_CODES[r["rc"]] for r in reports.values()
                                if r.get("rc") in RESUMABLE_EXIT_CODES}))
        use_restart(f"the job stalled ({_exits(reports)}: {why})")
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


# --- the commands --------------------------------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  if args.num_workers is None:
    num_workers(args.accelerator_type)  # refuses an unknown type before gcloud does, with the known ones
  tpu.create(args.accelerator_type, args.version, args.spot, args.reserved)


def cmd_setup(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  setup(tpu)


def cmd_sync(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  sync(tpu)


def cmd_run(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  start_job(tpu, args, overrides, args.num_workers or num_workers(args.accelerator_type))


def cmd_status(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  tpu.describe()
  tpu.ssh(f"{WORKER_RUN} status", check=False)


def cmd_logs(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  tpu.ssh(f"{WORKER_RUN} logs {args.lines}", worker=args.worker)


def cmd_stop(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  tpu.ssh(f"{WORKER_RUN} stop {args.grace_seconds}")


def cmd_delete(args: argparse.Namespace, tpu: Tpu, overrides: list[str]) -> None:
  tpu.delete()


@dataclasses.dataclass(frozen=True)
class Command:
  """One command: its flag groups (after `common`, which all take; see _flag_groups), its help line, the function
  that runs it (`handler(args, tpu, overrides)`: an exit code, or None for 0) and its own flags (name and
  `add_argument` keywords)."""
  groups: tuple[str, ...]
  help: str
  handler: Callable[[argparse.Namespace, Tpu, list[str]], int | None]
  flags: tuple[tuple[str, dict[str, Any]], ...] = ()


COMMANDS = {
    "create": Command(("shape", "make"), "create the TPU VM (on-demand, --spot, --reserved; --queued)", cmd_create),
    "setup": Command((), "Python 3.11 environment, requirements and jax[tpu] on every worker; device check",
                     cmd_setup),
    "sync": Command((), "copy the working tree (git's tracked and unignored files) to every worker", cmd_sync),
    "run": Command(("shape", "job"), "start the job on every worker, detached, one log per worker", cmd_run),
    "status": Command((), "describe the VM and the job on each worker", cmd_status),
    "logs": Command((), "the end of one worker's log", cmd_logs,
                    (("--worker", {"default": "0", "help": "worker index (default 0)"}),
                     ("--lines", {"type": int, "default": 100}))),
    "stop": Command((), "SIGTERM the job (it saves a checkpoint), SIGKILL leftovers after a grace period", cmd_stop,
                    (("--grace_seconds", {"type": int, "default": 300, "help": "time to save a checkpoint"}),)),
    "delete": Command((), "delete the TPU VM (or the queued resource)", cmd_delete),
    "watch": Command(("shape", "make", "job"), "when the TPU is preempted: recreate, setup, sync, run (resumes)",
                     cmd_watch, (("--max_restarts", {"type": int, "default": 10}),
                                 ("--poll_seconds", {"type": float, "default": 60.0}))),
}
# The commands that start the job: they take the --config.* overrides, which they hand to vqddm_jax.main.
JOB_COMMANDS = tuple(name for name, command in COMMANDS.items() if "job" in command.groups)


# --- command line --------------------------------------------------------------------------------------------------

def _flag_groups() -> dict[str, argparse.ArgumentParser]:
  """The flags commands share, by group name (Command.groups)."""
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
  return {"common": common, "shape": shape, "make": make, "job": job}


def _build_parser() -> argparse.ArgumentParser:
  """The command line of COMMANDS: one sub-command each, with its groups' flags and its own."""
  groups = _flag_groups()
  epilog = f"{'/'.join(JOB_COMMANDS)} pass every --config.a.b=value on to vqddm_jax.main"
  parser = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__.split("\n\n")[0], epilog=epilog)
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, command in COMMANDS.items():
    sub = subparsers.add_parser(name, parents=[groups["common"], *(groups[g] for g in command.groups)],
                                help=command.help, description=command.help)
    for flag, options in command.flags:
      sub.add_argument(flag, **options)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Overrides go to vqddm_jax.main untouched: taken out before argparse, which would split or reject them.
  overrides = [a for a in argv if a.startswith("--config.")]
  if bad := [o for o in overrides if "=" not in o]:
    print(f"tpu.py: write overrides as --config.a.b=value (one argument): {bad}", file=sys.stderr)
    return 2
  args = _build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
  if overrides and args.command not in JOB_COMMANDS:
    print(f"tpu.py {args.command}: --config.* overrides belong to {'/'.join(JOB_COMMANDS)}: {overrides}",
          file=sys.stderr)
    return 2
  if not TPU_NAME.fullmatch(args.name):
    print(f"tpu.py {args.command}: --name={args.name!r} is not a TPU name: lowercase letters, digits and hyphens, "
          f"a letter first, no hyphen last, at most 63 characters ({TPU_NAME.pattern})", file=sys.stderr)
    return 2
  tpu = Tpu(args.name, args.zone, args.project, args.queued, args.dry_run, args.repo_root.resolve())
  try:
    return COMMANDS[args.command].handler(args, tpu, overrides) or 0
  except LaunchError as e:
    print(f"tpu.py {args.command}: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
