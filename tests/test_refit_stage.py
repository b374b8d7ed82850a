"""ReFiT stage on the shared tiny pipeline run: frozen encoder, changed decoder, report, encode skip."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from conftest import load_config
from vqddm_jax import config_schema
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.train import encode
from vqddm_jax.train import refit as refit_stage
from vqddm_jax.train import vqvae as stage1


def test_finetune_keeps_encoder_bit_identical_and_changes_decoder(pipeline_run):
  config, workdir = pipeline_run
  _, before, _ = stage1.restore_ema_params(config, stage1.stage_dirs(workdir)["checkpoints"])
  model, after, step = stage1.restore_ema_params(
      config, refit_stage.stage_dirs(workdir)["checkpoints"], codebook_size=config.refit.num_codes)
  assert step == config.refit.num_steps and after["codebook"].shape[0] == config.refit.num_codes
  for name in refit_stage.FROZEN:
    for a, b in zip(jax.tree_util.tree_leaves(before[name]), jax.tree_util.tree_leaves(after[name])):
      np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["decoder"]),
                                                      jax.tree_util.tree_leaves(after["decoder"]))]
  assert any(changed)


def test_report_has_three_rows_and_encode_used_the_rebuilt_codebook(pipeline_run):
  config, workdir = pipeline_run
  with open(os.path.join(workdir, "refit", "report.json")) as f:
    report = json.load(f)
  for key in ("before", "rebuilt", "finetuned"):
    assert set(report[key]) >= {"usage", "usage_10", "perplexity", "mse"}
  assert "after fine-tune" in pathlib.Path(workdir, "refit", "report.md").read_text()
  meta = codes_lib.read_meta(codes_lib.codes_dir(workdir, 0, 1))
  assert meta["codebook_size"] == config.refit.num_codes and meta["source"].endswith("refit/checkpoints")
  codes = codes_lib.load_codes(codes_lib.codes_dir(workdir, 0, 1), config.data.train_split)
  assert codes.shape == (4500, 8, 8) and codes.max() < config.refit.num_codes
  # Re-running encode skips: the store is left as it is.
  stamp = os.path.getmtime(os.path.join(codes_lib.codes_dir(workdir, 0, 1), codes_lib.META_FILE))
  assert encode.encode_dataset(config, workdir)
  assert os.path.getmtime(os.path.join(codes_lib.codes_dir(workdir, 0, 1), codes_lib.META_FILE)) == stamp


@pytest.mark.parametrize("value", [0, 10**9])
def test_bad_number_of_codes_fails_clearly(value):
  config = load_config("configs/mnist.py")
  config.refit.num_codes = value
  with pytest.raises(ValueError, match=r"config\.refit\.num_codes"):
    config_schema.validate_config(config)


def test_encode_without_a_stage1_checkpoint_names_what_is_missing(tmp_path):
  config = load_config("configs/mnist.py:tiny")
  with pytest.raises(FileNotFoundError, match="refit/checkpoints"):
    encode.encode_dataset(config, str(tmp_path))
  config.refit.enabled = False
  with pytest.raises(FileNotFoundError, match="vqvae/checkpoints.*train_vqvae"):
    encode.encode_dataset(config, str(tmp_path))
