"""bfloat16 compute: matmuls and convolutions run in bf16, parameters / optimiser state / EMA stay float32, and
one pmapped step lands close to the float32 step (stage 1 and the prior)."""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from vqddm_jax import config_schema, diffusion, parallel
from vqddm_jax.errors import ConfigError
from vqddm_jax.models.unet import UNet
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.training import prior_step as stage2
from vqddm_jax.training import vqvae_step as stage1

_HEAVY = ("dot_general", "conv_general_dilated")


def _heavy_input_dtypes(fn, *args) -> set[str]:
  """dtypes of the operands of every matmul / convolution in `fn`'s jaxpr (sub-jaxprs included)."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _HEAVY:
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _all_float32(tree) -> bool:
  return all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def _update_cosine(new_a, new_b, old) -> float:
  """Cosine between the whole-model updates Δa and Δb (Δ = new − old, all leaves as one vector)."""
  flat = lambda new: np.concatenate([  # noqa: E731
      (np.asarray(n, np.float64) - np.asarray(o, np.float64)).ravel()
      for n, o in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))])
  a, b = flat(new_a), flat(new_b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _one_device_step(step, state, batch, key):
  """The real pmapped step on one device (a one-device program compiles once, like the 8-device one)."""
  one = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)  # noqa: E731
  new, m = parallel.pmap(step, in_axes=parallel.STEP_AXES, devices=jax.devices()[:1])(
      one(state), one(batch), key)
  return parallel.unreplicate(new), jax.device_get(m)


def test_prior_bf16_step_is_finite_float32_state_and_close_to_f32():
  k, big_t = 16, 20
  sched = diffusion.make_schedule(big_t, num_classes=k)
  optimizer = optax.sgd(0.5)
  models = {d: UNet(num_classes=k, ch=16, ch_mult=(1, 2), num_res_blocks=1, groups=4, dtype=d)
            for d in (jnp.float32, jnp.bfloat16)}
  state = stage2.init_state(models[jnp.float32], optimizer, jax.random.key(0), (8, 8), big_t)
  z = jnp.zeros((2, 8, 8), jnp.int32)
  t = jnp.array([1, big_t], jnp.int32)
  assert _heavy_input_dtypes(lambda p: models[jnp.bfloat16].apply({"params": p}, z, t),
                             state.params) == {"bfloat16"}
  assert _heavy_input_dtypes(lambda p: models[jnp.float32].apply({"params": p}, z, t),
                             state.params) == {"float32"}
  codes = np.random.default_rng(0).integers(0, k, (16, 8, 8)).astype(np.int32)
  out = {}
  for dtype, model in models.items():
    step = functools.partial(stage2.train_step, model=model, optimizer=optimizer, sched=sched,
                             parametrization="residual", use_importance=False, ema_decay=0.9,
                             t_buckets=2)
    out[dtype] = _one_device_step(step, state, {"codes": codes}, jax.random.key(1))
  (s16, m16), (s32, m32) = out[jnp.bfloat16], out[jnp.float32]
  assert float(m16["finite"][0]) == 1.0
  assert _all_float32((s16.params, s16.ema_params, s16.opt_state))
  np.testing.assert_allclose(m16["loss_bits_per_code"][0], m32["loss_bits_per_code"][0], rtol=2e-2)
  assert _update_cosine(s16.params, s32.params, state.params) > 0.98


def test_vqvae_bf16_step_is_finite_float32_state_and_close_to_f32():
  config = load_config("configs/mnist.py:tiny")
  optimizer = optax.sgd(0.5)
  out, state = {}, None
  images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  for dtype in ("float32", "bfloat16"):
    config.vqvae.dtype = dtype
    model = build_vqvae(config.vqvae, 1)
    if state is None:
      state = stage1.init_state(model, optimizer, jax.random.key(0), (32, 32, 1))
    found = _heavy_input_dtypes(lambda p, m=model: m.apply({"params": p}, images[:2])[0], state.params)
    # The quantiser's distances are the one float32 matmul of the bf16 model.
    assert found == ({"float32"} if dtype == "float32" else {"bfloat16", "float32"}), found
    step = functools.partial(stage1.train_step, model=model, optimizer=optimizer, beta=0.25,
                             recon_loss="mse", ema_decay=0.9)
    out[dtype] = _one_device_step(step, state, {"image": images}, jax.random.key(1))
  (s16, m16), (s32, m32) = out["bfloat16"], out["float32"]
  assert float(m16["finite"][0]) == 1.0
  assert _all_float32((s16.params, s16.ema_params, s16.opt_state))
  np.testing.assert_allclose(m16["loss"][0], m32["loss"][0], rtol=2e-2)
  # Lower than the prior's: at initialisation many features sit near-equidistant from two codes, and bf16
  # rounding moves a few of them (about 2 %) to the other code, which changes their straight-through path.
  assert _update_cosine(s16.params, s32.params, state.params) > 0.85


@pytest.mark.parametrize("field", ["vqvae.dtype", "prior.dtype"])
def test_config_rejects_an_unknown_compute_dtype(field):
  config = load_config("configs/mnist.py:tiny")
  section, name = field.split(".")
  config[section][name] = "float16"
  with pytest.raises(ConfigError, match=f"config.{field}.*'bfloat16'"):
    config_schema.validate_config(config)
