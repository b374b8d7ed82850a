"""Stage 2: the pmapped step (8 devices = 1), exact resume with the importance state, sampling."""
import functools
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from conftest import sigterm_training_at
from vqddm_jax import checkpointing, diffusion, generation, parallel, stages
from vqddm_jax import files as files_lib
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.models.unet import UNet
from vqddm_jax.stages import inpaint, sample, train_prior
from vqddm_jax.training import loop, optim
from vqddm_jax.training import prior_step as stage2
from vqddm_jax.workdir import Workdir


def _one_device(tree):
  """The state with a leading device axis of 1, for a step mapped over one device."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)


def test_prior_step_on_8_devices_equals_1_device(num_devices):
  k, big_t = 7, 12
  model = UNet(num_classes=k, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
  sched = diffusion.make_schedule(big_t, num_classes=k)
  optimizer = optax.sgd(0.5)  # Adam's first step would amplify rounding noise (see test_vqvae_step).
  state = stage2.init_state(model, optimizer, jax.random.key(0), (4, 4), big_t)
  # Importance sampling already on, so the gathered update and the sampled p(t) both matter.
  state = state.replace(importance=diffusion.ImportanceState(
      history=jax.numpy.linspace(0.0, 2.0, big_t + 1), count=jax.numpy.full((big_t + 1,), 11, "int32")))
  step = functools.partial(stage2.train_step, model=model, optimizer=optimizer, sched=sched,
                           parametrization="residual", use_importance=True, ema_decay=0.9, t_buckets=3)
  codes = np.random.default_rng(0).integers(0, k, (16, 4, 4)).astype(np.int32)
  key = jax.random.key(3)
  s8, m8 = parallel.pmap(step, in_axes=parallel.STEP_AXES)(
      parallel.replicate(state), {"codes": parallel.shard(codes)}, key)
  s1, m1 = parallel.pmap(step, in_axes=parallel.STEP_AXES, devices=jax.devices()[:1])(
      _one_device(state), {"codes": codes[None]}, key)
  s8, s1 = parallel.unreplicate(s8), parallel.unreplicate(s1)
  np.testing.assert_array_equal(s8.importance.count, s1.importance.count)
  assert int(s8.importance.count.sum()) == int(state.importance.count.sum()) + 16
  np.testing.assert_allclose(s8.importance.history, s1.importance.history, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s8.params), jax.tree_util.tree_leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(m8["loss_bits_per_code"][0], m1["loss_bits_per_code"][0], rtol=1e-5)
  assert float(m8["importance_on"][0]) == 1.0 and float(m8["finite"][0]) == 1.0


def test_hybrid_loss_adds_lambda_times_the_x0_cross_entropy_gradient(num_devices):
  k, big_t = 7, 12
  model = UNet(num_classes=k, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
  sched = diffusion.make_schedule(big_t, num_classes=k)
  optimizer = optax.sgd(1.0)  # The update is −gradient, so it is linear in λ.
  state = stage2.init_state(model, optimizer, jax.random.key(0), (4, 4), big_t)
  codes = np.random.default_rng(1).integers(0, k, (8, 4, 4)).astype(np.int32)

  def run(weight, all_devices=False):
    step = functools.partial(stage2.train_step, model=model, optimizer=optimizer, sched=sched,
                             parametrization="x0", use_importance=False, ema_decay=0.0, t_buckets=2,
                             hybrid_ce_weight=weight)
    if all_devices:
      new, m = parallel.pmap(step, in_axes=parallel.STEP_AXES)(
          parallel.replicate(state), {"codes": parallel.shard(codes)}, jax.random.key(3))
    else:
      new, m = parallel.pmap(step, in_axes=parallel.STEP_AXES, devices=jax.devices()[:1])(
          _one_device(state), {"codes": codes[None]}, jax.random.key(3))
    delta = [np.asarray(a)[0] - np.asarray(b) for a, b in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params))]
    return np.concatenate([d.ravel() for d in delta]), m

  d0, m0 = run(0.0)
  d1, m1 = run(0.5)
  d2, m2 = run(2.0)
  # The metrics are taken before the update: the −ELBO estimate and the cross-entropy do not depend on λ.
  for m in (m1, m2):
    np.testing.assert_allclose(m["loss_bits_per_code"], m0["loss_bits_per_code"], rtol=1e-6)
  np.testing.assert_allclose(m2["x0_ce_bits_per_code"], m1["x0_ce_bits_per_code"], rtol=1e-6)
  assert 0.0 < float(m1["x0_ce_bits_per_code"][0]) < 2 * np.log2(k)
  assert "x0_ce_bits_per_code" not in m0  # The pure −ELBO step computes no cross-entropy.
  ce_part = d1 - d0
  assert np.linalg.norm(ce_part) > 1e-3 * np.linalg.norm(d0)
  np.testing.assert_allclose(d2 - d0, 4.0 * ce_part, rtol=1e-3, atol=1e-6 * np.abs(d0).max())
  # Over 8 devices (one map each) the averaged gradient and metrics are those of the whole batch on one.
  d2_8, m2_8 = run(2.0, all_devices=True)
  np.testing.assert_allclose(d2_8, d2, rtol=1e-4, atol=1e-6 * np.abs(d2).max())
  for name in ("loss_bits_per_code", "x0_ce_bits_per_code"):
    np.testing.assert_allclose(m2_8[name][0], m2[name][0], rtol=1e-5)


def _prior_state(config, workdir):
  meta = codes_lib.read_meta(workdir.code_store)
  k = int(meta["codebook_size"])
  model = prior_lib.build_denoiser(config, k)
  optimizer = optim.make_optimizer(config.prior_train.optim, config.prior_train.num_steps)
  abstract = jax.eval_shape(lambda: stage2.init_state(model, optimizer, jax.random.key(0), (8, 8),
                                                      config.diffusion.num_steps))
  ckpt = checkpointing.Checkpointer(workdir.prior.checkpoints, read_only=True)
  try:
    return ckpt.restore(abstract)[0]
  finally:
    ckpt.close()


def test_prior_resume_after_sigterm_is_exact(pipeline_run, monkeypatch, tmp_path):
  config, workdir = pipeline_run
  reference = _prior_state(config, workdir)
  fresh = Workdir(tmp_path / "w")
  shutil.copytree(workdir.root / "codes", fresh.root / "codes")
  real_run = sigterm_training_at(monkeypatch, 2)
  assert not train_prior.run(config, fresh).completed
  assert not train_prior.is_done(config, fresh)
  monkeypatch.setattr(loop, "run", real_run)
  assert train_prior.run(config, fresh).completed and train_prior.is_done(config, fresh)
  state = _prior_state(config, fresh)
  assert int(state.step) == config.prior_train.num_steps
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(a, b)
  assert int(state.importance.count.sum()) == config.prior_train.num_steps * config.prior_train.batch_size


def test_prior_eval_reports_bits_per_code_against_uniform(pipeline_run):
  import json
  _, workdir = pipeline_run
  ev = json.loads(workdir.prior.eval_json.read_text())
  assert ev["num_maps"] == 32 and ev["stderr"] > 0 and np.isfinite(ev["nelbo_bits_per_code"])
  k = codes_lib.read_meta(workdir.code_store)["codebook_size"]
  assert ev["uniform_bits_per_code"] == pytest.approx(np.log2(k))


def _npz(result):
  return files_lib.read_npz(files_lib.as_path(next(p for p in result.outputs if p.endswith(".npz"))))


def test_sampling_is_deterministic_per_key_and_strided_sampling_runs(pipeline_run):
  config, workdir = pipeline_run
  assert stages.is_done(stages.BY_NAME["sample"], config, workdir)  # The pipeline sampled with these settings already.
  first = sample.run(config, workdir)
  a = _npz(first)  # Read eagerly: later runs overwrite the same file.
  assert a["codes"].shape == (config.sample.num_samples, 8, 8)
  assert a["images"].shape == (config.sample.num_samples, 32, 32, 1)
  assert os.path.exists(first.outputs[0]) and first.outputs[0].endswith("samples_S20_n16_seed1.png")
  strided_config = config.copy_and_resolve_references()
  strided_config.sample.steps = 5
  assert not stages.is_done(stages.BY_NAME["sample"], strided_config, workdir)
  strided = sample.run(strided_config, workdir)
  assert strided.outputs[1].endswith("_S5_n16_seed1.npz") and stages.is_done(stages.BY_NAME["sample"], strided_config, workdir)
  config2 = config.copy_and_resolve_references()
  config2.sample.seed = 99
  assert not stages.is_done(stages.BY_NAME["sample"], config2, workdir)
  other_seed = sample.run(config2, workdir)
  assert other_seed.outputs[1].endswith("_S20_n16_seed99.npz") and os.path.exists(first.outputs[1])
  c = _npz(other_seed)
  assert not np.array_equal(a["codes"], c["codes"])
  # Last, the pipeline's own settings again (other tests read the shared run's samples).
  b = _npz(sample.run(config, workdir))
  np.testing.assert_array_equal(a["codes"], b["codes"])
  assert stages.is_done(stages.BY_NAME["sample"], config, workdir)


def test_chunked_sampler_compiles_once_per_chunk_length_and_matches_one_chunk(pipeline_run, monkeypatch):
  config, workdir = pipeline_run
  gen = generation.load_generator(config, workdir)
  rparams = parallel.replicate(gen.prior.params)
  traced = []
  real = diffusion.reverse_chunk

  def counting(key, z, ts_chunk, logits_fn, sched):
    traced.append(ts_chunk.shape[0])
    return real(key, z, ts_chunk, logits_fn, sched)
  monkeypatch.setattr(diffusion, "reverse_chunk", counting)
  run = lambda chunk: generation.sample_code_maps(  # noqa: E731
      gen, rparams, key=jax.random.key(5), per_device=1, num_sampling_steps=None, chunk=chunk)
  # T = 20 in chunks of 8 transitions: 8, 8, 4 -> one program per chunk length, the state stays on device.
  chunked = run(8)
  assert config.diffusion.num_steps == 20 and sorted(traced) == [5, 9]
  np.testing.assert_array_equal(chunked, run(20))


@pytest.mark.parametrize("mask", ["left_half", "random:0.5"])
def test_inpainting_keeps_every_known_code_and_fills_the_rest(pipeline_run, mask):
  config, workdir = pipeline_run
  config = config.copy_and_resolve_references()
  config.inpaint.update(mask=mask, steps=5)
  assert not stages.is_done(stages.BY_NAME["inpaint"], config, workdir)
  out = inpaint.run(config, workdir)
  assert stages.is_done(stages.BY_NAME["inpaint"], config, workdir)
  res = _npz(out)
  m = res["mask"]
  assert 0 < m.mean() < 1
  np.testing.assert_array_equal(res["codes"][m], res["known"][m])
  assert not np.array_equal(res["codes"][~m], res["known"][~m])
  assert res["codes"].shape == res["known"].shape and res["codes"].max() < config.refit.num_codes
  assert res["images"].shape == res["originals"].shape and os.path.exists(out.outputs[0])


def test_bad_inpaint_mask_is_rejected():
  from conftest import load_config
  from vqddm_jax import config_schema
  config = load_config("configs/mnist.py")
  config.inpaint.mask = "diagonal"
  with pytest.raises(ValueError, match=r"config\.inpaint\.mask = 'diagonal'.*random:FRACTION"):
    config_schema.validate_config(config)


def test_code_batches_split_global_batches_across_hosts():
  """Two hosts x 2 devices draw exactly one host x 4 devices' global batches; held-out passes cover every
  map once, with the same number of batches on every host."""
  codes = np.random.default_rng(0).integers(0, 50, (103, 4, 4)).astype(np.int32)
  one = codes_lib.CodeBatches(codes, per_shard=3, num_shards=4, seed=5)
  hosts = [codes_lib.CodeBatches(codes, per_shard=3, num_shards=2, seed=5, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(12):  # 103 // 12 = 8 batches per epoch: crosses an epoch
    np.testing.assert_array_equal(np.concatenate([next(h)["codes"] for h in hosts]), next(one)["codes"])
  assert hosts[0].position == hosts[1].position == one.position == {"epoch": 1, "batch": 4}
  passes = [list(codes_lib.eval_code_batches(codes, per_shard=3, num_shards=2, max_examples=101,
                                             process_index=p, process_count=2)) for p in range(2)]
  assert len(passes[0]) == len(passes[1]) == 9  # ceil(ceil(101 / 2) / 6)
  seen = np.concatenate([b["codes"].reshape(-1, 4, 4)[b["mask"].reshape(-1)] for p in passes for b in p])
  np.testing.assert_array_equal(seen, codes[:101])
