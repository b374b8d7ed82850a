"""The stage registry on the shared tiny run: a finished work directory is skipped whole, a newer checkpoint
upstream reruns what depends on it, stale downstream training is refused, and users' mistakes exit with 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from vqddm_jax import checkpointing, main, stages
from vqddm_jax import files as files_lib
from vqddm_jax.errors import MismatchError
from vqddm_jax.stages import encode, train_prior
from vqddm_jax.workdir import Workdir


@pytest.fixture
def copied_run(pipeline_run, tmp_path):
  """A private copy of the shared tiny run's work directory: (config, Workdir)."""
  config, workdir = pipeline_run
  shutil.copytree(workdir.root, tmp_path / "w")
  return config.copy_and_resolve_references(), Workdir(tmp_path / "w")


def test_every_stage_has_the_stage_shape():
  for stage in stages.REGISTRY:
    module = stage.module()
    assert callable(module.run), stage.name
    # Either the stage says when it is done, or it declares its outputs and the registry compares records.
    assert callable(getattr(module, "is_done", None)) != callable(getattr(module, "outputs", None)), stage.name
  assert set(main.MODES) == {"all"} | set(stages.BY_NAME)
  assert [s.name for s in main.selected_stages("train_prior,sample")] == ["train_prior", "sample"]
  assert main.selected_stages("all") == stages.PIPELINE


def test_a_finished_workdir_is_skipped_whole(pipeline_run, capsys):
  config, workdir = pipeline_run
  results = main.run_pipeline(config, workdir, "all")
  assert [r.stage for r in results] == [s.name for s in stages.PIPELINE]
  assert all(r.skipped and r.completed for r in results)
  assert main.execute(config, str(workdir.root), "all") == 0
  out = capsys.readouterr().out
  assert "vqddm_jax: finished in" in out and "samples_S20_n16_seed1.png" in out and "eval/report.md" in out


def test_a_newer_prior_checkpoint_reruns_sample_and_evaluate(copied_run):
  config, workdir = copied_run
  config.prior_train.num_steps += 2
  assert not train_prior.is_done(config, workdir)
  assert stages.is_done(stages.BY_NAME["sample"], config, workdir) and stages.is_done(stages.BY_NAME["evaluate"], config, workdir)
  assert train_prior.run(config, workdir).completed  # Resumes from the finished checkpoint.
  new_step = checkpointing.latest_step(workdir.prior.checkpoints)
  assert new_step == config.prior_train.num_steps and train_prior.is_done(config, workdir)
  assert not stages.is_done(stages.BY_NAME["sample"], config, workdir) and not stages.is_done(stages.BY_NAME["evaluate"], config, workdir)
  result = stages.run_stage(stages.BY_NAME["sample"], config, workdir)
  assert not result.skipped and f"samples/{new_step}/" in result.outputs[0]
  assert stages.is_done(stages.BY_NAME["sample"], config, workdir)


def test_a_sampling_temperature_samples_a_set_of_its_own(copied_run):
  """sample.temperature ≠ 1 reruns sample and evaluate, writes `_tau` files beside the model's own samples
  (which stay), draws other codes with the same seed, and says τ in the records."""
  config, workdir = copied_run
  step = checkpointing.latest_step(workdir.prior.checkpoints)
  plain = workdir.samples(step, config.diffusion.num_steps, num_samples=config.sample.num_samples,
                          seed=config.sample.seed)
  config.sample.temperature = 0.5
  assert not stages.is_done(stages.BY_NAME["sample"], config, workdir) and not stages.is_done(stages.BY_NAME["evaluate"], config, workdir)
  result = stages.run_stage(stages.BY_NAME["sample"], config, workdir)
  tempered = workdir.samples(step, config.diffusion.num_steps, num_samples=config.sample.num_samples,
                             seed=config.sample.seed, temperature=0.5)
  assert result.outputs[0] == str(tempered.png) and tempered.png.name.endswith("_tau0.5.png")
  assert stages.is_done(stages.BY_NAME["sample"], config, workdir) and plain.png.exists()
  assert json.loads(tempered.record.read_text())["temperature"] == 0.5
  assert json.loads(plain.record.read_text())["temperature"] == 1.0
  plain_codes, tempered_codes = (files_lib.read_npz(f.npz)["codes"] for f in (plain, tempered))
  assert plain_codes.shape == tempered_codes.shape and (plain_codes != tempered_codes).any()


def test_training_on_stale_inputs_is_refused(copied_run):
  config, workdir = copied_run
  rebuild = files_lib.read_json(workdir.refit_rebuild)
  files_lib.write_json(workdir.refit_rebuild, dict(rebuild, stage1_step=rebuild["stage1_step"] - 2))
  with pytest.raises(MismatchError, match=r"ReFiT under .*/refit was made from vqvae step 2, but .*/vqvae now "
                     r"holds vqvae step 4\. To redo it, remove .*/refit, .*/codes, .*/prior"):
    stages.run_stage(stages.BY_NAME["refit"], config, workdir)
  files_lib.write_json(workdir.refit_rebuild, rebuild)
  meta_path = workdir.code_store / "meta.json"
  meta = files_lib.read_json(meta_path)
  files_lib.write_json(meta_path, dict(meta, step=meta["step"] + 100))
  with pytest.raises(MismatchError, match="the code maps under .*/codes were made from refit step 102.*"
                     "Rerun --mode=encode"):
    stages.run_stage(stages.BY_NAME["train_prior"], config, workdir)
  assert not encode.is_done(config, workdir)
  files_lib.write_json(meta_path, meta)
  # Encoding with another tokenizer (stage 1 itself) leaves a prior trained on the other code maps.
  no_refit = config.copy_and_resolve_references()
  no_refit.refit.enabled = False
  assert not stages.run_stage(stages.BY_NAME["encode"], no_refit, workdir).skipped
  with pytest.raises(MismatchError, match=r"the prior under .*/prior was made from code maps of refit step 2 "
                     r"\(K = 12\), but .*/codes now holds code maps of vqvae step 4 \(K = 16\)\. To redo it, "
                     r"remove .*/prior, .*/samples, .*/eval"):
    stages.run_stage(stages.BY_NAME["sample"], no_refit, workdir)


def test_sample_after_stage_1_trained_further_exits_2_naming_what_to_rerun(copied_run, capsys):
  """Stage 1 trained further: ReFiT, the code maps and the prior describe the old tokenizer, so sampling
  (which decodes with the tokenizer) stops, naming the first stale link and what to remove and rerun."""
  config, workdir = copied_run
  config.vqvae_train.num_steps += 2
  assert stages.run_stage(stages.BY_NAME["train_vqvae"], config, workdir).completed
  config.sample.seed += 1  # Something new to sample, so that only staleness can stop it.
  code, err = _execute(config, workdir.root, "sample", capsys)
  assert code == 2, err
  assert "ReFiT under" in err and "made from vqvae step 4" in err and "now holds vqvae step 6" in err
  assert "remove" in err and "/refit," in err and "/prior" in err and "--mode=all" in err
  assert "Traceback" not in err


def _execute(config, workdir, mode, capsys) -> tuple[int, str]:
  code = main.execute(config, str(workdir), mode)
  return code, capsys.readouterr().err


def test_users_mistakes_exit_2_with_one_message(copied_run, tmp_path, capsys):
  config, workdir = copied_run
  code, err = _execute(config, tmp_path / "empty", "sample", capsys)
  assert code == 2 and err.startswith("vqddm_jax: no code maps under") and "--mode=encode" in err
  code, err = _execute(config, tmp_path / "empty", "encode", capsys)
  assert code == 2 and "no checkpoint under" in err and "--mode=refit first" in err
  other = config.copy_and_resolve_references()
  other.prior.ch, other.sample.seed = 32, 5
  code, err = _execute(other, workdir.root, "sample", capsys)
  assert code == 2 and "made with another config" in err and "prior.ch: stored 16, now 32" in err
  bad_png = tmp_path / "mask.png"
  bad_png.write_bytes(b"not a picture")
  masked = config.copy_and_resolve_references()
  masked.inpaint.mask = str(bad_png)
  code, err = _execute(masked, workdir.root, "inpaint", capsys)
  assert code == 2 and "cannot read it as an image" in err and str(bad_png) in err
  celeba = load_config("configs/celeba.py")
  celeba.data.data_dir = str(tmp_path / "no_data")
  celeba.prior_train.batch_size = 1504  # divisible by the 8 test devices
  code, err = _execute(celeba, tmp_path / "c", "train_vqvae", capsys)
  assert code == 2 and "is not prepared" in err and "tfds build celeb_a_hq" in err
  assert "Traceback" not in err


def test_cli_user_error_is_one_line_on_stderr_and_exit_2(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-m", "vqddm_jax.main", "--config=configs/mnist.py:tiny",
                        f"--workdir={tmp_path}", "--mode=train_prior"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert f"vqddm_jax: no code maps under {tmp_path}/codes: run --mode=encode first" in out.stderr


def test_report_records_what_made_it(pipeline_run):
  config, workdir = pipeline_run
  inputs = json.loads(workdir.eval_report("json").read_text())["inputs"]
  assert inputs["prior_step"] == config.prior_train.num_steps and inputs["tokenizer"] == "refit"
  assert inputs["eval"]["num_samples"] == config.eval.num_samples
