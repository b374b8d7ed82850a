"""Editing: mixing two code maps at step t, re-noising one, denoising from t (the math, on a tiny schedule), and
`--mode=edit` on a copy of the shared tiny run (grids written, a rerun skipped, bad settings exit 2)."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqddm_jax import diffusion, editing, main, stages
from vqddm_jax import files as files_lib
from vqddm_jax.workdir import Workdir

K, T = 16, 40
SHAPE = (4, 32, 32)  # 4096 positions: the fractions below are checked within about 6 standard deviations.


@pytest.fixture(scope="module")
def sched():
  return diffusion.make_schedule(T, "cosine", num_classes=K)


@pytest.fixture(scope="module")
def two_maps():
  rng = np.random.default_rng(0)
  z_a = rng.integers(0, K, SHAPE)
  z_b = (z_a + rng.integers(1, K, SHAPE)) % K  # The maps differ at every position.
  return jnp.asarray(z_a, jnp.int32), jnp.asarray(z_b, jnp.int32)


def _within(fraction: float, expected: float, n: int, sigmas: float = 6.0) -> bool:
  return abs(fraction - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n) + 1e-9


def test_at_t0_the_mix_is_the_mix_of_the_clean_maps(sched, two_maps):
  z_a, z_b = two_maps
  key = jax.random.key(0)
  np.testing.assert_array_equal(diffusion.mix_at_step(key, z_a, z_b, 0, 1.0, sched), z_a)
  np.testing.assert_array_equal(diffusion.mix_at_step(key, z_a, z_b, 0, 0.0, sched), z_b)
  mixed = np.asarray(diffusion.mix_at_step(key, z_a, z_b, 0, 0.3, sched))
  from_a = mixed == np.asarray(z_a)
  assert np.all(from_a | (mixed == np.asarray(z_b)))  # No noise: every position is one of the two maps'.
  assert _within(from_a.mean(), 0.3, from_a.size)
  np.testing.assert_array_equal(diffusion.renoise(key, z_a, 0, sched), z_a)


def test_the_fraction_from_the_first_map_is_lambda_per_example_and_grows_with_it(sched, two_maps):
  z_a, z_b = two_maps
  key = jax.random.key(1)
  lams = jnp.asarray([0.0, 0.25, 0.75, 1.0])
  per_example = np.asarray(diffusion.mix_at_step(key, z_a, z_b, jnp.zeros(4, jnp.int32), lams, sched))
  fractions = (per_example == np.asarray(z_a)).mean(axis=(1, 2))
  assert fractions[0] == 0 and fractions[3] == 1
  assert _within(fractions[1], 0.25, 32 * 32) and _within(fractions[2], 0.75, 32 * 32)
  # One key: the positions taken from the first map at λ = 0.25 are among those at λ = 0.75.
  low, high = (np.asarray(diffusion.mix_at_step(key, z_a, z_b, 0, lam, sched)) == np.asarray(z_a)
               for lam in (0.25, 0.75))
  assert np.all(high[low]) and _within(high.mean(), 0.75, high.size)
  # Noised at t, each map keeps a code with probability ᾱ_t + (1 − ᾱ_t)/K; the mix takes λ of the first.
  t = 10
  keep = float(np.exp(sched.log_alpha_bar[t])) + (1 - float(np.exp(sched.log_alpha_bar[t]))) / K
  mixed = np.asarray(diffusion.mix_at_step(key, z_a, z_b, t, 0.5, sched))
  assert _within((mixed == np.asarray(z_a)).mean(), 0.5 * keep + 0.5 * (1 - keep) / (K - 1), mixed.size)


def test_renoise_keeps_most_codes_at_small_t_and_is_uniform_at_t_big(sched, two_maps):
  z, _ = two_maps
  n = z.size
  for t in (1, 4, T // 2, T):
    alpha_bar = float(np.exp(sched.log_alpha_bar[t]))
    noised = np.asarray(diffusion.renoise(jax.random.key(t), z, t, sched))
    assert _within((noised == np.asarray(z)).mean(), alpha_bar + (1 - alpha_bar) / K, n), t
  small = np.asarray(diffusion.renoise(jax.random.key(5), z, 1, sched))
  assert (small == np.asarray(z)).mean() > 0.99
  counts = np.bincount(np.asarray(diffusion.renoise(jax.random.key(6), z, T, sched)).ravel(), minlength=K)
  assert np.all(np.abs(counts - n / K) < 6 * np.sqrt(n / K)), counts  # Uniform: z is forgotten.


def test_denoise_timesteps_start_at_t_and_follow_the_strided_grid():
  np.testing.assert_array_equal(diffusion.denoise_timesteps(10, 0), [0])
  np.testing.assert_array_equal(diffusion.denoise_timesteps(10, 4), [4, 3, 2, 1, 0])
  # sampling_timesteps(10, 4) = [10, 8, 5, 3, 0], cut at t (t itself always starts it).
  np.testing.assert_array_equal(diffusion.denoise_timesteps(10, 6, 4), [6, 5, 3, 0])
  np.testing.assert_array_equal(diffusion.denoise_timesteps(10, 5, 4), [5, 3, 0])
  np.testing.assert_array_equal(diffusion.denoise_timesteps(10, 10, 4), diffusion.sampling_timesteps(10, 4))
  with pytest.raises(ValueError, match="t must be in 0..10"):
    diffusion.denoise_timesteps(10, 11)


def test_denoise_equals_reverse_chunk_padded_or_not(sched, two_maps):
  """A random prior (x̂_0 logits from a random code-to-code table): denoising from t is the reverse process
  from t, padding a chunk with repeats of its last step changes nothing, and t = 0 returns the map."""
  table = jax.random.normal(jax.random.key(2), (K, K)) * 3.0
  logits_fn = lambda z_t, t: table[z_t] * (1.0 + t[:, None, None, None] / T)  # noqa: E731
  z = diffusion.renoise(jax.random.key(3), two_maps[0], 12, sched)
  key = jax.random.key(4)
  denoised = diffusion.denoise(key, z, 12, logits_fn, sched)
  np.testing.assert_array_equal(denoised,
                                diffusion.reverse_chunk(key, z, np.arange(12, -1, -1), logits_fn, sched))
  padded = np.concatenate([np.arange(12, 4, -1), [4, 4, 4]])
  np.testing.assert_array_equal(
      diffusion.denoise_chunk(key, diffusion.denoise_chunk(key, z, padded, logits_fn, sched),
                              np.array([4, 3, 2, 1, 0, 0, 0]), logits_fn, sched), denoised)
  assert not np.array_equal(denoised, z)
  np.testing.assert_array_equal(diffusion.denoise(key, z, 0, logits_fn, sched), z)
  strided = diffusion.denoise(key, z, 12, logits_fn, sched, num_sampling_steps=8)
  np.testing.assert_array_equal(strided, diffusion.reverse_chunk(key, z, diffusion.denoise_timesteps(T, 12, 8),
                                                                 logits_fn, sched))


def test_t_steps_round_fractions_of_t():
  assert editing.t_steps((0.0, 0.05, 0.1, 0.25, 0.5, 1.0), 20) == [0, 1, 2, 5, 10, 20]
  assert editing.t_steps((0.025, 0.0249), 4000) == [100, 100]  # The authors' t = 100 of 4000.


# ------------------------------------------------------------------------------------------- --mode=edit


@pytest.fixture
def edit_run(pipeline_run, tmp_path):
  """A copy of the shared tiny run (T = 20) with a small grid: 2 pairs, t = 0, 2, 10, λ = 0, 0.5, 1."""
  config, workdir = pipeline_run
  shutil.copytree(workdir.root, tmp_path / "w")
  config = config.copy_and_resolve_references()
  config.edit.update(pairs=2, t_fractions=(0.0, 0.1, 0.5), lambdas=(0.0, 0.5, 1.0))
  return config, Workdir(tmp_path / "w")


def test_edit_writes_its_grids_and_a_rerun_is_skipped(edit_run, capsys):
  config, workdir = edit_run
  stage = stages.BY_NAME["edit"]
  assert not stage.in_pipeline and not stages.is_done(stage, config, workdir)
  assert main.execute(config, str(workdir.root), "edit") == 0, capsys.readouterr().err
  assert stages.is_done(stage, config, workdir)
  res = files_lib.read_npz(workdir.edit_npz)
  codes, size = res["codes"], config.data.image_size
  np.testing.assert_array_equal(res["t"], [0, 2, 10])
  assert res["mix_codes"].shape == (3, 2, 3) + codes.shape[1:]
  assert res["renoise_codes"].shape == (3,) + codes.shape
  assert res["mix_images"].shape == (3, 2, 3, size, size, 1)
  assert res["reconstructions"].shape == (4, size, size, 1)
  # t = 0: nothing is denoised; λ = 1 is image 1's map, λ = 0 image 2's; re-noising to 0 keeps the map.
  np.testing.assert_array_equal(res["mix_codes"][0, :, 2], codes[0::2])
  np.testing.assert_array_equal(res["mix_codes"][0, :, 0], codes[1::2])
  np.testing.assert_array_equal(res["renoise_codes"][0], codes)
  np.testing.assert_array_equal(res["mix_codes"][0], res["mix_noised"][0])
  assert not np.array_equal(res["mix_codes"][2], res["mix_noised"][2])  # t = 10: the prior denoised.
  assert res["mix_codes"].max() < config.refit.num_codes and res["mix_codes"].min() >= 0
  # mix.png: per pair 3 rows (t) of image 1, 3 λ, image 2, a blank row between pairs; renoise.png: 4 x (1 + 3).
  cell = size + 1
  assert np.asarray(Image.open(workdir.edit_mix_grid)).shape[:2] == (7 * cell + 1, 5 * cell + 1)
  assert np.asarray(Image.open(workdir.edit_renoise_grid)).shape[:2] == (4 * cell + 1, 4 * cell + 1)
  record = json.loads(workdir.edit_record.read_text())
  assert record["t"] == [0, 2, 10] and record["lambdas"] == [0.0, 0.5, 1.0] and record["steps"] == 20
  assert stages.run_stage(stage, config, workdir).skipped
  config.edit.seed += 1
  assert not stages.is_done(stage, config, workdir)


@pytest.mark.parametrize("field, value", [("lambdas", (0.5, 1.5)), ("t_fractions", (-0.1, 0.5)),
                                          ("lambdas", ()), ("steps", 21)])
def test_a_bad_edit_setting_exits_2_naming_the_field(tiny_config, tmp_path, capsys, field, value):
  config = tiny_config
  config.edit[field] = value
  assert main.execute(config, str(tmp_path / "w"), "edit") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"vqddm_jax: config.edit.{field} = ") and "Traceback" not in err


def test_more_pairs_than_held_out_maps_exits_2(edit_run, capsys):
  config, workdir = edit_run
  config.edit.pairs = 100_000
  assert main.execute(config, str(workdir.root), "edit") == 2
  err = capsys.readouterr().err
  assert "config.edit.pairs = 100000" in err and "held-out code maps" in err
