"""The work directory owner: every non-Orbax writer runs against TensorFlow's in-memory `ram://` file system.

`ram://` is served by `tf.io.gfile`, as `gs://` is on a TPU VM. Registering it with epath for the test makes
`Workdir("ram://...")` behave like a bucket: a writer that used `open`, `os.path` or `np.save` on its path
would create local folders named `ram:` in the current directory (checked empty) or fail.
"""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from etils.epath import backend, gpath, register

from vqddm_jax import generation
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax import workdir as workdir_lib
from vqddm_jax.evaluation import classifier
from vqddm_jax.stages import refit
from vqddm_jax.training import writers
from vqddm_jax.workdir import Workdir


@pytest.fixture
def ram_workdir(monkeypatch, tmp_path):
  """A `Workdir` on `ram://` (a fresh name per test), with the current directory an empty tmp folder."""
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  monkeypatch.chdir(tmp_path)
  yield Workdir(f"ram://run-{uuid.uuid4().hex}")
  assert not list(tmp_path.iterdir()), "a writer touched the local disk instead of the path library"


def test_workdir_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(Workdir("gs://bucket/run").root) == "gs://bucket/run"
  monkeypatch.chdir(tmp_path)
  assert str(Workdir("runs/a").root) == str(tmp_path / "runs" / "a")
  w = Workdir("gs://bucket/run")
  assert str(w.prior.checkpoints) == "gs://bucket/run/prior/checkpoints"
  assert str(w.code_store) == "gs://bucket/run/codes"
  assert (str(w.samples(2000, 250, num_samples=64, seed=1).png) ==
          "gs://bucket/run/samples/2000/samples_S250_n64_seed1.png")
  tempered = w.samples(2000, 250, num_samples=64, seed=1, temperature=0.5)
  assert tempered.png.name == "samples_S250_n64_seed1_tau0.5.png"
  assert str(w.eval_inpaint("left_half").npz) == "gs://bucket/run/eval/inpaint/left_half/inpaint.npz"
  with pytest.raises(ValueError, match="unknown training stage"):
    w.train("sample")


def test_file_writers_round_trip_on_ram(ram_workdir):
  w = ram_workdir
  files_lib.write_json(w.vqvae.eval_json, {"mse": 0.5, "step": np.int64(3)})
  assert files_lib.read_json(w.vqvae.eval_json) == {"mse": 0.5, "step": 3}
  assert files_lib.same_record(w.vqvae.eval_json, {"step": 3})
  assert not files_lib.same_record(w.vqvae.eval_json, {"step": 4})
  assert files_lib.read_json(w.prior.eval_json) is None
  arrays = {"codes": np.arange(12, dtype=np.int32).reshape(3, 2, 2), "images": np.zeros((3, 4, 4, 1))}
  files = w.samples(7, 5, num_samples=3, seed=0)
  files_lib.write_npz(files.npz, **arrays)
  back = files_lib.read_npz(files.npz)
  assert set(back) == set(arrays) and np.array_equal(back["codes"], arrays["codes"])
  files_lib.write_png(files.png, images_lib.image_grid(arrays["images"]))
  assert files.png.read_bytes()[:4] == b"\x89PNG"
  assert w.latest_samples_grid() == files.png
  files_lib.write_npy(w.refit_features, np.ones((5, 3), np.float32))
  assert files_lib.read_npy(w.refit_features).shape == (5, 3)
  assert not list(files.npz.parent.glob(".*.tmp")), "temporary files must be renamed away"


def test_reports_tensorboard_and_caches_on_ram(ram_workdir):
  w = ram_workdir
  writer = writers.make_writer(w.prior.tensorboard, is_main=True)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"grid": np.zeros((1, 4, 4, 1), np.uint8)})
  writer.flush()
  assert any(p.name.startswith("events.out.tfevents") for p in w.prior.tensorboard.iterdir())
  row = {"usage": 0.5, "usage_10": 0.25, "perplexity": 3.0, "mse": 0.1}
  refit.write_report(w, {"stage1_step": 4, "num_features": 10, "before": row, "rebuilt": row}, row)
  assert json.loads(w.refit_report("json").read_text())["finetuned"] == row
  assert "after fine-tune" in w.refit_report("md").read_text()
  mask = np.zeros((2, 2, 2), bool)
  mask[:, :, 0] = True
  result = {"mask": mask, "known": np.zeros((2, 2, 2), np.int32), "codes": np.ones((2, 2, 2), np.int32),
            "images": np.zeros((2, 8, 8, 1), np.float32), "originals": np.ones((2, 8, 8, 1), np.float32)}
  files = w.eval_inpaint("left_half")
  generation.save_inpainting(files, result, 8, {"prior_step": 1})
  assert files.png.exists() and files_lib.read_json(files.record) == {"prior_step": 1}
  x = np.random.default_rng(0).uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)
  y = (np.arange(32) % 2).astype(np.int32)
  tiny = dict(num_steps=2, batch_size=8, widths=(2, 2, 2), num_classes=2)
  _, meta = classifier.load_or_train(w.classifier_cache, x, y, seed=0, **tiny)
  assert not meta["cached"] and w.classifier_cache.exists()
  assert classifier.load_or_train(w.classifier_cache, x, y, seed=0, **tiny)[1]["cached"]


def test_as_path_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "code").mkdir()
  monkeypatch.chdir(tmp_path / "code")  # a job starts in the code directory
  assert str(files_lib.as_path("~/runs/x")) == str(tmp_path / "home" / "runs" / "x")
  assert str(Workdir("~/runs/x").vqvae.checkpoints) == str(tmp_path / "home" / "runs" / "x" / "vqvae" /
                                                                    "checkpoints")
  assert str(files_lib.as_path("gs://bucket/~/x")) == "gs://bucket/~/x"


def test_workdir_inside_a_synced_tree_is_refused(tmp_path, monkeypatch):
  import os
  import re
  from vqddm_jax.errors import ConfigError
  home = tmp_path / "home"
  code = home / "vqddm"
  (code / "vqddm_jax").mkdir(parents=True)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(code)
  for fine in ("~/runs/x", "~/vqddm_runs/x", "gs://bucket/vqddm/x", "runs/x"):  # no marker yet: a user's clone
    workdir_lib.check_not_in_synced_tree(fine)
  (code / workdir_lib.SYNC_MARKER).write_text("made by sync\n")
  (home / "link").symlink_to(code / "vqddm_jax")
  tree = re.escape(os.path.realpath(code))
  for bad in ("~/vqddm", "~/vqddm/runs/x", "runs/x", str(code / "vqddm_jax" / "a" / "b"), "~/link/run"):
    with pytest.raises(ConfigError, match=rf"--workdir={re.escape(bad)}: {tree} is a code directory copied by "
                                          rf"`launch/tpu.py sync` \(it holds \.vqddm_synced\)"):
      workdir_lib.check_not_in_synced_tree(bad)
  for fine in ("~/runs/x", "~/vqddm_runs/x", "gs://bucket/vqddm/x", str(tmp_path / "elsewhere")):
    workdir_lib.check_not_in_synced_tree(fine)
  assert not (code / "runs").exists() and not (home / "runs").exists()  # a check, not a maker of folders
