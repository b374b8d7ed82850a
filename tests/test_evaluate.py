"""The evaluation report of the shared tiny pipeline run: every field present, reference rows ordered."""
import json

from vqddm_jax import stages
from vqddm_jax.stages import evaluate
from vqddm_jax.workdir import Workdir


def test_pipeline_runs_evaluate_last():
  names = [s.name for s in stages.PIPELINE]
  assert names == ["train_vqvae", "refit", "encode", "train_prior", "sample", "evaluate"]
  assert "inpaint" in stages.BY_NAME and "inpaint" not in names


def test_report_holds_every_field_and_references_order(pipeline_run):
  config, workdir = pipeline_run
  report = json.loads(workdir.eval_report("json").read_text())
  assert 0.0 <= report["classifier_heldout_accuracy"] <= 1.0
  rows = report["quality"]
  names = list(rows)
  assert any(n.startswith("real training images") for n in names)
  assert any(n.startswith("stage-1 reconstructions") for n in names)
  assert any(n.startswith("decoded uniformly random codes") for n in names)
  assert any(n.startswith("samples (") for n in names)
  assert any(n.startswith("inpainting completions") for n in names)
  for r in rows.values():
    assert set(r) >= {"fd", "kid", "kid_std", "precision", "recall", "n"}
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
  floor = next(r for n, r in rows.items() if n.startswith("real training images"))
  ceiling = next(r for n, r in rows.items() if n.startswith("decoded uniformly random codes"))
  assert floor["fd"] < ceiling["fd"]
  steps = [r["steps"] for r in report["steps_vs_quality"]]
  assert steps == [config.diffusion.num_steps // f for f in config.eval.step_fractions]
  assert all(r["seconds"] > 0 and "fd" in r for r in report["steps_vs_quality"])
  assert report["heldout_nelbo"]["uniform_bits_per_code"] > 0
  assert set(report["codebook"]) >= {"usage", "usage_10", "perplexity", "mse"}
  md = workdir.eval_report("md").read_text()
  assert "![samples](samples.png)" in md and "bits per code" in md
  assert workdir.eval_samples_grid.exists()
  # Evaluate keeps its completions in eval/, never in inpaint/ where --mode=inpaint writes.
  assert workdir.eval_inpaint(config.inpaint.mask).npz.exists()
  assert evaluate.is_done(config, workdir)


def test_quality_metrics_are_skipped_with_a_note_without_inception_weights(tmp_path):
  from conftest import load_config
  config = load_config("configs/celeba.py")
  fn, facts = evaluate.feature_extractor(config, Workdir(tmp_path))
  assert fn is None and "inception_weights" in facts["note"]
