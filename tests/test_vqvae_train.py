"""Stage 1 end to end on the tiny MNIST-5k config: real TFDS data, Orbax checkpoints, SIGTERM, exact resume."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from vqddm_jax import checkpointing
from vqddm_jax.train import loop
from vqddm_jax.train import vqvae as stage1


def _leaves(state):
  return jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))


def _restore(workdir, config):
  from vqddm_jax.models.vqvae import build_vqvae
  from vqddm_jax.train import optim
  model = build_vqvae(config.vqvae, 1)
  optimizer = optim.make_optimizer(config.vqvae_train.optim, config.vqvae_train.num_steps)
  abstract = jax.eval_shape(lambda: stage1.init_state(model, optimizer, jax.random.key(0), (32, 32, 1)))
  ckpt = checkpointing.Checkpointer(stage1.stage_dirs(workdir)["checkpoints"], read_only=True)
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
  dirs = stage1.stage_dirs(workdir)
  assert int(state.step) == config.vqvae_train.num_steps
  assert sorted(int(s) for s in os.listdir(dirs["checkpoints"]) if s.isdigit()) == [2, 4]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(dirs["tensorboard"]))
  assert os.listdir(dirs["images"]) == ["recon_0000004.png"]
  with open(os.path.join(workdir, "vqvae", "eval.json")) as f:
    results = json.load(f)
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
  with pytest.raises(ValueError, match="does not match"):
    ckpt.restore_item("ema_params", wrong)
  ckpt.close()


def test_sigterm_saves_and_resume_is_exact(uninterrupted, monkeypatch, tmp_path):
  config, _, reference = uninterrupted
  workdir = str(tmp_path)
  real_run = loop.run

  def run_with_sigterm_at_step_2(spec, **kwargs):
    def kill(step, rstate):
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    kwargs["periodic"] = list(kwargs["periodic"]) + [loop.Periodic(1, kill)]
    return real_run(spec, **kwargs)

  monkeypatch.setattr(loop, "run", run_with_sigterm_at_step_2)
  state, completed = stage1.train_vqvae(config, workdir)
  assert not completed and int(state.step) == 2
  assert stage1.stage_dirs(workdir)["checkpoints"] and not loop.stage_finished(
      stage1.stage_dirs(workdir)["checkpoints"], config.vqvae_train.num_steps)
  monkeypatch.setattr(loop, "run", real_run)
  state, completed = stage1.train_vqvae(config, workdir)  # Resumes from step 2.
  assert completed and int(state.step) == 4
  for a, b in zip(_leaves(state), _leaves(reference)):
    np.testing.assert_array_equal(a, b)
  # A finished stage is skipped.
  assert stage1.train_vqvae(config, workdir) == (None, True)
