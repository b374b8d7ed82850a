"""The evaluation report of the shared tiny pipeline run: every field present, reference rows ordered, the
protocol stated above the table, a sample count beyond the held-out set honoured, and FID, KID and the
Inception Score when Inception weights are given."""
import dataclasses
import functools
import json
import shutil

import numpy as np

from vqddm_jax import generation, stages
from vqddm_jax.evaluation import feature_net, inception, inception_layout, protocol, reference_stats
from vqddm_jax.evaluation import report as report_lib
from vqddm_jax.stages import evaluate
from vqddm_jax.workdir import Workdir


def test_pipeline_runs_evaluate_last():
  names = [s.name for s in stages.PIPELINE]
  assert names == ["train_vqvae", "refit", "encode", "train_prior", "train_ar", "sample", "evaluate"]
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
    assert set(r) >= {"fd", "kid", "kid_std", "precision", "recall", "precision_se", "recall_se", "n"}
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert 0 <= r["precision_se"] <= 0.5 and 0 <= r["recall_se"] <= 0.5
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
  sample_row = next(line for line in md.splitlines() if line.startswith("| samples ("))
  assert sample_row.count(" ± ") == 3  # KID, precision and recall
  assert workdir.eval_samples_grid.exists()
  # Evaluate keeps its completions in eval/, never in inpaint/ where --mode=inpaint writes.
  assert workdir.eval_inpaint(config.inpaint.mask).npz.exists()
  assert stages.is_done(stages.BY_NAME["evaluate"], config, workdir)


def test_training_seed_does_not_change_the_feature_space(pipeline_run):
  """A prior trained with another config.seed is measured with the cached classifier and statistics."""
  config, workdir = pipeline_run
  config = config.copy_and_resolve_references()
  config.seed = config.seed + 1
  cached = workdir.classifier_cache.read_bytes()
  net, _ = protocol.feature_network(config, workdir)
  assert workdir.classifier_cache.read_bytes() == cached
  protocol.reference_statistics(config, workdir, net)  # MismatchError if the network had changed.


def test_without_inception_weights_rgb_data_is_measured_in_vgg16_space(tmp_path):
  from conftest import load_config
  config = load_config("configs/celeba.py")
  net, facts = protocol.feature_network(config, Workdir(tmp_path))
  assert net.key == "vgg16" and net.metric_names()["fd"] == "FD_VGG16"
  assert "inception_weights" in facts["note"] and "not FID" in facts["note"]


def test_report_states_the_protocol_above_the_table(pipeline_run):
  config, workdir = pipeline_run
  protocol = json.loads(workdir.eval_report("json").read_text())["protocol"]
  assert protocol["num_samples"] == config.eval.num_samples
  assert protocol["reference"]["split"] == "train" and protocol["reference"]["count"] == 4500
  assert protocol["metric_names"]["fd"] == "FD_classifier"
  assert workdir.reference_stats("classifier").exists()
  head, table = workdir.eval_report("md").read_text().split("| images |", 1)
  for words in ("**Protocol.**", "SmallCNN", f"N = {config.eval.num_samples}", "`train` of mnist5k",
                "4,500 images", "reference_stats_classifier.npz", "500 held-out images (`test`)"):
    assert words in head, words
  assert table.startswith(" FD_classifier | KID_classifier | precision_classifier | recall_classifier | n |")
  assert protocol["temperature"] == 1.0 and "temperature" not in head  # The model's own samples.
  report = json.loads(workdir.eval_report("json").read_text())
  tempered = "\n".join(report_lib.protocol_lines(dict(report, protocol=dict(protocol, temperature=0.8))))
  assert "at sampling temperature τ = 0.8" in tempered


def test_num_samples_beyond_the_heldout_set_is_honoured(pipeline_run, tmp_path, monkeypatch):
  config, workdir = pipeline_run
  shutil.copytree(workdir.root, tmp_path / "w")
  config, workdir = config.copy_and_resolve_references(), Workdir(tmp_path / "w")
  # Shapes the shared run compiled already (chunks of 32, 16 completions), so mostly cache hits.
  config.eval.update(num_samples=40, step_fractions=(4,), chunk_size=32)
  load = generation.load_generator

  def few_heldout(c, w):
    gen = load(c, w)
    return dataclasses.replace(gen, heldout_codes=gen.heldout_codes[:32])

  def no_second_pass(*args, **kwargs):
    raise AssertionError("the cached reference statistics must be reused")

  monkeypatch.setattr(generation, "load_generator", few_heldout)
  monkeypatch.setattr(reference_stats, "compute", no_second_pass)
  assert evaluate.run(config, workdir).completed
  report = json.loads(workdir.eval_report("json").read_text())
  rows = report["quality"]
  assert rows["samples (5 steps)"]["n"] == 40 and report["steps_vs_quality"][0]["n"] == 40
  assert rows["decoded uniformly random codes (ceiling)"]["n"] == 40
  assert rows["real training images (floor)"]["n"] == 40
  assert rows["stage-1 reconstructions of held-out images"]["n"] == 32
  assert report["protocol"]["kid_pr_real"]["count"] == 32
  assert "N = 40" in workdir.eval_report("md").read_text()


def test_sample_draws_report_each_draw_and_their_spread(pipeline_run, tmp_path):
  """eval.sample_draws = 2: draw 0 is the samples row, draw 1 is what eval.seed + 1 gives, mean/std right."""
  config, workdir = pipeline_run
  shutil.copytree(workdir.root, tmp_path / "w")
  config, workdir = config.copy_and_resolve_references(), Workdir(tmp_path / "w")
  # Shapes the shared run compiled already (chunks of 32), so mostly cache hits.
  config.eval.update(num_samples=32, step_fractions=(4,), chunk_size=32, sample_draws=2)
  assert evaluate.run(config, workdir).completed
  report = json.loads(workdir.eval_report("json").read_text())
  draws = report["sample_draws"]
  assert [d["seed"] for d in draws["draws"]] == [config.eval.seed + r for r in range(2)]
  assert draws["steps"] == config.diffusion.num_steps // 4
  row = report["quality"][f"samples ({draws['steps']} steps)"]
  metrics = ("fd", "kid", "precision", "recall")
  assert {m: draws["draws"][0][m] for m in metrics} == {m: row[m] for m in metrics}
  for m in metrics:
    values = [d[m] for d in draws["draws"]]
    np.testing.assert_allclose(draws["mean"][m], np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(draws["std"][m], np.std(values, ddof=1), rtol=1e-12)
  assert draws["draws"][1]["fd"] != draws["draws"][0]["fd"]  # Another set of samples.
  # Draw 1 is the samples row of a report made with eval.seed + 1 (FD, precision and recall).
  other = config.copy_and_resolve_references()
  other.eval.seed = config.eval.seed + 1
  gen = generation.load_generator(other, workdir)
  net, _ = protocol.feature_network(other, workdir)
  scorer = protocol.Scorer(net, protocol.reference_statistics(other, workdir, net),
                           protocol.real_features(other, net, len(gen.heldout_codes)), other.eval.seed)
  again = protocol.steps_table(other, gen, scorer)[0][0]
  for m in ("fd", "precision", "recall"):
    np.testing.assert_allclose(draws["draws"][1][m], again[m], rtol=1e-6)
  md = workdir.eval_report("md").read_text()
  assert "## Samples over 2 evaluation draws" in md
  table = md.split("## Samples over 2 evaluation draws", 1)[1]
  assert table.count(f"| {config.eval.seed + 1} | ") == 1 and "| mean ± std | " in table


def _inception_file(path) -> str:
  """A weights file in the converted layout, with the classifier layer: random He-scaled kernels and neutral
  batch norms (finite features; made in NumPy, ~15 s faster than initialising the network)."""
  rng, flat = np.random.default_rng(0), {}
  for key, shape in {**inception.variable_shapes(), **inception_layout.FC_SHAPES}.items():
    leaf = key.rsplit("/", 1)[1]
    if leaf == "kernel":
      flat[key] = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
    else:
      flat[key] = np.ones(shape) if leaf in ("scale", "var") else np.zeros(shape)
  return inception_layout.save_npz(inception_layout.unflatten(flat), str(path))


def test_inception_weights_give_fid_kid_and_inception_score(pipeline_run, tmp_path, monkeypatch):
  config, workdir = pipeline_run
  shutil.copytree(workdir.root, tmp_path / "w")
  config, workdir = config.copy_and_resolve_references(), Workdir(tmp_path / "w")
  # 16 images per set in shapes the shared run compiled (16 completions and samples): each 299×299 Inception
  # pass costs ~11 GFLOP, so every set here is one call.
  config.eval.update(num_samples=16, step_fractions=(4,), chunk_size=16,
                     inception_weights=_inception_file(tmp_path / "inception.npz"))
  monkeypatch.setattr(feature_net, "inception_net",
                      functools.partial(feature_net.inception_net, batch_size=16))
  load = generation.load_generator

  def few_heldout(c, w):
    gen = load(c, w)
    return dataclasses.replace(gen, heldout_codes=gen.heldout_codes[:16])
  monkeypatch.setattr(generation, "load_generator", few_heldout)
  # A given statistics file of the right record (the 4,500 training images would take minutes here).
  net = feature_net.inception_net(config.eval.inception_weights, batch_size=16)
  record = dict(reference_stats.wanted_record(config.data, net, 4500), count=4500)
  a = np.random.default_rng(0).normal(0, 1e-2, (2048, 2048))
  config.eval.reference_stats = str(reference_stats.save(
      tmp_path / "stats.npz", reference_stats.ReferenceStats(np.zeros(2048), a @ a.T, record)))
  assert evaluate.run(config, workdir).completed
  report = json.loads(workdir.eval_report("json").read_text())
  assert report["protocol"]["metric_names"] == {"fd": "FID", "kid": "KID", "precision": "precision",
                                                "recall": "recall", "is": "IS"}
  assert report["protocol"]["feature_key"] == "inception" and report["protocol"]["inception_score_splits"]
  for name, row in report["quality"].items():
    assert row["n"] == 16 and all(np.isfinite(row[k]) for k in ("fd", "kid", "is", "is_std")), (name, row)
    assert row["is"] >= 1.0  # exp of a mean KL: never below 1
  md = workdir.eval_report("md").read_text()
  assert "| images | FID | KID | precision | recall | IS | n |" in md and "Inception Score over" in md
  assert "Inception-v3 of FID" in md and "FD_" not in md
