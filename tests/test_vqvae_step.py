"""Stage-1 step: 8 devices equal 1 device; non-finite losses skip the update."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from vqddm_jax import parallel
from vqddm_jax.models.vqvae import build_vqvae
from vqddm_jax.training import guard
from vqddm_jax.training import vqvae_step as stage1


@pytest.fixture(scope="module")
def setup():
  config = load_config("configs/mnist.py:tiny")
  model = build_vqvae(config.vqvae, 1)
  # Plain SGD: Adam's first step is lr·sign(g), which turns float-rounding noise in near-zero gradients into
  # full-size differences and would hide what this compares (the gradient averaging).
  optimizer = optax.sgd(0.5)
  state = stage1.init_state(model, optimizer, jax.random.key(0), (32, 32, 1))
  step = functools.partial(stage1.train_step, model=model, optimizer=optimizer, beta=0.25,
                           recon_loss="mse", ema_decay=0.9)
  images = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
  return model, state, step, images


def _on_one_device(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)


def test_pmapped_step_on_8_devices_equals_1_device(setup, num_devices):
  _, state, step, images = setup
  key = jax.random.key(1)
  p8 = parallel.pmap(step, in_axes=parallel.STEP_AXES)
  s8, m8 = p8(parallel.replicate(state), {"image": parallel.shard(images)}, key)
  p1 = parallel.pmap(step, in_axes=parallel.STEP_AXES, devices=jax.devices()[:1])
  s1, m1 = p1(_on_one_device(state), {"image": images[None]}, key)
  for a, b in zip(jax.tree_util.tree_leaves(parallel.unreplicate(s8)),
                  jax.tree_util.tree_leaves(parallel.unreplicate(s1))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(m8["loss"][0], m1["loss"][0], rtol=1e-5)
  assert float(m8["finite"][0]) == 1.0
  # The step really moved the parameters.
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                 parallel.unreplicate(s8).params, state.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_non_finite_loss_skips_update(setup):
  _, state, step, images = setup
  bad = images.copy()
  bad[3, 0, 0, 0] = np.nan
  p8 = parallel.pmap(step, in_axes=parallel.STEP_AXES)
  new, m = p8(parallel.replicate(state), {"image": parallel.shard(bad)}, jax.random.key(1))
  new = parallel.unreplicate(new)
  assert float(m["finite"][0]) == 0.0
  assert int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.ema_params, new.opt_state)),
                  jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_encode_decode_indices_shapes(setup):
  model, state, _, images = setup
  variables = {"params": state.params}
  codes = model.apply(variables, jnp.asarray(images[:2]), method=type(model).encode_to_indices)
  assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
  assert int(codes.max()) < model.codebook_size
  out = model.apply(variables, codes, method=type(model).decode_indices)
  assert out.shape == (2, 32, 32, 1)
  assert float(jnp.abs(out).max()) <= 1.0


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_norm_and_finite_flags_any_non_finite_gradient(bad):
  """The step guard's test: one NaN or ±inf in any leaf, with every other value finite, fails it."""
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=(5,)).astype(np.float32)]}
  if bad is not None:
    tree["b"][0][2] = bad
  norm, ok = jax.jit(guard.norm_and_finite)(tree)
  assert bool(ok) == (bad is None)
  if bad is None:
    expected = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree_util.tree_leaves(tree)))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf])
def test_all_finite_checks_every_leaf_of_device_arrays(bad):
  """The checkpoint guard (the loop's save refuses a state for which this is False) sees one bad value in any
  leaf of device-resident params, whatever the leaf's dtype."""
  tree = {"a": jnp.ones((3, 4)), "b": [jnp.zeros((5,), jnp.bfloat16), np.arange(3, dtype=np.int32)]}
  if bad is not None:
    tree["b"][0] = tree["b"][0].at[2].set(bad)
  assert guard.all_finite(tree) is (bad is None)
