"""The Cloud TPU VM side of `launch/tpu.py`: gcloud calls, the worker count of an accelerator type, syncing the
tree with a version stamp (`vqddm_jax/code_version.files_version` over the synced files), and starting, checking
and summarising the job on every worker.

Every gcloud call goes through `gcloud()`; `$GCLOUD` may name the binary. On each worker (paths relative to
the home directory, where `gcloud ... ssh --command` starts): `vqddm/` is the synced tree (its VERSION file
holds the stamp of the synced files, its SYNC_MARKER file says sync made it), `vqddm_venv/` the Python
environment (launch/worker_setup.sh), `vqddm_run/` the job's log, exit code and pid (launch/worker_run.sh).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_DIR = "vqddm"
SETUP_DIR = "vqddm_setup"
REMOTE_ARCHIVE = "vqddm-sync.tar.gz"
WORKER_RUN = f"bash {CODE_DIR}/launch/worker_run.sh"
DEFAULT_VERSION = "tpu-ubuntu2204-base"
# Written at the top of every tree sync puts on a worker: sync replaces (deletes) only a directory that holds it,
# never a user's own `~/vqddm`. The same name as vqddm_jax.workdir.SYNC_MARKER, which refuses a work directory
# inside such a tree: a copy, as importing vqddm_jax would take another sys.path entry and numpy (a test compares).
SYNC_MARKER = ".vqddm_synced"
# TPU VM names (RFC 1035 labels, as Compute Engine names): what gcloud would refuse, refused before any call.
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


class LaunchError(Exception):
  """A problem the user has to fix; printed without a traceback."""


def _load_code_version():
  """vqddm_jax/code_version.py of this checkout, loaded by its path (stdlib only, and the package is not on
  sys.path here): its `files_version` is the one hash the project has, so the VERSION stamp sync writes and the
  code version the job's processes compare are computed by the same function."""
  spec = importlib.util.spec_from_file_location("vqddm_launch_code_version",
                                                REPO_ROOT / "vqddm_jax" / "code_version.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


code_version = _load_code_version()


def gcloud(args: list[str], *, dry_run: bool, capture: bool = False, check: bool = True,
           cwd: pathlib.Path = REPO_ROOT) -> subprocess.CompletedProcess:
  """Runs one gcloud command, or prints it (`shlex.join`) when `dry_run`: the only place gcloud is called.

  Returns:
    The finished process; its stdout is text when `capture` (else it went to the terminal), empty in a dry run.
  Raises:
    LaunchError: the command failed and `check`.
  """
  argv = [os.environ.get("GCLOUD", "gcloud"), *args]
  if dry_run:
    print(shlex.join(argv), flush=True)
    return subprocess.CompletedProcess(argv, 0, "", "")
  try:
    result = subprocess.run(argv, cwd=cwd, text=True, stdout=subprocess.PIPE if capture else None)
  except FileNotFoundError:
    raise LaunchError(f"{argv[0]} not found: install the Google Cloud SDK or name the binary in $GCLOUD") from None
  if check and result.returncode:
    raise LaunchError(f"this command failed (exit {result.returncode}):\n  {shlex.join(argv)}")
  return result


# --- Accelerator types -> number of worker VMs -------------------------------------------------------------------

# GEN -> (TensorCores per unit of the size M in "GEN-M", chips per host, largest one-host slice in chips).
# v2, v3, v4 and v5p count TensorCores, 2 per chip: v4-32 = 16 chips = 4 hosts of 4 chips; v4-8 is one host.
# v5e (v5litepod-M) and v6e count chips: up to 8 chips are one host (v6e-8), larger slices put 4 chips on each
# host (v5litepod-16: 4 hosts, v6e-256: 64 hosts).
GENERATIONS = {"v2": (2, 4, 4), "v3": (2, 4, 4), "v4": (2, 4, 4), "v5p": (2, 4, 4),
               "v5litepod": (1, 4, 8), "v5e": (1, 4, 8), "v6e": (1, 4, 8)}


def num_workers(accelerator_type: str) -> int:
  """Number of worker VMs of an accelerator type such as `v4-32` (see GENERATIONS).

  Raises:
    LaunchError: an unknown generation or a size that generation does not come in.
  """
  generation, _, size = accelerator_type.rpartition("-")
  if generation not in GENERATIONS or not size.isdigit() or int(size) <= 0:
    raise LaunchError(f"unknown accelerator type {accelerator_type!r}: expected GEN-SIZE with GEN one of "
                      f"{', '.join(GENERATIONS)} (or give --num_workers)")
  (cores_per_unit, chips_per_host, max_single_host), size = GENERATIONS[generation], int(size)
  if size % cores_per_unit:
    raise LaunchError(f"{accelerator_type}: {generation} sizes count TensorCores, 2 per chip (e.g. {generation}-8)")
  chips = size // cores_per_unit
  if chips <= max_single_host:
    return 1
  if chips % chips_per_host:
    raise LaunchError(f"{accelerator_type}: {chips} chips do not fill hosts of {chips_per_host} chips")
  return chips // chips_per_host


# --- The TPU VM ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Tpu:
  """One TPU VM (or queued resource of the same name) and the gcloud commands that act on it."""
  name: str
  zone: str
  project: str | None
  queued: bool
  dry_run: bool
  repo_root: pathlib.Path

  @property
  def ready_state(self) -> str:
    return "ACTIVE" if self.queued else "READY"

  @property
  def lost_states(self) -> tuple[str, ...]:
    # A preempted spot VM cannot be restarted, only deleted and made again; a queued resource whose node was
    # preempted turns SUSPENDED.
    return ("SUSPENDED", "FAILED") if self.queued else ("PREEMPTED", "TERMINATED")

  def location(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def call(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return gcloud(args, dry_run=self.dry_run, cwd=self.repo_root, **kwargs)

  def ssh(self, command: str, worker: str = "all", **kwargs) -> subprocess.CompletedProcess:
    return self.call(["compute", "tpus", "tpu-vm", "ssh", self.name, *self.location(), f"--worker={worker}",
                      f"--command={command}"], **kwargs)

  def scp(self, sources: list[str], dest: str) -> None:
    self.call(["compute", "tpus", "tpu-vm", "scp", *sources, f"{self.name}:{dest}", *self.location(),
               "--worker=all"])

  def create(self, accelerator_type: str, version: str, spot: bool, reserved: bool) -> None:
    tier = ["--spot"] if spot else ["--reserved"] if reserved else []
    if self.queued:
      self.call(["compute", "tpus", "queued-resources", "create", self.name, *self.location(),
                 f"--node-id={self.name}", f"--accelerator-type={accelerator_type}",
                 f"--runtime-version={version}", *tier])
    else:
      self.call(["compute", "tpus", "tpu-vm", "create", self.name, *self.location(),
                 f"--accelerator-type={accelerator_type}", f"--version={version}", *tier])

  def delete(self) -> None:
    if self.queued:  # --force deletes the node with its queued resource
      self.call(["compute", "tpus", "queued-resources", "delete", self.name, *self.location(), "--force",
                 "--quiet"])
    else:
      self.call(["compute", "tpus", "tpu-vm", "delete", self.name, *self.location(), "--quiet"])

  def describe(self, state_only: bool = False) -> subprocess.CompletedProcess:
    kind = "queued-resources" if self.queued else "tpu-vm"
    fmt = ["--format=value(state.state)" if self.queued else "--format=value(state)"] if state_only else []
    return self.call(["compute", "tpus", kind, "describe", self.name, *self.location(), *fmt],
                     capture=state_only, check=not state_only)

  def state(self) -> str | None:
    """The VM's (queued resource's) state, e.g. READY or PREEMPTED; None when describe fails."""
    result = self.describe(state_only=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


# --- setup, sync ---------------------------------------------------------------------------------------------------

def setup(tpu: Tpu) -> None:
  """Copies the set-up script and requirements to every worker and runs it there (see worker_setup.sh)."""
  tpu.ssh(f"mkdir -p {SETUP_DIR}")
  tpu.scp(["launch/worker_setup.sh", "requirements.txt"], f"{SETUP_DIR}/")
  tpu.ssh(f"bash {SETUP_DIR}/worker_setup.sh")


def list_tree(root: pathlib.Path) -> list[str]:
  """The files to sync: tracked and untracked-but-not-ignored files that exist, sorted."""
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise LaunchError(f"cannot list the files of {root} with git ({e})") from None
  # --cached also names files deleted from the working tree but not yet from the index.
  return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})


def swap_command() -> str:
  """The shell command (POSIX sh, one line) that puts the uploaded archive in place of CODE_DIR on a worker.

  It unpacks beside the old tree and swaps, so files deleted locally disappear on the workers too. It deletes
  CODE_DIR and its staging folder only when they hold SYNC_MARKER (or do not exist): anything else there is
  the user's, and the worker refuses (exit 3, naming itself and the directory) before deleting anything.
  """
  new = f"{CODE_DIR}.new"
  refuse = (f"echo \"worker $(hostname): sync refuses to replace $PWD/$d: it was not made by launch/tpu.py sync "
            f"(no {SYNC_MARKER} in it); move it away, then sync again\" >&2; exit 3")
  return (f"rmdir {new} 2>/dev/null; "  # an empty staging folder left by an interrupted sync (rmdir keeps others)
          f"for d in {CODE_DIR} {new}; do if {{ [ -e \"$d\" ] || [ -L \"$d\" ]; }} && "
          f"[ ! -f \"$d/{SYNC_MARKER}\" ]; then {refuse}; fi; done; "
          f"rm -rf {new} && mkdir {new} && tar -xzf {REMOTE_ARCHIVE} -C {new} && rm -rf {CODE_DIR} && "
          f"mv {new} {CODE_DIR} && rm -f {REMOTE_ARCHIVE}")


def _add_file(tar: tarfile.TarFile, name: str, text: str) -> None:
  data = text.encode()
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), int(time.time())
  tar.addfile(info, fileobj=io.BytesIO(data))


def sync(tpu: Tpu) -> str:
  """Copies the working tree to every worker's CODE_DIR (replacing it whole) with its stamp in VERSION.

  Refuses while a job runs: it imports modules lazily, and replacing its tree under it would break it. A worker
  whose CODE_DIR was not made by sync (no SYNC_MARKER) keeps it and fails the command (see swap_command).
  """
  running = [w for w, r in job_reports(tpu).items() if r.get("state") == "running"]
  if running:
    raise LaunchError(f"a job is running on workers {', '.join(running)}: stop it first (python launch/tpu.py "
                      f"stop --name={tpu.name} --zone={tpu.zone})")
  root = tpu.repo_root
  paths = list_tree(root)
  stamp = code_version.files_version(root, paths)
  archive = pathlib.Path(tempfile.gettempdir()) / f"vqddm-sync-{stamp}.tar.gz"
  print(f"sync: {len(paths)} files of {root}, version {stamp}", file=sys.stderr, flush=True)
  if not tpu.dry_run:
    with tarfile.open(archive, "w:gz") as tar:
      # The marker first: a staging folder that an interrupted unpacking leaves behind is marked already.
      _add_file(tar, SYNC_MARKER, "Made by launch/tpu.py sync: the next sync deletes this directory and puts "
                                  "a new copy in its place. Keep nothing of your own in it.\n")
      for path in paths:
        tar.add(root / path, arcname=path, recursive=False)
      _add_file(tar, "VERSION", stamp + "\n")
  try:
    tpu.scp([str(archive)], REMOTE_ARCHIVE)
    try:
      tpu.ssh(swap_command())
    except LaunchError as e:
      raise LaunchError(f"{e}\na worker that said above that it refuses to replace a directory deleted nothing "
                        f"there: move that directory away on that worker and sync again") from None
  finally:
    if not tpu.dry_run:
      archive.unlink(missing_ok=True)
  return stamp


# --- run -----------------------------------------------------------------------------------------------------------

def _worker_key(worker: str) -> tuple:
  return (0, int(worker), "") if worker.isdigit() else (1, 0, worker)


def parse_reports(output: str, tag: str) -> dict[str, dict[str, str]]:
  """Lines `TAG worker=W key=value ...` (worker_run.sh's answers) -> {W: {key: value}}."""
  reports = {}
  for line in output.splitlines():
    words = line.split()
    if words and words[0] == tag:
      fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
      reports[fields.pop("worker", "?")] = fields
  return reports


def job_reports(tpu: Tpu) -> dict[str, dict[str, str]]:
  """Each worker's job state (worker_run.sh status); workers that cannot be reached are missing."""
  result = tpu.ssh(f"{WORKER_RUN} status", capture=True, check=False)
  return parse_reports(result.stdout, "vqddm-status")


def version_problem(stamps: dict[str, str], workers: int) -> str | None:
  """Why the workers' VERSION stamps do not allow a run (None when they all hold the same synced code)."""
  listing = "\n".join(f"  worker {w}: {v}" for w, v in sorted(stamps.items(), key=lambda i: _worker_key(i[0])))
  if len(stamps) < workers:
    return (f"only {len(stamps)} of {workers} workers reported a VERSION stamp (the others have no synced code "
            f"or could not be reached):\n{listing}")
  if len(set(stamps.values())) > 1 or "missing" in stamps.values():
    return f"the workers do not hold the same code (VERSION stamps differ):\n{listing}"
  return None


def check_versions(tpu: Tpu, workers: int) -> None:
  """Refuses to run unless every worker holds the same synced code; notes when it is not the local tree."""
  result = tpu.ssh(f"{WORKER_RUN} stamp", capture=True, check=False)
  if tpu.dry_run:
    return
  stamps = {w: f.get("version", "?") for w, f in parse_reports(result.stdout, "vqddm-stamp").items()}
  problem = version_problem(stamps, workers)
  if problem:
    raise LaunchError(f"{problem}\nsync the code to every worker first: python launch/tpu.py sync "
                      f"--name={tpu.name} --zone={tpu.zone}")
  try:
    local = code_version.files_version(tpu.repo_root, list_tree(tpu.repo_root))
  except LaunchError:
    return
  if local not in stamps.values():
    print(f"note: the workers run version {next(iter(stamps.values()))}, your working tree is {local}: `sync` "
          f"to run your current code", file=sys.stderr)


def check_workdir(workdir: str, workers: int) -> None:
  if workdir.startswith("gs://"):
    return
  if workers > 1:
    raise LaunchError(f"--workdir={workdir}: a job on {workers} workers needs a work directory every host "
                      f"sees; give a gs://BUCKET/PATH one (each worker's local disk holds only its own shards)")
  if not workdir.startswith(("/", "~")):  # the job starts in the code directory, which `sync` replaces whole
    raise LaunchError(f"--workdir={workdir}: give gs://BUCKET/PATH or an absolute path on the worker")
  if os.path.normpath(workdir) == f"~/{CODE_DIR}" or os.path.normpath(workdir).startswith(f"~/{CODE_DIR}/"):
    raise LaunchError(f"--workdir={workdir} lies in ~/{CODE_DIR}, the code directory that the next `sync` "
                      f"replaces whole: give another directory, e.g. ~/runs/NAME")


def main_command(args: argparse.Namespace, overrides: list[str], workers: int) -> list[str]:
  """The command every worker runs: `python -m vqddm_jax.main ...` (multi-host jobs join jax.distributed)."""
  command = ["python", "-m", "vqddm_jax.main", f"--config={args.config}", f"--workdir={args.workdir}"]
  command += [f"--mode={args.mode}"] if args.mode else []
  command += ["--config.distributed.enabled=True"] if workers > 1 else []
  return command + overrides


def start_job(tpu: Tpu, args: argparse.Namespace, overrides: list[str], workers: int) -> None:
  """Starts the job on every worker after checking the work directory and the workers' code."""
  check_workdir(args.workdir, workers)
  check_versions(tpu, workers)
  options = ["--no-preflight"] if args.skip_preflight else []
  options += [f"--env={kv}" for kv in args.env]
  # One shell word per argument: the remote shell gives worker_run.sh exactly these arguments.
  tpu.ssh(f"{WORKER_RUN} start {shlex.join([*options, '--', *main_command(args, overrides, workers)])}")


# --- watch ---------------------------------------------------------------------------------------------------------

# Exit codes of vqddm_jax.main after which a rerun resumes (vqddm_jax/training/watchdog.py: EXIT_STALLED).
RESUMABLE_EXIT_CODES = {"75": "a training phase hung past config.train_watchdog_minutes (the watchdog)"}


def job_summary(reports: dict[str, dict[str, str]], workers: int) -> str:
  """One word for the job over all workers, from worker_run.sh's status reports.

  `failed` (a worker exited non-zero), `running`, `finished` (all exited 0 on their own), `idle` (none runs and
  not all finished: stopped by SIGTERM, killed, or never started: a rerun resumes), `stalled` (none runs and a
  worker exited with a code of RESUMABLE_EXIT_CODES: the other workers' failures followed from it, and a rerun
  resumes) or `unknown` (workers missing).
  """
  states = [r.get("state") for r in reports.values()]
  stalled = any(r.get("state") == "failed" and r.get("rc") in RESUMABLE_EXIT_CODES for r in reports.values())
  if "failed" in states and not stalled:
    return "failed"
  if "running" in states:
    return "running"
  if len(reports) < workers:
    return "unknown"
  if stalled:
    return "stalled"
  return "finished" if all(s == "finished" for s in states) else "idle"
