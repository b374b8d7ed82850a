"""Stage 1 end to end on the tiny MNIST-5k config: real TFDS data, Orbax checkpoints, SIGTERM, exact resume."""
import json

import jax
import numpy as np
import pytest

from conftest import sigterm_training_at
from vqddm_jax import checkpointing
from vqddm_jax.errors import MismatchError
from vqddm_jax.stages import train_vqvae
from vqddm_jax.training import loop, vqvae_step
from vqddm_jax.workdir import Workdir


def _leaves(state):
  return jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))


def _restore(workdir, config):
  from vqddm_jax.models.vqvae import build_vqvae
  from vqddm_jax.training import optim
  model = build_vqvae(config.vqvae, 1)
  optimizer = optim.make_optimizer(config.vqvae_train.optim, config.vqvae_train.num_steps)
  abstract = jax.eval_shape(lambda: vqvae_step.init_state(model, optimizer, jax.random.key(0), (32, 32, 1)))
  ckpt = checkpointing.Checkpointer(workdir.vqvae.checkpoints, read_only=True)
  try:
    return ckpt.restore(abstract)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def uninterrupted(pipeline_run):
  """Stage 1 of the shared tiny pipeline run: (config, workdir, final host state)."""
  config, workdir = pipeline_run
  state, _ = _restore(workdir, config)
  return config, workdir, state


def test_run_writes_checkpoints_events_grid_and_eval(uninterrupted):
  config, workdir, state = uninterrupted
  paths = workdir.vqvae
  assert int(state.step) == config.vqvae_train.num_steps
  assert sorted(int(p.name) for p in paths.checkpoints.iterdir() if p.name.isdigit()) == [2, 4]
  assert any(p.name.startswith("events.out.tfevents") for p in paths.tensorboard.iterdir())
  assert [p.name for p in paths.image(4).parent.iterdir()] == ["recon_0000004.png"]
  results = json.loads(paths.eval_json.read_text())
  assert results["num_images"] == config.vqvae_train.eval_examples
  assert 0 < results["usage"] <= 1 and results["perplexity"] >= 1 and results["mse"] > 0
  _, meta = _restore(workdir, config)
  assert meta["position"] is not None and meta["nonfinite_steps"] == 0


def test_checkpoint_round_trip(uninterrupted, tmp_path):
  _, _, state = uninterrupted
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(7, state, {"position": {"epoch": 1, "batch": 2}})
  restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
  assert meta["position"] == {"epoch": 1, "batch": 2} and ckpt.latest_step() == 7
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
  ema = ckpt.restore_item("ema_params", state.ema_params)
  for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
  wrong = jax.tree_util.tree_map(lambda x: np.zeros((3,) + np.shape(x), np.float32), state.ema_params)
  with pytest.raises(MismatchError, match="does not match.*another config"):
    ckpt.restore_item("ema_params", wrong)
  ckpt.close()


def test_sigterm_saves_and_resume_is_exact(uninterrupted, monkeypatch, tmp_path):
  config, _, reference = uninterrupted
  workdir = Workdir(tmp_path)
  real_run = sigterm_training_at(monkeypatch, 2)
  result = train_vqvae.run(config, workdir)
  assert not result.completed and checkpointing.latest_step(workdir.vqvae.checkpoints) == 2
  assert not train_vqvae.is_done(config, workdir)
  monkeypatch.setattr(loop, "run", real_run)
  assert train_vqvae.run(config, workdir).completed  # Resumes from step 2.
  state, _ = _restore(workdir, config)
  assert int(state.step) == 4 and train_vqvae.is_done(config, workdir)
  for a, b in zip(_leaves(state), _leaves(reference)):
    np.testing.assert_array_equal(a, b)
