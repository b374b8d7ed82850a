"""The VQGAN losses of stage 1 and ReFiT: PatchGAN, hinge loss, adaptive weight λ, disc_start, the pmapped
step with its discriminator state (BatchNorm statistics, NaN guard), exact resume, config validation."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, sigterm_training_at
from vqddm_jax import checkpointing, config_schema, parallel
from vqddm_jax.models import quantizer
from vqddm_jax.models.discriminator import NLayerDiscriminator
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.stages import refit as refit_stage
from vqddm_jax.stages import train_vqvae
from vqddm_jax.training import gan_losses, loop, optim, vq_trainer, vqgan_step, vqvae_step
from vqddm_jax.training.gan_losses import LossSettings
from vqddm_jax.workdir import Workdir

# -------------------------------------------------------------------------------------- discriminator


def test_patch_logits_shape_and_parameter_layout():
  disc = NLayerDiscriminator()  # ndf 64, 3 layers: the VQGAN recipe
  shapes = jax.eval_shape(lambda: disc.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False))
  out = jax.eval_shape(lambda v: disc.apply(v, jnp.zeros((2, 256, 256, 3)), train=False), shapes)
  assert out.shape == (2, 30, 30, 1)  # the 70x70 PatchGAN's 30x30 logits
  p = shapes["params"]
  assert p["conv_0"]["kernel"].shape == (4, 4, 3, 64) and "bias" in p["conv_0"]
  assert [p[f"conv_{i}"]["kernel"].shape[-1] for i in (1, 2, 3)] == [128, 256, 512]
  assert all("bias" not in p[f"conv_{i}"] for i in (1, 2, 3))
  assert p["conv_out"]["kernel"].shape == (4, 4, 512, 1) and "bias" in p["conv_out"]
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(p))
  assert count == 2_765_633  # taming-transformers' NLayerDiscriminator(3, 64, 3)


def test_initial_statistics():
  disc = NLayerDiscriminator(ndf=32)
  variables = jax.jit(lambda key: disc.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
  p = variables["params"]
  big = np.asarray(p["conv_3"]["kernel"])  # 524k entries
  assert abs(big.mean()) < 1e-3 and abs(big.std() - 0.02) < 5e-4
  scale = np.concatenate([np.asarray(p[f"norm_{i}"]["scale"]) for i in (1, 2, 3)])
  assert abs(scale.mean() - 1.0) < 5e-3 and abs(scale.std() - 0.02) < 5e-3
  for bias in (p["conv_0"]["bias"], p["conv_out"]["bias"], p["norm_2"]["bias"]):
    np.testing.assert_array_equal(bias, 0.0)
  stats = variables["batch_stats"]["norm_1"]
  np.testing.assert_array_equal(stats["mean"], 0.0)
  np.testing.assert_array_equal(stats["var"], 1.0)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  logits, updated = jax.jit(lambda v: disc.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  assert logits.shape == (2, 2, 2, 1)
  assert not np.array_equal(updated["batch_stats"]["norm_1"]["mean"], stats["mean"])


# ---------------------------------------------------------------------------------------- loss terms


def test_hinge_and_generator_losses_on_known_logits():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-3.0, 0.0, 1.5])
  # relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 2.5): ½ (5/6 + 7/6) = 1
  np.testing.assert_allclose(gan_losses.hinge_d_loss(real, fake), 1.0, rtol=1e-6)
  np.testing.assert_allclose(gan_losses.hinge_d_loss(jnp.full((4,), 3.0), jnp.full((4,), -2.0)), 0.0)
  np.testing.assert_allclose(gan_losses.generator_adv_loss(fake), 0.5, rtol=1e-6)


def test_disc_factor_is_zero_before_disc_start():
  np.testing.assert_array_equal(gan_losses.disc_factor(jnp.arange(5), 2), [0, 0, 1, 1, 1])
  assert float(gan_losses.disc_factor(jnp.array(0), 0)) == 1.0


def test_adaptive_weight_ratio_and_clamp():
  nll, g = {"k": jnp.array([3.0, 4.0])}, {"k": jnp.array([6.0, 8.0])}
  np.testing.assert_allclose(gan_losses.adaptive_weight(nll, g, 0.8), 5 / (10 + 1e-4) * 0.8, rtol=1e-6)
  zero = {"k": jnp.zeros(2)}
  np.testing.assert_allclose(gan_losses.adaptive_weight(nll, zero, 0.8), 1e4 * 0.8)  # 5 / 1e-4 clamped
  assert float(gan_losses.adaptive_weight(zero, g, 0.8)) == 0.0


class _Decoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    return nn.Conv(1, (3, 3), name="conv_out")(nn.tanh(nn.Conv(4, (3, 3), name="conv_in")(z)))


class _ToyVQ(nn.Module):
  """The VQVAE interface in miniature: (x̂, Quantized), decoder's last kernel at decoder/conv_out."""
  codebook_size: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(2, (3, 3), name="encoder")(x)
    codebook = self.param("codebook", nn.initializers.normal(1.0), (self.codebook_size, 2))
    q = quantizer.quantize(h, codebook)
    return _Decoder(name="decoder")(q.z_q), q


def test_lambda_and_gradient_match_an_independent_computation():
  model, disc = _ToyVQ(), NLayerDiscriminator(ndf=4, num_layers=1)
  images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
  params = model.init(jax.random.key(2), images)["params"]
  dvars = disc.init(jax.random.key(3), images, train=False)
  state = vqgan_step.with_discriminator(vqvae_step.VQState(jnp.array(5), params, params, ()), dvars,
                                        optax.adam(1e-3))
  settings = LossSettings(recon_loss="l1", disc_weight=0.8, disc_start=5)

  @functools.partial(jax.jit, static_argnums=1)
  def run(state, settings=settings):  # one device, under the axis name the step's collectives use
    fn = lambda x: vqgan_step.generator_grads(state, x, jax.random.key(0), None, model=model,  # noqa: E731
                                              disc=disc, beta=0.25, settings=settings)
    return jax.vmap(fn, axis_name=parallel.AXIS)(images[None])

  grads, _, out = run(state)

  def terms(p):
    x_rec, q = model.apply({"params": p}, images)
    logits, _ = disc.apply(dvars, x_rec, train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.abs(x_rec - images)), -jnp.mean(logits), q.codebook_loss + 0.25 * q.commitment_loss

  # Independently: the gradient of each term w.r.t. all parameters, one term at a time.
  jacobian = jax.jit(jax.jacrev(lambda p: jnp.stack(terms(p))))(params)  # leaves [3, ...]
  g_nll, g_adv = (jacobian["decoder"]["conv_out"]["kernel"][i] for i in (0, 1))
  lam = min(float(jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_adv) + 1e-4)), 1e4) * 0.8
  np.testing.assert_allclose(out["lambda"][0], lam, rtol=1e-5)
  assert float(out["disc_factor"][0]) == 1.0
  want = jax.tree_util.tree_map(lambda j: j[0] + lam * j[1] + j[2], jacobian)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a[0], b, rtol=2e-5, atol=1e-6)
  # Before disc_start the adversarial term adds nothing.
  grads, _, out = run(state.replace(step=jnp.array(4)))
  want = jax.tree_util.tree_map(lambda j: j[0] + j[2], jacobian)
  assert float(out["disc_factor"][0]) == 0.0
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a[0], b, rtol=2e-5, atol=1e-6)
  # disc_adaptive=False: the fixed weight disc_weight instead of λ.
  grads, _, out = run(state, dataclasses.replace(settings, disc_adaptive=False))
  assert float(out["lambda"][0]) == pytest.approx(0.8)
  want = jax.tree_util.tree_map(lambda j: j[0] + 0.8 * j[1] + j[2], jacobian)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a[0], b, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ the pmapped step and the stage


def _gan_config():
  """configs/mnist.py:tiny with L1 + LPIPS + GAN (the discriminator joins at step 2, mid-run), and fewer
  layers than tiny's VQ-VAE and PatchGAN: compiling the step is what these tests spend their time on."""
  config = load_config("configs/mnist.py:tiny")
  config.vqvae.update(ch_mult=(1, 2), num_res_blocks=0)
  config.vqvae_train.update(recon_loss="l1", perceptual_weight=1.0, disc_weight=0.8, disc_start=2)
  config.discriminator.update(ndf=8, num_layers=2)
  return config_schema.validate_config(config)


@pytest.fixture(scope="module")
def gan_step():
  """The stage-1 step exactly as `train_vqvae` builds it for `_gan_config()` (the same compiled program)."""
  config = _gan_config()
  tcfg = config.vqvae_train
  model = build_vqvae(config.vqvae, 1)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  state = jax.jit(lambda key: vqvae_step.init_state(model, optimizer, key, (32, 32, 1)))(jax.random.key(0))
  state = vq_trainer.attach_discriminator(config, tcfg, state)
  p_step = vq_trainer.make_p_step(config, tcfg, model=model, optimizer=optimizer, beta=0.25)
  images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)

  def run(host_state, images=images):
    # Inputs placed as the training loop places them, so the program is the stage's, compiled once.
    batch = parallel.to_devices({"image": parallel.shard(images)})
    new, out = p_step(parallel.replicate(host_state), batch, jax.random.key(1))
    return new, {k: float(v) for k, v in parallel.unreplicate(out).items()}

  return state, run


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_step_before_disc_start_moves_statistics_not_discriminator(gan_step):
  state, run = gan_step
  assert isinstance(state, vqgan_step.VQGANState)
  new, out = run(state)  # step 0 < disc_start 2
  host = parallel.unreplicate(new)
  assert out["finite"] == 1.0 and out["disc_factor"] == 0.0 and out["d_loss"] == 0.0
  assert out["perceptual"] > 0 and np.isfinite(out["lambda"]) and out["lambda"] > 0
  assert _equal(host.disc_params, state.disc_params)  # zero gradients: Adam moves nothing
  assert not _equal(host.disc_stats, state.disc_stats)
  assert not _equal(host.params, state.params)


def test_step_after_disc_start_updates_discriminator_identically_on_every_device(gan_step):
  state, run = gan_step
  new, out = run(state.replace(step=jnp.array(2, jnp.int32)))
  assert out["finite"] == 1.0 and out["disc_factor"] == 1.0 and out["d_loss"] > 0
  for key in ("loss", "recon", "perceptual", "g_loss", "lambda", "logits_real", "logits_fake",
              "disc_grad_norm", "grad_norm"):
    assert np.isfinite(out[key]), key
  host = parallel.unreplicate(new)
  assert not _equal(host.disc_params, state.disc_params)
  assert not _equal(host.disc_stats, state.disc_stats)
  # BatchNorm normalises per device but the running averages are averaged: replicas stay identical.
  for leaf in jax.tree_util.tree_leaves((new.disc_stats, new.disc_params)):
    shards = np.asarray(leaf)
    assert all(np.array_equal(shards[0], s) for s in shards[1:])


def test_non_finite_step_leaves_both_networks_unchanged(gan_step):
  state, run = gan_step
  bad = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  bad[5, 3, 3, 0] = np.nan
  new, out = run(state.replace(step=jnp.array(2, jnp.int32)), bad)
  host = parallel.unreplicate(new)
  assert out["finite"] == 0.0 and int(host.step) == 3
  for name in ("params", "ema_params", "opt_state", "disc_params", "disc_stats", "disc_opt_state"):
    assert _equal(getattr(host, name), getattr(state, name)), name


def _restore(config, workdir):
  tcfg = config.vqvae_train
  model = build_vqvae(config.vqvae, 1)
  optimizer = optim.make_optimizer(tcfg.optim, tcfg.num_steps)
  abstract = jax.eval_shape(lambda: vq_trainer.attach_discriminator(
      config, tcfg, vqvae_step.init_state(model, optimizer, jax.random.key(0), (32, 32, 1))))
  ckpt = checkpointing.Checkpointer(workdir.vqvae.checkpoints, read_only=True)
  try:
    return ckpt.restore(abstract)[0]
  finally:
    ckpt.close()


def _scalar_tags(directory) -> set:
  import tensorflow as tf
  tags = set()
  for path in directory.iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_resume_is_bit_exact_and_refit_inherits_the_discriminator(tiny_config, monkeypatch, tmp_path):
  config = _gan_config()
  config.data.data_dir = tiny_config.data.data_dir
  reference_dir = Workdir(tmp_path / "uninterrupted")
  assert train_vqvae.run(config, reference_dir).completed
  reference = _restore(config, reference_dir)
  assert int(reference.step) == 4
  tags = _scalar_tags(reference_dir.vqvae.tensorboard)
  for name in ("recon", "perceptual", "g_loss", "d_loss", "logits_real", "logits_fake", "disc_factor",
               "lambda", "codebook", "commitment"):
    assert f"vqvae/{name}" in tags, name

  workdir = Workdir(tmp_path / "resumed")
  real_run = sigterm_training_at(monkeypatch, 2)
  assert not train_vqvae.run(config, workdir).completed
  assert checkpointing.latest_step(workdir.vqvae.checkpoints) == 2
  monkeypatch.setattr(loop, "run", real_run)
  assert train_vqvae.run(config, workdir).completed
  state = _restore(config, workdir)
  assert int(state.step) == 4
  for name in ("params", "ema_params", "opt_state", "disc_params", "disc_stats", "disc_opt_state"):
    assert _equal(getattr(state, name), getattr(reference, name)), name

  # ReFiT with a discriminator starts from stage 1's; without one it has none to start from.
  config.refit.update(disc_weight=0.8)
  inherited = refit_stage._stage1_discriminator(config, workdir)
  assert _equal(inherited["params"], reference.disc_params)
  assert _equal(inherited["batch_stats"], reference.disc_stats)
  config.refit.disc_weight = 0.0
  assert refit_stage._stage1_discriminator(config, workdir) is None


# ------------------------------------------------------------------------------------------- configs


def test_reconstruction_only_configs_keep_the_plain_state():
  config = load_config("configs/mnist.py")
  for section in (config.vqvae_train, config.refit):
    assert LossSettings.from_section(section).plain
  state = vqvae_step.VQState(jnp.zeros((), jnp.int32), {}, {}, ())
  assert vq_trainer.attach_discriminator(config, config.vqvae_train, state) is state


@pytest.mark.parametrize("spec", ["configs/celeba.py", "configs/lsun_church.py"])
def test_paper_configs_use_the_vqgan_losses(spec):
  config = load_config(spec)
  stage1, refit = config.vqvae_train, config.refit
  assert LossSettings.from_section(stage1) == LossSettings("l1", 1.0, 0.8, 10_000, True)
  assert (refit.recon_loss, refit.perceptual_weight, refit.disc_weight) == ("l1", 1.0, 0.8)
  assert refit.disc_start == 0
  for opt in (stage1.optim, stage1.disc_optim):
    assert (opt.lr, opt.b1, opt.b2, opt.schedule) == (pytest.approx(4.5e-6 * 64), 0.5, 0.9, "constant")
  assert refit.optim.lr == refit.disc_optim.lr and refit.optim.lr >= 50 * 2e-6


@pytest.mark.parametrize("field,value,words", [
    ("vqvae_train.perceptual_weight", -1.0, "number in"),
    ("vqvae_train.disc_weight", -0.1, "number in"),
    ("vqvae_train.disc_start", -5, "integer in"),
    ("vqvae_train.disc_optim.b2", 1.5, "number in"),
    ("refit.recon_loss", "l2", "one of"),
    ("refit.perceptual_weight", float("nan"), "number in"),
    ("refit.disc_optim.schedule", "linear", "one of"),
])
def test_bad_loss_value_names_the_field(field, value, words):
  config = load_config("configs/mnist.py")
  section, *rest = field.split(".")
  node = config[section]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = value
  with pytest.raises(ValueError, match=rf"config\.{field.replace('.', r'[.]')} = .*{words}"):
    config_schema.validate_config(config)


def test_discriminator_and_lpips_must_fit_the_images():
  config = load_config("configs/mnist.py")
  config.vqvae_train.disc_weight = 0.8
  config.discriminator.num_layers = 4  # 32 / 16 - 2 = 0 logits
  with pytest.raises(ValueError, match=r"config\.discriminator\.num_layers = 4 .*at most .* = 3"):
    config_schema.validate_config(config)
  config = load_config("configs/mnist.py")
  config.data.image_size = 12
  config.vqvae.ch_mult = (1, 2)
  config.prior.ch_mult = (1, 2)
  config.refit.perceptual_weight = 1.0
  with pytest.raises(ValueError, match=r"config\.refit\.perceptual_weight = 1\.0 .*LPIPS needs"):
    config_schema.validate_config(config)
