"""launch/tpu.py's command line comes from its one command table and runs as a script; the code version the job's
processes compare and the VERSION stamp sync writes are one hash (vqddm_jax/code_version.py)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from test_launch import LAUNCH, ROOT, repo, tpu, tpu_vm  # noqa: F401  (fixtures)
from vqddm_jax.code_version import code_files, code_version, files_version


def _code_tree(root):
  """A tree of the files code_version covers: vqddm_jax/**/*.py, configs/*.py, requirements.txt."""
  (root / "vqddm_jax" / "sub").mkdir(parents=True)
  (root / "configs").mkdir()
  (root / "vqddm_jax" / "sub" / "a.py").write_text("x = 1\n")
  (root / "configs" / "c.py").write_text("c = 1\n")
  (root / "requirements.txt").write_text("jax\n")


@pytest.mark.parametrize("name", list(tpu.COMMANDS))
def test_every_command_of_the_table_is_on_the_command_line(capsys, name):
  with pytest.raises(SystemExit) as exit_:
    tpu.main([name, "--help"])
  out = capsys.readouterr().out
  assert exit_.value.code == 0 and out.startswith(f"usage: python launch/tpu.py {name} "), out
  for flag, _ in tpu.COMMANDS[name].flags:
    assert flag in out
  # The job's flags, and with them the --config.* overrides, belong to the commands that start the job.
  assert ("--workdir WORKDIR" in out) == (name in ("run", "watch")) == (name in tpu.JOB_COMMANDS)


def test_tpu_py_runs_as_a_script_from_anywhere(tmp_path, repo):
  """No sys.path set-up in the code: Python puts launch/ first on sys.path for the script, which finds tpu_vm
  there, and tpu_vm loads vqddm_jax/code_version.py by its path (-E: no PYTHONPATH; cwd outside the repository)."""
  def script(*args):
    return subprocess.run([sys.executable, "-E", "-s", str(LAUNCH / "tpu.py"), *args], cwd=tmp_path,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)

  listing = script("--help")
  assert listing.returncode == 0, listing.stderr
  assert all(name in listing.stdout for name in tpu.COMMANDS)
  sync = script("sync", "--name=vqddm-v4", "--zone=us-central2-b", "--dry_run", f"--repo_root={repo}")
  assert sync.returncode == 0, sync.stderr
  stamp = files_version(repo, tpu_vm.list_tree(repo))
  assert f"sync: 4 files of {repo}, version {stamp}\n" == sync.stderr
  assert len(sync.stdout.splitlines()) == 3  # status, scp, swap
  bad = script("sync", "--name=vqddm-v4", "--zone=us-central2-b", "--dry_run", "--config.a=1")
  assert bad.returncode == 2 and "overrides belong to run/watch" in bad.stderr


def test_the_launcher_hashes_with_the_package_function(tmp_path):
  assert pathlib.Path(tpu_vm.code_version.__file__) == ROOT / "vqddm_jax" / "code_version.py"
  # A synced tree that holds only the code files: its VERSION stamp is the code version of the processes.
  _code_tree(tmp_path)
  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
  paths = tpu_vm.list_tree(tmp_path)
  assert paths == [f.relative_to(tmp_path).as_posix() for f in code_files(tmp_path)]
  assert tpu_vm.code_version.files_version(tmp_path, paths) == code_version(tmp_path)


def test_code_version(tmp_path):
  _code_tree(tmp_path)
  first = code_version(tmp_path)
  assert re.fullmatch(r"[0-9a-f]{12}", first) and code_version(tmp_path) == first
  (tmp_path / "vqddm_jax" / "notes.txt").write_text("not code")
  assert code_version(tmp_path) == first
  (tmp_path / "requirements.txt").write_text("jax==0.10.2\n")
  assert code_version(tmp_path) != first
