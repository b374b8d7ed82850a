"""ReFiT stage on the shared tiny pipeline run: frozen encoder, changed decoder, report, encode skip."""
import json

import jax
import numpy as np
import pytest

from conftest import load_config
from vqddm_jax import config_schema, restore
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import MissingInputError
from vqddm_jax.stages import encode
from vqddm_jax.stages import refit as refit_stage
from vqddm_jax.workdir import Workdir


def test_finetune_keeps_encoder_bit_identical_and_changes_decoder(pipeline_run):
  config, workdir = pipeline_run
  before = restore.restore_vqvae(config, workdir, "vqvae").params
  restored = restore.restore_tokenizer(config, workdir)
  after, step = restored.params, restored.step
  assert restored.stage == "refit" and step == config.refit.num_steps
  assert after["codebook"].shape[0] == config.refit.num_codes
  for name in refit_stage.FROZEN:
    for a, b in zip(jax.tree_util.tree_leaves(before[name]), jax.tree_util.tree_leaves(after[name])):
      np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["decoder"]),
                                                      jax.tree_util.tree_leaves(after["decoder"]))]
  assert any(changed)


def test_report_has_three_rows_and_encode_used_the_rebuilt_codebook(pipeline_run):
  config, workdir = pipeline_run
  report = json.loads(workdir.refit_report("json").read_text())
  for key in ("before", "rebuilt", "finetuned"):
    assert set(report[key]) >= {"usage", "usage_10", "perplexity", "mse"}
  assert "after fine-tune" in workdir.refit_report("md").read_text()
  store = workdir.code_store
  meta = codes_lib.read_meta(store)
  assert meta["codebook_size"] == config.refit.num_codes
  assert (meta["tokenizer"], meta["step"]) == ("refit", config.refit.num_steps)
  codes = codes_lib.load_codes(store, config.data.train_split)
  assert codes.shape == (4500, 8, 8) and codes.max() < config.refit.num_codes
  # The store was made from the latest ReFiT checkpoint: encode is done; with ReFiT off it is not.
  assert encode.is_done(config, workdir)
  no_refit = config.copy_and_resolve_references()
  no_refit.refit.enabled = False
  assert not encode.is_done(no_refit, workdir)


@pytest.mark.parametrize("value", [0, 10**9])
def test_bad_number_of_codes_fails_clearly(value):
  config = load_config("configs/mnist.py")
  config.refit.num_codes = value
  with pytest.raises(ValueError, match=r"config\.refit\.num_codes"):
    config_schema.validate_config(config)


def test_encode_without_a_stage1_checkpoint_names_what_is_missing(tmp_path):
  config = load_config("configs/mnist.py:tiny")
  workdir = Workdir(tmp_path)
  assert not encode.is_done(config, workdir)
  with pytest.raises(MissingInputError, match="refit/checkpoints.*--mode=refit"):
    encode.run(config, workdir)
  config.refit.enabled = False
  with pytest.raises(MissingInputError, match="vqvae/checkpoints.*--mode=train_vqvae"):
    encode.run(config, workdir)
