"""The work directory's stored config (`W/config.json`): the classification table, refused and accepted
changes on a rerun, runs without --config, unknown config fields on the command line, and the lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_config
from vqddm_jax import config_schema, main, run_config, run_lock
from vqddm_jax import files as files_lib
from vqddm_jax.errors import MismatchError
from vqddm_jax.workdir import Workdir

_CONFIGS = ("configs/mnist.py", "configs/mnist.py:tiny", "configs/celeba.py", "configs/celeba.py:authors",
            "configs/lsun_church.py")


def test_the_table_classifies_what_defines_a_run():
  fields = set()
  for spec in _CONFIGS:
    fields |= set(run_config.flatten(load_config(spec).to_dict()))
  # Every pattern of the table names a field that exists (no dead entries).
  import fnmatch
  for pattern in run_config.MAY_CHANGE:
    assert any(fnmatch.fnmatchcase(f, pattern) for f in fields), pattern
  defines = {"seed", "data.source", "data.image_folder", "data.image_size", "data.shuffle_buffer",
             "vqvae.codebook_size", "vqvae.ch_mult", "vqvae_train.optim.lr", "vqvae_train.perceptual_weight",
             "refit.enabled", "refit.num_codes", "refit.optim.lr", "diffusion.num_steps",
             "diffusion.schedule", "prior.ch", "prior_train.optim.lr", "prior_train.batch_size",
             "prior_train.ema_decay", "prior_train.hybrid_ce_weight", "discriminator.ndf"}
  may_change = {"vqvae_train.num_steps", "refit.num_steps", "prior_train.num_steps", "prior_train.log_every",
                "refit.checkpoint_every", "vqvae_train.eval_examples", "sample.num_samples",
                "sample.temperature", "eval.num_samples", "inpaint.mask", "distributed.num_processes",
                "cpu_devices", "data.data_dir", "encode.batch_size"}
  assert defines <= fields and may_change <= fields
  assert not any(run_config.may_change(f) for f in defines)
  assert all(run_config.may_change(f) for f in may_change)


def test_compare_refuses_defining_fields_and_accepts_the_rest():
  stored = load_config("configs/mnist.py:tiny")
  new = stored.copy_and_resolve_references()
  new.prior_train.optim.lr, new.prior_train.num_steps, new.vqvae.ch_mult = 5e-4, 99, (1, 2)
  refused, accepted = run_config.compare(run_config.config_dict(stored), run_config.config_dict(new))
  assert refused == [("prior_train.optim.lr", 1e-3, 5e-4), ("vqvae.ch_mult", [1, 2, 2], [1, 2])]
  assert accepted == [("prior_train.num_steps", 4, 99)]
  # A field the stored config lacks (added by newer code) is accepted; one the code dropped is ignored.
  old = run_config.config_dict(stored)
  del old["prior_train"]["hybrid_ce_weight"]
  old["prior_train"]["gone"] = 1
  refused, accepted = run_config.compare(old, run_config.config_dict(stored))
  assert refused == [] and accepted == [("prior_train.hybrid_ce_weight", "(not stored)", 0.0)]


def test_stored_config_round_trips_to_the_same_config():
  config = load_config("configs/celeba.py:authors")
  back = run_config.as_config(run_config.config_dict(config))
  assert back.to_dict() == config.to_dict()
  assert run_config.compare(run_config.config_dict(config), run_config.config_dict(back)) == ([], [])


def test_a_config_stored_by_older_code_gets_the_defaults_of_fields_added_since():
  """A work directory made before `edit` and the guidance fields existed: without --config its stored config
  gains their defaults (which keep the older behaviour) and validates, instead of naming them missing."""
  config = load_config("configs/celeba.py:authors")
  old = run_config.config_dict(config)
  del old["edit"], old["sample"]["guidance_scale"], old["prior"]["num_classes"]
  back = run_config.as_config(old)
  assert (back.sample.guidance_scale, back.prior.num_classes, back.edit.pairs) == (1.0, 0, 4)
  assert back.prior.ch == config.prior.ch  # stored fields win
  config_schema.validate_config(back)


def test_a_rerun_with_another_learning_rate_is_refused_and_more_steps_accepted(pipeline_run, tmp_path, capsys):
  """On the shared tiny run (its config.json written as `main` writes it): a changed learning rate stops with
  exit 2 naming the field and both values before any stage runs; more prior steps are accepted, logged and
  recorded in the file's history; without --config the stored config is used."""
  import shutil
  config, shared = pipeline_run
  shutil.copytree(shared.root, tmp_path / "w")
  workdir = Workdir(tmp_path / "w")
  before = workdir.config_json.read_text()
  changed = config.copy_and_resolve_references()
  changed.prior_train.optim.lr = 3e-4
  assert main.execute(changed, str(workdir.root), "train_prior") == 2
  err = capsys.readouterr().err
  assert "made with another config" in err and "prior_train.optim.lr: stored 0.001, now 0.0003" in err
  assert err.count("\n") <= 6 and "Traceback" not in err
  assert workdir.config_json.read_text() == before and not workdir.lock_file.exists()
  longer = config.copy_and_resolve_references()
  longer.prior_train.num_steps += 2
  assert main.execute(longer, str(workdir.root), "train_prior") == 0
  record = json.loads(workdir.config_json.read_text())
  assert record["config"]["prior_train"]["num_steps"] == longer.prior_train.num_steps
  assert record["history"][-1]["changed"] == {"prior_train.num_steps": [4, 6]}
  assert not workdir.lock_file.exists()
  # No --config: the stored config (with the accepted change) is the run's config.
  assert run_config.stored_config(workdir).prior_train.num_steps == longer.prior_train.num_steps
  assert main.execute(None, str(workdir.root), "train_prior") == 0
  assert main.execute(None, str(tmp_path / "fresh"), "sample") == 2
  assert "no stored config in" in capsys.readouterr().err


def test_a_corrupt_config_json_is_named(tmp_path):
  workdir = Workdir(tmp_path)
  workdir.config_json.write_text("{not json")
  with pytest.raises(MismatchError, match="config.json is not valid JSON"):
    run_config.check_or_record(load_config("configs/mnist.py:tiny"), workdir, code_version="x", write=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "vqddm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_unknown_config_fields_and_bad_values_end_with_one_line_and_exit_2(tmp_path):
  for override, says in (("--config.nosuch=1", "unknown config field 'nosuch' in --config.nosuch=1"),
                         ("--config.prior.nosuch=1", "unknown config field 'nosuch' in --config.prior.nosuch"),
                         ("--config.seed=abc", "flag --config.seed=abc")):
    out = _cli("--config=configs/mnist.py:tiny", f"--workdir={tmp_path}", override)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"vqddm_jax: {says}") and out.stderr.count("\n") == 1, out.stderr
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- the work-directory lock


def test_a_second_job_is_refused_while_the_first_holds_the_lock(tmp_path):
  path = Workdir(tmp_path).lock_file
  first = run_lock.WorkdirLock(path)
  with first:
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(MismatchError, match=f"another job runs in this work directory: process {os.getpid()} "
                       f"on {socket.gethostname()}"):
      run_lock.WorkdirLock(path).acquire()
    assert json.loads(path.read_text())["token"] == first.token  # The holder's lock is untouched.
  assert not path.exists()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
  path = Workdir(tmp_path).lock_file
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True, check=True)
  files_lib.write_json(path, {"token": "old", "host": socket.gethostname(), "pid": int(dead.stdout),
                                "heartbeat": time.time(), "started": "then"})
  with run_lock.WorkdirLock(path) as lock:
    assert json.loads(path.read_text())["token"] == lock.token


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_is_old(tmp_path):
  path = Workdir(tmp_path).lock_file
  holder = {"token": "old", "host": "elsewhere", "pid": 1, "started": "then"}
  files_lib.write_json(path, dict(holder, heartbeat=time.time() - 10))
  with pytest.raises(MismatchError, match="process 1 on elsewhere"):
    run_lock.WorkdirLock(path, stale_seconds=60).acquire()
  files_lib.write_json(path, dict(holder, heartbeat=time.time() - 120))
  with run_lock.WorkdirLock(path, stale_seconds=60) as lock:
    assert json.loads(path.read_text())["token"] == lock.token


def test_the_holder_renews_its_heartbeat(tmp_path):
  path = Workdir(tmp_path).lock_file
  with run_lock.WorkdirLock(path, heartbeat_seconds=0.05):
    first = json.loads(path.read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(path.read_text())["heartbeat"] > first


def test_main_refuses_a_held_work_directory_with_exit_2(tmp_path, capsys):
  config = load_config("configs/mnist.py:tiny")
  workdir = Workdir(tmp_path)
  with run_lock.WorkdirLock(workdir.lock_file):
    assert main.execute(config, str(tmp_path), "train_vqvae") == 2
  err = capsys.readouterr().err
  assert err.startswith("vqddm_jax: another job runs in this work directory") and "Traceback" not in err
  assert not workdir.vqvae.root.exists()
