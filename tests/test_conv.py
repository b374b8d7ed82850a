"""Tests of vqddm_jax/models/conv.py: im2col convs equal XLA's / flax's; same parameters; the rule."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.models import conv, unet, vqvae

# Compiling dominates; XLA's cheapest backend settings cut it and change no result checked here.
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})

# (input shape, constructor kwargs): the uses in unet.py / vqvae.py, plus odd sizes and batch 1.
CONV_CASES = [
    ((3, 5, 3, 8), dict(features=6, kernel_size=(3, 3))),                                  # SAME, odd map
    ((1, 4, 4, 16), dict(features=8, kernel_size=(3, 3), padding=((1, 1), (1, 1)))),       # unet Block
    ((3, 6, 5, 8), dict(features=8, kernel_size=(3, 3), strides=(2, 2), padding="VALID")),  # after (0,1) pad
    ((3, 5, 3, 8), dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))),
    ((3, 2, 2, 64), dict(features=32, kernel_size=(3, 3), padding=((1, 1), (1, 1)))),      # many channels
    ((1, 1, 1, 8), dict(features=5, kernel_size=(3, 3))),                                  # only one live tap
    ((3, 5, 3, 8), dict(features=7, kernel_size=(1, 1), use_bias=False)),                  # attention qkv
]
TRANSPOSE_CASES = [
    ((1, 3, 2, 16), dict(features=6, kernel_size=(4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))),  # unet
    ((3, 3, 2, 8), dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="SAME")),
    ((3, 3, 2, 8), dict(features=4, kernel_size=(3, 2), strides=(3, 2), padding="VALID")),
]


def _values_and_grads(module: nn.Module, params, x, probe):
  """(y, d<y, probe>/dparams, d<y, probe>/dx) of module.apply."""
  def f(p, xx):
    y = module.apply({"params": p}, xx)
    return jnp.sum(y * probe), y
  (_, y), (gp, gx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return y, gp, gx


def _random_inputs(module: nn.Module, shape, rng: np.random.Generator):
  """Host-side random (x, params, output cotangent) for module on f32[shape] inputs.

  Drawn with NumPy, not jax.random: jitted random draws and initialisers cost ~0.3 s of compile each. The
  bias is random too (flax initialises it to zero), so that it and its gradient are checked.
  """
  x = rng.standard_normal(shape, np.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
  fan_in = math.prod(shapes["kernel"].shape[:-1])
  params = {k: rng.standard_normal(v.shape, np.float32) / (math.sqrt(fan_in) if k == "kernel" else 1)
            for k, v in shapes.items()}
  probe = rng.standard_normal(jax.eval_shape(module.apply, {"params": params}, x).shape, np.float32)
  return x, params, probe


@pytest.fixture(scope="module")
def compared():
  """(flax's, ours) values and gradients of every case, from one compiled program (one compile, not 24)."""
  rng = np.random.default_rng(0)
  cases = [(nn.Conv(**kw), conv.Conv(**kw, impl="im2col"), shape) for shape, kw in CONV_CASES]
  cases += [(nn.ConvTranspose(**kw), conv.ConvTranspose(**kw, impl="im2col"), shape)
            for shape, kw in TRANSPOSE_CASES]
  inputs = [_random_inputs(ref, shape, rng) for ref, _, shape in cases]

  def run(inputs):
    return [(_values_and_grads(ref, p, x, probe), _values_and_grads(mod, p, x, probe))
            for (ref, mod, _), (x, p, probe) in zip(cases, inputs)]
  return jax.device_get(_jit(run)(inputs))


def _assert_close(want, got):
  """want, got: (y, param grads, x grad). Float32 rounding of sums over k*k*C products (values, input
  gradients) or over the output positions (kernel gradients): 1e-5 scaled by sqrt of the longest sum."""
  y, kernel, x = want[0].shape, want[1]["kernel"].shape, want[2].shape
  longest = max(math.prod(kernel[:-1]), math.prod(kernel[:-2]) * kernel[-1], math.prod(y[:-1]),
                math.prod(x[:-1]))
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
  for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert w.shape == g.shape and w.dtype == g.dtype
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * math.sqrt(longest))


@pytest.mark.parametrize("i", range(len(CONV_CASES)))
def test_im2col_conv_equals_flax_values_and_grads(compared, i):
  _assert_close(*compared[i])


@pytest.mark.parametrize("i", range(len(TRANSPOSE_CASES)))
def test_im2col_conv_transpose_equals_flax_values_and_grads(compared, i):
  _assert_close(*compared[len(CONV_CASES) + i])


@pytest.mark.parametrize("ref_cls,cls,shape,kw", [
    (nn.Conv, conv.Conv, *CONV_CASES[1]), (nn.Conv, conv.Conv, *CONV_CASES[3]),
    (nn.Conv, conv.Conv, *CONV_CASES[6]), (nn.ConvTranspose, conv.ConvTranspose, *TRANSPOSE_CASES[0])])
def test_xla_path_is_flax_bit_for_bit(ref_cls, cls, shape, kw):
  x, params, _ = _random_inputs(ref_cls(**kw), shape, np.random.default_rng(2))
  want, got = _jit(lambda p, xx: (ref_cls(**kw).apply({"params": p}, xx),
                                  cls(**kw, impl="xla").apply({"params": p}, xx)))(params, x)
  np.testing.assert_array_equal(got, want)


class _Pair(nn.Module):
  """A conv and a transposed conv under fixed names, built from the given classes."""
  conv_cls: type
  convt_cls: type

  @nn.compact
  def __call__(self, x):
    x = self.conv_cls(16, (3, 3), padding=((1, 1), (1, 1)), name="block_conv")(x)
    x = self.conv_cls(8, (1, 1))(x)  # unnamed: flax names it after the class, "Conv_0"
    return self.convt_cls(4, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), name="upsample")(x)


def test_same_params_as_flax_for_the_same_key():
  x = jnp.zeros((2, 2, 2, 8))
  want, got = _jit(lambda key: (_Pair(nn.Conv, nn.ConvTranspose).init(key, x),
                                _Pair(conv.Conv, conv.ConvTranspose).init(key, x)))(jax.random.PRNGKey(3))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for w, g in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    assert w.shape == g.shape and w.dtype == g.dtype
    np.testing.assert_array_equal(g, w)
  assert got["params"]["block_conv"]["kernel"].shape == (3, 3, 8, 16)
  assert got["params"]["Conv_0"]["kernel"].shape == (1, 1, 16, 8)
  assert got["params"]["upsample"]["bias"].shape == (4,)


def test_models_keep_their_parameter_trees_with_these_convs(monkeypatch):
  """The integration (unet.py / vqvae.py using conv.Conv / conv.ConvTranspose) changes no parameter."""
  tiny_unet = unet.UNet(num_classes=11, ch=16, ch_mult=(1, 2), num_res_blocks=1, groups=8)
  tiny_vqvae = vqvae.VQVAE(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=4,
                           embed_dim=4, codebook_size=8, out_channels=1, groups=4)
  z, t = jax.ShapeDtypeStruct((2, 4, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)

  def shapes():
    """(parameter shapes, jaxpr text) of both models' init, from one trace each."""
    key = jax.random.PRNGKey(0)
    unet_jaxpr, unet_shapes = jax.make_jaxpr(tiny_unet.init, return_shape=True)(key, z, t)
    vqvae_jaxpr, vqvae_shapes = jax.make_jaxpr(tiny_vqvae.init, return_shape=True)(key, x)
    return (unet_shapes, vqvae_shapes), str(unet_jaxpr) + str(vqvae_jaxpr)

  want, jaxprs = shapes()
  assert "conv_general_dilated" in jaxprs
  # unet.nn / vqvae.nn are flax.linen itself: the patch (undone after the test) reaches both models.
  monkeypatch.setattr(unet.nn, "Conv", conv.Conv)
  monkeypatch.setattr(unet.nn, "ConvTranspose", conv.ConvTranspose)
  monkeypatch.setenv(conv.IMPL_ENV, "im2col")
  got, jaxprs = shapes()
  assert "conv_general_dilated" not in jaxprs  # the patch took effect
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(got)] == [
      (a.shape, a.dtype) for a in jax.tree_util.tree_leaves(want)]


def test_bfloat16_runs_in_bf16_with_f32_accumulation_and_keeps_the_dtype():
  mods = [(conv.Conv, dict(features=16, kernel_size=(3, 3), padding=((1, 1), (1, 1)))),
          (conv.ConvTranspose, dict(features=8, kernel_size=(4, 4), strides=(2, 2),
                                    padding=((2, 2), (2, 2))))]
  rng = np.random.default_rng(1)
  inputs = [_random_inputs(cls(**kw), (2, 2, 2, 32), rng)[:2] for cls, kw in mods]

  def run(inputs):
    return [(cls(**kw, impl="xla").apply({"params": p}, x),
             cls(**kw, impl="im2col", dtype=jnp.bfloat16).apply({"params": p}, x))
            for (cls, kw), (x, p) in zip(mods, inputs)]

  for want, got in _jit(run)(inputs):
    assert got.dtype == jnp.bfloat16
    # bf16 operands (8-bit mantissa) and a f32 sum: within a few bf16 roundings of the output's scale.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02 * float(np.abs(want).max()))
  hlo = jax.jit(lambda xx, k: conv.im2col_conv(xx, k, (1, 1), [(1, 1), (1, 1)])).lower(
      jnp.zeros((2, 2, 2, 32), jnp.bfloat16), jnp.zeros((3, 3, 32, 8), jnp.bfloat16)).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  # The matmul itself: bf16 operands, float32 result (then cast back to bf16).
  assert len(dots) == 1 and "(tensor<8x288xbf16>, tensor<288x8xbf16>) -> tensor<8x8xf32>" in dots[0], dots


def test_auto_rule_and_the_switch(monkeypatch):
  assert conv.use_im2col((2, 2), 1024, 1024, (3, 3), backend="cpu")
  assert not conv.use_im2col((16, 16), 128, 128, (3, 3), backend="cpu")
  assert not conv.use_im2col((4, 4), 128, 128, (3, 3), backend="cpu")
  assert conv.use_im2col((4, 4), 128, 128, (3, 3), (2, 2), backend="cpu")  # XLA's strided kernel grad
  assert conv.use_im2col((16, 16), 128, 128, (1, 1), backend="cpu")  # XLA's 1x1 gradient
  assert conv.use_im2col((16, 16), 128, 128, (4, 4), (2, 2), transpose=True, backend="cpu")
  assert not conv.use_im2col((2, 2), 1024, 1024, (3, 3), backend="gpu")

  def lowered(impl, shape):
    m = conv.Conv(shape[-1], (3, 3), impl=impl)
    x = jnp.zeros(shape)
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    return jax.jit(m.apply).lower(params, x).as_text()

  assert jax.default_backend() == "cpu"
  assert "convolution" in lowered("auto", (1, 16, 16, 128))
  assert "convolution" not in lowered("auto", (1, 2, 2, 1024))
  assert "convolution" not in lowered("im2col", (1, 16, 16, 128))
  monkeypatch.setenv(conv.IMPL_ENV, "im2col")
  assert "convolution" not in lowered(None, (1, 16, 16, 128))
  monkeypatch.setenv(conv.IMPL_ENV, "xla")
  assert "convolution" in lowered(None, (1, 2, 2, 1024))
  monkeypatch.setenv(conv.IMPL_ENV, "fast")
  with pytest.raises(ValueError, match="impl"):
    lowered(None, (1, 2, 2, 8))
