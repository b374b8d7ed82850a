"""The autoregressive prior beside the diffusion prior on a copy of the shared tiny run: `train_ar` (its
outputs, exact resume after SIGTERM), sampling, inpainting and evaluation with both priors, and the lineage
link 'ar' (a stale AR prior is refused, naming it and what to remove; a disabled one is never checked)."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import load_config, sigterm_training_at
from vqddm_jax import checkpointing, lineage, main, run_config, stages
from vqddm_jax import files as files_lib
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import MismatchError, MissingInputError
from vqddm_jax.stages import train_ar
from vqddm_jax.training import loop
from vqddm_jax.workdir import Workdir

_SAMPLE, _INPAINT, _EVALUATE = (stages.BY_NAME[n] for n in ("sample", "inpaint", "evaluate"))


@dataclasses.dataclass(frozen=True)
class ARRun:
  """The shared tiny run's work directory, copied, with the AR prior added and trained by `train_ar`."""
  config: object  # configs/mnist.py:tiny,compare
  workdir: Workdir
  accepted: list  # What `run_config.check_or_record` accepted when the AR prior was enabled.
  prior_files: dict  # W/prior's files (size, mtime) before train_ar ran.
  result: stages.StageResult

  def copy(self, dest: pathlib.Path) -> tuple[object, Workdir]:
    """A private copy of this work directory (and of the config) for a test that changes it."""
    shutil.copytree(self.workdir.root, dest)
    return self.config.copy_and_resolve_references(), Workdir(dest)


def _listing(root) -> dict[str, tuple[int, int]]:
  root = pathlib.Path(str(root))
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
          if p.is_file()}


@pytest.fixture(scope="module")
def ar_run(pipeline_run, tmp_path_factory) -> ARRun:
  """Adds the AR prior to a copy of the shared run (as `--config=configs/mnist.py:tiny,compare` on the same
  --workdir would) and trains it once (4 steps)."""
  base, shared = pipeline_run
  config = load_config("configs/mnist.py:tiny,compare")
  config.data.data_dir = base.data.data_dir
  root = tmp_path_factory.mktemp("compare") / "w"
  shutil.copytree(shared.root, root)
  workdir = Workdir(root)
  prior_files = _listing(workdir.prior.root)
  accepted = run_config.check_or_record(config, workdir, code_version="test", write=True)  # As `main` does.
  result = stages.run_stage(stages.BY_NAME["train_ar"], config, workdir)
  return ARRun(config, workdir, accepted, prior_files, result)


# ---------------------------------------------------------------------------------------- config and train_ar


def test_enabling_the_ar_prior_is_accepted_but_another_ar_width_is_refused(ar_run):
  fields = {field: (old, new) for field, old, new in ar_run.accepted}
  assert fields["ar_train.enabled"] == (False, True)
  stored = files_lib.read_json(ar_run.workdir.config_json)
  assert stored["config"]["ar_train"]["enabled"] is True
  assert stored["history"][-1]["changed"]["ar_train.enabled"] == [False, True]
  wider = ar_run.config.copy_and_resolve_references()
  wider.ar.width = 32
  with pytest.raises(MismatchError, match=r"these fields define the run and differ:\n  ar\.width: stored 16, "
                     r"now 32\n"):
    run_config.check_or_record(wider, ar_run.workdir, code_version="test", write=True)
  assert files_lib.read_json(ar_run.workdir.config_json) == stored  # Nothing written on a refusal.


def test_train_ar_writes_its_folder_records_the_code_maps_and_leaves_the_prior_alone(ar_run):
  config, workdir = ar_run.config, ar_run.workdir
  assert ar_run.result.completed and not ar_run.result.skipped
  assert ar_run.result.outputs == (str(workdir.ar.root),)
  assert checkpointing.latest_step(workdir.ar.checkpoints) == config.ar_train.num_steps == 4
  assert train_ar.is_done(config, workdir) and workdir.ar.tensorboard.exists()
  k = codes_lib.read_meta(workdir.code_store)["codebook_size"]
  ev = json.loads(workdir.ar.eval_json.read_text())
  assert ev["step"] == 4 and ev["num_maps"] == config.ar_train.eval_examples == 32
  assert ev["uniform_bits_per_code"] == pytest.approx(np.log2(k))
  # 4 steps inside a 200-step warm-up: the EMA model is still about uniform over the K codes.
  assert np.isfinite(ev["bits_per_code"]) and 0.5 * np.log2(k) < ev["bits_per_code"] < np.log2(k) + 0.25
  assert np.isfinite(ev["stderr"]) and 0 < ev["stderr"] < 0.1
  # Its checkpoints record the code maps they were trained on; the diffusion prior's folder is untouched.
  held = lineage.holds(config, workdir, "codes")
  assert held is not None and held["codebook_size"] == k
  assert lineage.made_from(config, workdir, "ar") == held
  assert _listing(workdir.prior.root) == ar_run.prior_files
  assert checkpointing.latest_step(workdir.prior.checkpoints) == config.prior_train.num_steps
  assert stages.run_stage(stages.BY_NAME["train_ar"], config, workdir).skipped  # Done: not trained again.


def test_ar_resume_after_sigterm_is_exact(ar_run, monkeypatch, tmp_path):
  """SIGTERM after step 2, resume to step 4: every array of the state equals the uninterrupted run's."""
  config, reference = ar_run.config, ar_run.workdir
  fresh = Workdir(tmp_path / "w")
  shutil.copytree(reference.code_store, fresh.code_store)  # All train_ar reads: a fresh copy without W/ar.
  real_run = sigterm_training_at(monkeypatch, 2)
  result = train_ar.run(config, fresh)
  assert not result.completed and not train_ar.is_done(config, fresh)
  assert checkpointing.latest_step(fresh.ar.checkpoints) == 2
  monkeypatch.setattr(loop, "run", real_run)
  assert train_ar.run(config, fresh).completed and train_ar.is_done(config, fresh)
  assert checkpointing.latest_step(fresh.ar.checkpoints) == 4
  for item in ("step", "params", "ema_params", "opt_state"):
    ours = jax.tree_util.tree_leaves(checkpointing.read_item(fresh.ar.checkpoints, item, 4))
    theirs = jax.tree_util.tree_leaves(checkpointing.read_item(reference.ar.checkpoints, item, 4))
    assert len(ours) == len(theirs) > 0, item
    for a, b in zip(ours, theirs, strict=True):
      np.testing.assert_array_equal(a, b, err_msg=item)
  assert json.loads(fresh.ar.eval_json.read_text()) == json.loads(reference.ar.eval_json.read_text())


# ---------------------------------------------------------------------------- sample, inpaint and evaluate


def _mtimes(files) -> list[int]:
  return [os.stat(str(p)).st_mtime_ns for p in (files.png, files.npz, files.record)]


def test_sample_writes_both_sets_and_redoes_only_the_ar_set_after_more_ar_training(ar_run, tmp_path):
  config, workdir = ar_run.copy(tmp_path / "w")
  scfg, k = config.sample, codes_lib.read_meta(workdir.code_store)["codebook_size"]
  code_shape = codes_lib.load_codes(workdir.code_store, config.data.eval_split).shape[1:]
  diffusion = workdir.samples(checkpointing.latest_step(workdir.prior.checkpoints), config.diffusion.num_steps,
                              num_samples=scfg.num_samples, seed=scfg.seed)
  ar_files = lambda step: workdir.ar_samples(step, num_samples=scfg.num_samples, seed=scfg.seed)  # noqa: E731
  assert diffusion.png.exists()  # The shared run sampled the diffusion prior already.
  kept = _mtimes(diffusion)
  first = stages.run_stage(_SAMPLE, config, workdir)
  assert first.outputs == (str(ar_files(4).png), str(ar_files(4).npz))  # Only the new prior's set is made.
  assert str(ar_files(4).png).endswith("samples/ar/4/samples_n16_seed1.png") and ar_files(4).record.exists()
  assert stages.run_stage(_SAMPLE, config, workdir).skipped and stages.is_done(_SAMPLE, config, workdir)
  # Two more AR steps: only the AR set is redone, under the new step; the diffusion set is not rewritten.
  config.ar_train.num_steps = 6
  assert not train_ar.is_done(config, workdir) and train_ar.run(config, workdir).completed
  assert not stages.is_done(_SAMPLE, config, workdir)
  again = stages.run_stage(_SAMPLE, config, workdir)
  assert again.outputs == (str(ar_files(6).png), str(ar_files(6).npz)) and ar_files(4).npz.exists()
  assert _mtimes(diffusion) == kept
  record = json.loads(ar_files(6).record.read_text())
  assert record["ar_step"] == 6 and record["num_samples"] == scfg.num_samples and "prior_step" not in record
  codes = files_lib.read_npz(ar_files(6).npz)["codes"]
  assert codes.shape == (scfg.num_samples,) + tuple(code_shape)
  assert codes.min() >= 0 and codes.max() < k and len(np.unique(codes)) > 1
  summary = main.where_results_are(workdir)  # The end-of-run lines name both priors' newest grids.
  assert f"  samples: {diffusion.png}" in summary and f"  AR prior's samples: {ar_files(6).png}" in summary


def test_inpaint_completes_with_the_diffusion_prior_and_both_ar_protocols(ar_run):
  config, workdir = ar_run.config.copy_and_resolve_references(), ar_run.workdir
  n, k = config.ar_sample.candidates, codes_lib.read_meta(workdir.code_store)["codebook_size"]
  result = stages.run_stage(_INPAINT, config, workdir)
  assert not result.skipped and stages.is_done(_INPAINT, config, workdir)
  name = config.inpaint.mask  # left_half: not a raster prefix, so the two AR protocols differ.
  folders = {"diffusion": workdir.inpaint(name), "prefix": workdir.inpaint(name, "ar_prefix"),
             "reweight": workdir.inpaint(name, f"ar_reweight{n}")}
  assert str(folders["reweight"].npz).endswith(f"inpaint/{name}/ar_reweight4/inpaint.npz")
  known = None
  for method, files in folders.items():
    assert files.png.exists() and files.record.exists(), method
    res = files_lib.read_npz(files.npz)
    m = res["mask"]
    assert res["codes"].shape == res["known"].shape == (config.inpaint.num_images,) + m.shape[1:], method
    assert 0 < m.mean() < 1
    np.testing.assert_array_equal(res["codes"][m], res["known"][m], err_msg=method)
    assert res["codes"].min() >= 0 and res["codes"].max() < k, method
    assert not np.array_equal(res["codes"][~m], res["known"][~m]), method
    if known is not None:  # The same held-out images and mask for every method.
      np.testing.assert_array_equal(res["known"], known)
    known = res["known"]
    record = json.loads(files.record.read_text())
    assert record.get("protocol") == (None if method == "diffusion" else method), method
  res = files_lib.read_npz(folders["reweight"].npz)
  assert res["ess"].shape == (config.inpaint.num_images,)
  assert np.all(res["ess"] >= 1 - 1e-5) and np.all(res["ess"] <= n + 1e-5)
  assert np.all(np.isfinite(res["log_weight"]))
  assert stages.run_stage(_INPAINT, config, workdir).skipped


def test_evaluate_reports_the_two_priors_side_by_side(ar_run):
  config, workdir = ar_run.config.copy_and_resolve_references(), ar_run.workdir
  config.inpaint.steps = 4  # The diffusion prior's completions in one chunk of the sampler: a faster test.
  assert not stages.is_done(_EVALUATE, config, workdir)  # The shared run's report has no AR prior.
  assert not stages.run_stage(_EVALUATE, config, workdir).skipped
  report = json.loads(workdir.eval_report("json").read_text())
  comparison, draws = report["comparison"], config.eval.sample_draws
  diffusion, ar = comparison["priors"]
  h, w = codes_lib.load_codes(workdir.code_store, config.data.eval_split).shape[1:]
  assert diffusion["network_calls_per_sample"] == config.diffusion.num_steps == 20
  assert ar["network_calls_per_sample"] == h * w == 64
  ar_eval = json.loads(workdir.ar.eval_json.read_text())
  assert ar["bits_per_code"] == ar_eval["bits_per_code"] and ar["bits_kind"] == "exact"
  assert report["heldout_ar_bits"] == ar_eval  # Next to the diffusion prior's `heldout_nelbo`.
  assert diffusion["bits_per_code"] == json.loads(workdir.prior.eval_json.read_text())["nelbo_bits_per_code"]
  for row in (diffusion, ar):
    assert row["parameters"] > 0 and row["flops_per_sample"] > 0 and np.isfinite(row["bits_per_code"])
    assert row["draws"] == draws == 2
    for metric in ("fd", "kid", "precision", "recall"):
      assert np.isfinite(row["mean"][metric]) and row["std"][metric] >= 0, (row["prior"], metric)
  rows = comparison["inpainting"]
  protocols = ["ar_prefix", f"ar_reweight{config.ar_sample.candidates}"]
  assert [(r["mask"], r["protocol"]) for r in rows] == [
      (mask, p) for mask in config.eval.compare_masks
      for p in ("reverse process, known codes re-noised", *protocols)]
  for r in rows:
    assert r["draws"] == draws and r["images"] == config.eval.inpaint_images
    assert all(np.isfinite(r["mean"][m]) for m in ("fd", "kid", "precision", "recall")), r
    assert (r["ess_mean"] is None) == (not r["protocol"].startswith("ar_reweight"))
  ess = [r["ess_mean"] for r in rows if r["ess_mean"] is not None]
  assert ess and all(1 - 1e-5 <= e <= config.ar_sample.candidates + 1e-5 for e in ess)
  md = workdir.eval_report("md").read_text()
  assert "## The two priors on the same code maps" in md and "autoregressive (GPT, raster order)" in md
  assert "Held-out bits per code of the AR prior" in md
  assert workdir.eval_ar_samples_grid.exists() and "samples_ar.png" in md
  assert report["inputs"]["ar"]["ar_step"] == 4 and stages.is_done(_EVALUATE, config, workdir)


# ------------------------------------------------------------------------------------------------- lineage


def test_a_stale_ar_prior_is_refused_naming_it_and_a_disabled_one_is_not_checked(ar_run, tmp_path):
  """New code maps (a code store record the priors were not trained on): the prior is named first; once it is
  removed, the AR prior, with what to remove; with the AR prior disabled nothing about W/ar is checked."""
  config, workdir = ar_run.copy(tmp_path / "w")
  meta_path = workdir.code_store / "meta.json"
  meta = files_lib.read_json(meta_path)
  old = lineage.holds(config, workdir, "codes")
  # Same tokenizer and step (so the code maps themselves are current), another K: both priors are stale.
  files_lib.write_json(meta_path, dict(meta, codebook_size=meta["codebook_size"] + 1))
  assert lineage.holds(config, workdir, "codes") == dict(old, codebook_size=old["codebook_size"] + 1)
  was = f"code maps of {old['tokenizer']} step {old['step']} \\(K = {old['codebook_size']}\\)"
  now = f"code maps of {old['tokenizer']} step {old['step']} \\(K = {old['codebook_size'] + 1}\\)"
  off = config.copy_and_resolve_references()
  off.ar_train.enabled = False
  ar_root = re.escape(str(workdir.ar.root))
  with pytest.raises(MismatchError, match=rf"the prior under .*/prior was made from {was}, but .*/codes now "
                     rf"holds {now}\. To redo it, remove .*/prior, .*/samples, .*/eval"):
    stages.run_stage(_SAMPLE, config, workdir)
  shutil.rmtree(workdir.prior.root)  # As told; the AR prior is next.
  for stage in (_SAMPLE, _INPAINT, _EVALUATE):
    with pytest.raises(MismatchError, match=rf"the AR prior under {ar_root} was made from {was}, but .*/codes "
                       rf"now holds {now}\. To redo it, remove {ar_root}, .*/samples, .*/eval"):
      stages.run_stage(stage, config, workdir)
  with pytest.raises(MismatchError, match=rf"the AR prior under {ar_root}"):
    stages.run_stage(stages.BY_NAME["train_ar"], config, workdir)
  # Disabled: the AR prior's folder is not looked at; what stops sampling now is the missing prior.
  lineage.check(off, workdir, _SAMPLE.consumes)
  with pytest.raises(MissingInputError, match="--mode=train_prior") as info:
    stages.run_stage(_SAMPLE, off, workdir)
  assert not isinstance(info.value, MismatchError) and str(workdir.ar.root) not in str(info.value)
  assert stages.run_stage(stages.BY_NAME["train_ar"], off, workdir).skipped
