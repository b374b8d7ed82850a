"""launch/ deletes nothing it did not make: sync's marker on a fake worker, worker_setup.sh's venv marker, --name,
and work directories inside the synced code tree (launch's side; vqddm_jax's side is in test_workdir.py)."""
import shutil
import subprocess

import pytest

from test_launch import COMMON, LAUNCH, fake_gcloud, repo, statuses, tpu, tpu_vm  # noqa: F401  (fixtures)
from vqddm_jax import workdir as workdir_lib

MARKER = ".vqddm_synced"


def test_the_marker_is_one_name():
  assert tpu_vm.SYNC_MARKER == workdir_lib.SYNC_MARKER == MARKER


# --- sync on a fake worker -----------------------------------------------------------------------------------------

def _worker(fake, home):
  set_script, _, _ = fake
  home.mkdir(exist_ok=True)
  set_script({"home": str(home), "ssh": {"worker_run.sh status": statuses("finished")}})


def _sync(repo):
  return tpu.main(["sync", *COMMON, f"--repo_root={repo}"])


def _own(home, kind):
  """Puts something of the user's at ~/vqddm (or ~/vqddm.new); returns the path to keep."""
  if kind == "clone":
    (home / "vqddm" / "vqddm_jax").mkdir(parents=True)
    (home / "vqddm" / "vqddm_jax" / "mine.py").write_text("my work\n")
    return home / "vqddm" / "vqddm_jax" / "mine.py"
  if kind == "old_sync":  # a copy from before the marker: VERSION is no proof of whose it is
    (home / "vqddm").mkdir()
    (home / "vqddm" / "VERSION").write_text("abcdef012345\n")
    return home / "vqddm" / "VERSION"
  if kind == "file":
    (home / "vqddm").write_text("a file, not a folder\n")
    return home / "vqddm"
  if kind == "symlink":
    (home / "elsewhere").mkdir()
    (home / "elsewhere" / "mine.txt").write_text("mine\n")
    (home / "vqddm").symlink_to(home / "elsewhere")
    return home / "elsewhere" / "mine.txt"
  (home / "vqddm.new").mkdir()  # "staging": the folder sync unpacks into
  (home / "vqddm.new" / "mine.txt").write_text("mine\n")
  return home / "vqddm.new" / "mine.txt"


@pytest.mark.parametrize("kind", ["clone", "old_sync", "file", "symlink", "staging"])
def test_sync_refuses_a_directory_it_did_not_make(fake_gcloud, capfd, repo, tmp_path, kind):
  home = tmp_path / "worker"
  _worker(fake_gcloud, home)
  keep = _own(home, kind)
  before = keep.read_text()
  assert _sync(repo) == 1
  err = capfd.readouterr().err
  name = "vqddm.new" if kind == "staging" else "vqddm"
  assert f"sync refuses to replace {home}/{name}: it was not made by launch/tpu.py sync (no {MARKER}" in err, err
  assert "worker " in err and "deleted nothing" in err
  assert keep.read_text() == before
  assert not (home / "vqddm" / MARKER).exists() and not (home / "vqddm" / "train.py").exists()


def test_sync_replaces_its_own_copy(fake_gcloud, repo, tmp_path):
  home = tmp_path / "worker"
  _worker(fake_gcloud, home)
  assert _sync(repo) == 0  # nothing there yet
  code = home / "vqddm"
  assert (code / MARKER).is_file() and (code / "train.py").read_text() == "print('train')\n"
  assert (code / "VERSION").read_text().strip() == tpu_vm.code_version.files_version(repo, tpu_vm.list_tree(repo))
  assert sorted(p.name for p in home.iterdir()) == ["vqddm"]  # no archive, no staging folder left
  (code / "stale.py").write_text("deleted locally\n")
  (repo / "train.py").write_text("print('train v2')\n")
  (home / "vqddm.new").mkdir()  # an interrupted sync's empty staging folder
  assert _sync(repo) == 0
  assert not (code / "stale.py").exists() and (code / "train.py").read_text() == "print('train v2')\n"
  assert (code / MARKER).is_file() and sorted(p.name for p in home.iterdir()) == ["vqddm"]


# --- worker_setup.sh -----------------------------------------------------------------------------------------------

FAKE_UV = """#!/bin/bash
echo "$*" >>"$UV_LOG"
if [[ $1 == venv ]]; then
  dir=${!#}
  mkdir -p "$dir/bin"
  printf '#!/bin/sh\\nexit 0\\n' >"$dir/bin/python"
  chmod +x "$dir/bin/python"
  [[ -z ${UV_FAIL:-} ]] || exit 1
fi
"""


def _setup(tmp_path, **env):
  """Runs worker_setup.sh as `setup` does (copied beside requirements.txt) with a fake `uv` on PATH.

  The fake's environments hold a `bin/python` that answers every check with exit 0.
  """
  folder, bin_dir = tmp_path / "vqddm_setup", tmp_path / "bin"
  if not folder.exists():
    folder.mkdir()
    bin_dir.mkdir()
    shutil.copy(LAUNCH / "worker_setup.sh", folder)
    (folder / "requirements.txt").write_text("jax==0.10.2\n")
    (bin_dir / "uv").write_text(FAKE_UV)
    (bin_dir / "uv").chmod(0o755)
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "UV_LOG": str(tmp_path / "uv.log"),
         "VQDDM_VENV": str(tmp_path / "venv"), **env}
  return subprocess.run(["bash", str(folder / "worker_setup.sh")], env=env, capture_output=True, text=True,
                        timeout=60)


def _python(venv, rc):
  """A fake interpreter in `venv`: exit 0 passes the version check, 1 fails it."""
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(f"#!/bin/sh\nexit {rc}\n")
  (venv / "bin" / "python").chmod(0o755)


def _uv_calls(tmp_path):
  log = tmp_path / "uv.log"
  return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("python", [None, 1])  # no interpreter; one of the wrong version
def test_worker_setup_refuses_a_venv_it_did_not_make(tmp_path, python):
  venv = tmp_path / "venv"
  venv.mkdir()
  (venv / "mine.txt").write_text("mine\n")
  if python is not None:
    _python(venv, python)
  result = _setup(tmp_path)
  assert result.returncode != 0
  assert f"worker_setup.sh: {venv} exists but is not a Python 3.11 environment that this script made" in \
      result.stderr and ".vqddm_venv" in result.stderr, result.stderr
  assert (venv / "mine.txt").read_text() == "mine\n"
  assert not any(c.startswith(("venv", "pip")) for c in _uv_calls(tmp_path))


def test_worker_setup_remakes_only_its_own_venv(tmp_path):
  venv = tmp_path / "venv"
  first = _setup(tmp_path)  # nothing there: made and marked
  assert first.returncode == 0, first.stderr
  assert (venv / ".vqddm_venv").is_file() and f"venv --python 3.11 {venv}" in _uv_calls(tmp_path)
  (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # now of the wrong version: made again
  (venv / "old.txt").write_text("")
  again = _setup(tmp_path)
  assert again.returncode == 0, again.stderr
  assert not (venv / "old.txt").exists() and (venv / ".vqddm_venv").is_file()
  assert _uv_calls(tmp_path).count(f"venv --python 3.11 {venv}") == 2


def test_worker_setup_keeps_a_users_venv_of_the_right_python(tmp_path):
  venv = tmp_path / "venv"
  _python(venv, 0)
  result = _setup(tmp_path)
  assert result.returncode == 0 and f"keeping {venv}" in result.stdout, result.stderr
  assert not (venv / ".vqddm_venv").exists()  # still not ours to delete later
  assert not any(c.startswith("venv") for c in _uv_calls(tmp_path))


def test_worker_setup_removes_what_a_failed_uv_venv_left(tmp_path):
  result = _setup(tmp_path, UV_FAIL="1")
  assert result.returncode != 0
  assert not (tmp_path / "venv").exists()  # the next run starts clean instead of refusing an unmarked folder


# --- --name and --workdir ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["My-tpu", "vqddm_v4", "4tpu", "tpu-", "-tpu", "a" * 64, "a b", "x;rm -rf ~",
                                  "tpu:x", ""])
def test_bad_name_exits_2(capsys, name):
  assert tpu.main(["status", f"--name={name}", "--zone=us-central2-b", "--dry_run"]) == 2
  out, err = capsys.readouterr()
  assert out == ""  # no gcloud command
  assert len(err.splitlines()) == 1 and f"--name={name!r} is not a TPU name" in err
  assert "[a-z]([-a-z0-9]{0,61}[a-z0-9])?" in err


@pytest.mark.parametrize("name", ["a", "a" * 63, "vqddm-v4-2"])
def test_good_names_pass(capsys, name):
  assert tpu.main(["status", f"--name={name}", "--zone=us-central2-b", "--dry_run"]) == 0
  assert f"describe {name} " in capsys.readouterr().out


@pytest.mark.parametrize("workdir, ok", [("~/vqddm", False), ("~/vqddm/runs/x", False), ("~/vqddm/../runs/x", True),
                                         ("~/vqddm_runs/x", True), ("~/runs/x", True)])
def test_run_refuses_a_workdir_in_the_code_directory(capsys, workdir, ok):
  args = ["run", *COMMON, "--accelerator_type=v4-8", "--config=configs/mnist.py", f"--workdir={workdir}", "--dry_run"]
  assert tpu.main(args) == (0 if ok else 1)
  if not ok:
    assert "the code directory that the next `sync` replaces whole" in capsys.readouterr().err
