"""The shared training wiring: a loop built from a config section, the held-out hook whose scalars, log line
and eval.json the loop writes, the named key streams, and clu's parameter tables."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from ml_collections import ConfigDict

from vqddm_jax.training import keys, loop, writers


@struct.dataclass
class _State:
  step: jnp.ndarray
  params: jnp.ndarray


class _Batches:
  """Ones, `[8 devices, 1]` each; the position counts the batches read."""

  def __init__(self, position):
    self.position = dict(position or {"i": 0})

  def __iter__(self):
    return self

  def __next__(self):
    self.position = {"i": self.position["i"] + 1}
    return {"x": np.ones((jax.local_device_count(), 1), np.float32)}


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def flush(self):
    pass


def _p_step(rstate, batch, key):
  del key
  n = jax.local_device_count()
  out = rstate.replace(step=rstate.step + 1, params=rstate.params + batch["x"][:, 0])
  return out, {"finite": np.ones((n,), np.float32), "loss": np.full((n,), 0.5, np.float32)}


def _section(**overrides):
  return ConfigDict(dict(dict(num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=3,
                              eval_every=2, batch_size=8), **overrides))


def test_loop_config_comes_from_the_section(tmp_path):
  spec = loop.LoopConfig.from_section("vqvae", tmp_path, _section(num_steps=7, log_every=3))
  assert spec == loop.LoopConfig("vqvae", tmp_path, num_steps=7, log_every=3, checkpoint_every=2,
                                 keep_checkpoints=3)


@pytest.mark.parametrize("place_step", [False, True])
def test_the_loop_writes_the_heldout_scalars_log_line_and_eval_json(tmp_path, caplog, place_step):
  """What `evaluate` returns goes to `<stage>/eval_*` scalars (but `step` and the unplotted keys), one log
  line and eval.json with the step (last, or where `evaluate` put it), every `every` steps and at the end."""
  calls = []

  def evaluate(step, rstate):
    calls.append((step, float(np.asarray(rstate.params)[0])))
    return dict({"loss": 0.25}, **({"step": step} if place_step else {}), num=3)

  held = loop.HeldOut(2, evaluate, tmp_path / "eval.json", describe=lambda r: f"loss {r['loss']:.2f}",
                      unplotted=("num",))
  writer = _Writer()
  caplog.set_level(logging.INFO)
  state, completed = loop.run(
      loop.LoopConfig.from_section("toy", tmp_path / "checkpoints", _section()),
      init_state=_State(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)), p_step=_p_step,
      open_batches=_Batches, key=keys.derive(0, keys.Stream.VQ_TRAIN), writer=writer, heldout=held)
  assert completed and int(state.step) == 4 and float(state.params) == 4.0
  assert calls == [(2, 2.0), (4, 4.0)]
  stored = json.loads((tmp_path / "eval.json").read_text())
  assert list(stored) == (["loss", "step", "num"] if place_step else ["loss", "num", "step"])
  assert stored["step"] == 4 and stored["loss"] == 0.25
  for step in (2, 4):
    assert {k: v for k, v in writer.scalars[step].items() if "eval" in k} == {"toy/eval_loss": 0.25}
    assert writer.scalars[step]["toy/loss"] == 0.5
  assert [r.getMessage() for r in caplog.records if "held-out" in r.getMessage()] == [
      "toy held-out at step 2: loss 0.25", "toy held-out at step 4: loss 0.25"]
  assert loop.trained_to(tmp_path / "checkpoints", 4) and not loop.trained_to(tmp_path / "checkpoints", 5)
  assert not loop.trained_to(tmp_path / "nothing", 1)


def test_key_streams_keep_their_numbers():
  """The values are the numbers the streams had before they had names: changing one changes every result."""
  assert {s.name: int(s) for s in keys.Stream} == {
      "VQVAE_INIT": 0, "VQ_TRAIN": 1, "DISCRIMINATOR_INIT": 2, "PRIOR_INIT": 10, "PRIOR_EVAL": 11,
      "PRIOR_TRAIN": 12, "AR_INIT": 20, "AR_TRAIN": 22}
  assert {s.name: int(s) for s in keys.Draw} == {"T": 0, "Z_T": 1, "DROPOUT": 2, "LABEL": 3}
  for stream in keys.Stream:
    np.testing.assert_array_equal(
        jax.random.key_data(keys.derive(5, stream)),
        jax.random.key_data(jax.random.fold_in(jax.random.key(5), int(stream))))


def test_parameter_tables_come_from_clu(caplog):
  params = {"encoder": {"conv": {"kernel": np.zeros((3, 3, 1, 4)), "bias": np.zeros((4,))}},
            "codebook": np.zeros((16, 8))}
  caplog.set_level(logging.INFO)
  assert writers.log_parameters("toy", params) == 36 + 4 + 128
  text = "\n".join(r.getMessage() for r in caplog.records)
  assert "encoder/conv/kernel" in text and "(3, 3, 1, 4)" in text and "codebook" in text
  assert "toy: 0.000M parameters (encoder 0.000M, codebook 0.000M)" in text
