"""Tests of the stage-2 denoiser (vqddm_jax/models/unet.py): shapes, parameter count, ReZero, jit."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.models import unet

K = 11
H, W = 8, 4  # non-square on purpose
T = 50

# Compiling dominates these tests; XLA's cheapest backend settings cut compile time about 4x on CPU and
# change nothing the tests check.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _tiny(**overrides) -> unet.UNet:
  kw = dict(num_classes=K, ch=16, ch_mult=(1, 2), num_res_blocks=2, attention=True, groups=8)
  kw.update(overrides)
  return unet.UNet(**kw)


@pytest.fixture(scope="module")
def tiny():
  """One jitted init + apply of the tiny network, shared by the tests below (compiling dominates)."""
  model = _tiny()
  z = jax.random.randint(jax.random.PRNGKey(1), (3, H, W), 0, K, dtype=jnp.int32)
  t = jnp.array([1, 25, T], jnp.int32)
  params = _jit(model.init)(jax.random.PRNGKey(0), z, t)["params"]
  apply = _jit(lambda p, zz, tt: model.apply({"params": p}, zz, tt))
  return model, params, apply, z, t


def test_output_shape_and_dtype(tiny):
  _, params, apply, z, t = tiny
  out = apply(params, z, t)
  assert out.shape == (3, H, W, K) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_celeba_parameter_count_matches_authors():
  # CelebA: K 512, 16x16 codes, ch 128, ch_mult (1,2,4,8); the authors' Unet has 117.4 M parameters.
  model = unet.UNet(num_classes=512, ch=128, ch_mult=(1, 2, 4, 8))
  n = unet.count_params(unet.param_shapes(model, 16, 16))
  assert abs(n / 117.4e6 - 1) < 0.02, n
  # The exact count of the authors' PyTorch module, computed by hand from its layer list: a change here
  # means the architecture moved away from theirs.
  assert n == 117_454_984


def test_rezero_scales_start_at_zero_so_attention_is_identity(tiny):
  model, params, apply, z, t = tiny
  scales = {k: v for k, v in params.items() if k.endswith("_attn")}
  # Down levels 0, 1, the middle, and up level 1 (the up path has len(ch_mult) - 1 levels).
  assert sorted(scales) == ["down_0_attn", "down_1_attn", "mid_attn", "up_1_attn"]
  for block in scales.values():
    assert float(block["rezero_scale"]) == 0.0
  # The same network without attention blocks has exactly the remaining parameters and the same output.
  plain = _tiny(attention=False, mid_attention=False)
  rest = {k: v for k, v in params.items() if k not in scales}
  out = _jit(lambda p: plain.apply({"params": p}, z, t))(rest)
  np.testing.assert_allclose(np.asarray(out), np.asarray(apply(params, z, t)), rtol=1e-5, atol=1e-5)


def test_output_depends_on_t_and_on_z(tiny):
  _, params, apply, z, t = tiny
  base = np.asarray(apply(params, z, t))
  # Same codes in every row: only t differs between rows, including the ends t = 1 and t = T.
  same_z = jnp.broadcast_to(z[:1], z.shape)
  by_t = np.asarray(apply(params, same_z, t))
  assert np.abs(by_t[0] - by_t[1]).max() > 1e-4 and np.abs(by_t[0] - by_t[2]).max() > 1e-4
  other_z = (z + 1) % K
  assert np.abs(np.asarray(apply(params, other_z, t)) - base).max() > 1e-4


def test_jit_grad_reaches_every_parameter_but_silent_attention(tiny):
  model, params, _, z, t = tiny

  def loss(p):
    logits = model.apply({"params": p}, z, t)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), z[..., None], axis=-1))

  grads = _jit(jax.grad(loss))(params)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.isfinite(np.asarray(g)).all() for _, g in leaves)
  dead = [jax.tree_util.keystr(k) for k, g in leaves if not np.any(np.asarray(g) != 0)]
  # While the ReZero scales are 0 the attention weights get no gradient, but the scales themselves do,
  # so training can switch attention on; every other tensor gets a gradient.
  assert dead and all("['attn']" in k for k in dead), dead
  for name in ("down_0_attn", "mid_attn", "up_1_attn"):
    assert float(grads[name]["rezero_scale"]) != 0.0


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
  _, params, apply, z, t = tiny
  model = _tiny(dtype=jnp.bfloat16)
  out = _jit(lambda p: model.apply({"params": p}, z, t))(params)
  assert out.dtype == jnp.float32 and out.shape == (3, H, W, K)
  ref = np.asarray(apply(params, z, t))
  err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def test_dropout_only_in_train_mode(tiny):
  _, params, apply, z, t = tiny
  model = _tiny(dropout=0.5)
  # Eval mode needs no rng and is the plain network (flax's Dropout is the identity when deterministic).
  f = _jit(lambda p, key: model.apply({"params": p}, z, t, train=True, rngs={"dropout": key}))
  out = np.asarray(f(params, jax.random.PRNGKey(0)))
  assert np.isfinite(out).all() and np.abs(out - np.asarray(apply(params, z, t))).max() > 1e-4


@pytest.mark.parametrize("shape", [(1, 6, 8), (1, 8, 10), (1, 4, 4)])
def test_bad_spatial_size_raises(shape):
  model = unet.UNet(num_classes=K, ch=16, ch_mult=(1, 2, 4, 2))  # needs multiples of 8
  z = jax.ShapeDtypeStruct(shape, jnp.int32)
  with pytest.raises(ValueError, match="not divisible by 2"):
    jax.eval_shape(lambda zz: model.init(jax.random.PRNGKey(0), zz, jnp.ones((1,))), z)


def test_levels_sizes_and_configuration_errors():
  # Any size divisible by 2**(levels - 1) works, with the structure the configuration asks for.
  shapes = unet.param_shapes(_tiny(ch_mult=(1, 2, 2), attention=(2,), num_res_blocks=1), 12, 4)
  assert {k for k in shapes if k.endswith("_attn")} == {"down_2_attn", "mid_attn", "up_2_attn"}
  assert {k for k in shapes if "_res_" in k and k.startswith("up_")} == {"up_2_res_0", "up_1_res_0"}
  assert unet._attention_flags((True, False), 2) == (True, False)
  assert unet._attention_flags((0, 2), 3) == (True, False, True)
  assert unet._attention_flags((), 2) == (False, False)
  for bad in [(True,), (3,), (-1,), (True, 1)]:
    with pytest.raises(ValueError, match="attention"):
      unet._attention_flags(bad, 2)
  with pytest.raises(ValueError, match="groups"):
    unet.param_shapes(_tiny(groups=5), H, W)


def test_sinusoidal_embedding():
  emb = np.asarray(unet.sinusoidal_embedding(jnp.array([0.0, 1.0, 4000.0]), 8))
  assert emb.shape == (3, 8)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  # Lowest frequency 1: the first sine component of t = 1 is sin(1).
  np.testing.assert_allclose(emb[1, 0], np.sin(1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="even"):
    unet.sinusoidal_embedding(jnp.zeros((1,)), 7)


def test_mish_equals_its_definition_with_its_gradient_everywhere():
  """The one-exponential form equals x·tanh(softplus(x)) (float64 reference) across the whole range,
  gradients included, with nothing non-finite at the extremes; bfloat16 keeps its dtype."""
  x = np.concatenate([np.linspace(-120, 120, 40001), [-1e30, -88.8, 20.0, 88.8, 1e30]]).astype(np.float32)
  x64 = x.astype(np.float64)
  want = x64 * np.tanh(np.logaddexp(0.0, x64))
  sp = np.exp(-np.logaddexp(0.0, -x64))  # softplus' = sigmoid
  th = np.tanh(np.logaddexp(0.0, x64))
  want_grad = th + x64 * (1.0 - th ** 2) * sp
  got, grad = jax.jit(jax.vmap(jax.value_and_grad(unet.mish)))(x)
  got, grad = np.asarray(got, np.float64), np.asarray(grad, np.float64)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  half = unet.mish(jnp.asarray(x[::97], jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float64), want[::97], rtol=2e-2, atol=1e-2)
