"""Stage-1 quantiser: nearest code, straight-through gradient, loss values, usage and perplexity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.models import quantizer


def test_nearest_code_equals_brute_force():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4, 16)).astype(np.float32)
  codebook = rng.normal(size=(37, 16)).astype(np.float32)
  brute = np.argmin(((h[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  got = np.asarray(quantizer.nearest_code(jnp.asarray(h), jnp.asarray(codebook)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, brute)


def test_squared_distances_match_definition():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(7, 8)).astype(np.float32)
  codebook = rng.normal(size=(5, 8)).astype(np.float32)
  want = ((h[:, None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_allclose(quantizer.squared_distances(h, codebook), want, rtol=1e-5, atol=1e-5)


def test_loss_terms_on_hand_made_case():
  codebook = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  h = jnp.array([[[0.1, 0.2], [0.9, 0.6]]])  # [1, 2, d]: nearest codes 0 and 1
  q = quantizer.quantize(h, codebook)
  np.testing.assert_array_equal(q.indices, [[0, 1]])
  # Squared differences: (0.01 + 0.04) and (0.01 + 0.16), mean over 4 entries.
  want = (0.01 + 0.04 + 0.01 + 0.16) / 4
  np.testing.assert_allclose(q.codebook_loss, want, rtol=1e-6)
  np.testing.assert_allclose(q.commitment_loss, want, rtol=1e-6)
  np.testing.assert_allclose(q.z_q, [[[0.0, 0.0], [1.0, 1.0]]], atol=1e-7)


def test_straight_through_gradient_reaches_features_and_codebook_term_reaches_codebook():
  codebook = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  h = jnp.array([[0.1, 0.2], [0.9, 0.6]])
  # Gradient of a decoder-side function of z_q flows to h as if quantisation were the identity.
  g_h = jax.grad(lambda x: jnp.sum(quantizer.quantize(x, codebook).z_q * jnp.array([2.0, 3.0])))(h)
  np.testing.assert_allclose(g_h, [[2.0, 3.0], [2.0, 3.0]])
  # The codebook term moves only the codebook, the commitment term only the features.
  g_cb = jax.grad(lambda c: quantizer.quantize(h, c).codebook_loss)(codebook)
  assert np.all(np.asarray(g_cb) != 0)
  g_cb_commit = jax.grad(lambda c: quantizer.quantize(h, c).commitment_loss)(codebook)
  np.testing.assert_array_equal(g_cb_commit, 0.0)


def test_usage_and_perplexity():
  idx = jnp.array([[0, 0, 1, 1], [2, 2, 3, 3]])
  hist = quantizer.code_histogram(idx, 8)
  np.testing.assert_array_equal(hist, [2, 2, 2, 2, 0, 0, 0, 0])
  assert float(quantizer.usage_fraction(hist)) == pytest.approx(0.5)
  assert float(quantizer.usage_fraction(hist, min_count=3)) == 0.0
  assert float(quantizer.perplexity(hist)) == pytest.approx(4.0, rel=1e-5)
  masked = quantizer.code_histogram(idx, 8, mask=jnp.array([True, False]))
  np.testing.assert_array_equal(masked, [2, 2, 0, 0, 0, 0, 0, 0])
  assert float(quantizer.perplexity(jnp.array([5.0, 0.0]))) == pytest.approx(1.0)


def test_taming_legacy_puts_beta_on_the_codebook_term():
  """taming's legacy quantiser: β·||sg[h] − z||² + ||h − sg[z]||²; ours the reverse. The gradients show it: the
  codebook's is β times ours, the features' 1/β times."""
  h = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  codebook = jax.random.normal(jax.random.key(1), (5, 4))

  def grads(convention):
    f = lambda hh, cb: quantizer.vq_objective(quantizer.quantize(hh, cb), 0.25, convention)  # noqa: E731
    return jax.grad(f, argnums=(0, 1))(h, codebook)

  (gh_ours, gc_ours), (gh_legacy, gc_legacy) = grads("ours"), grads("taming_legacy")
  np.testing.assert_allclose(gc_legacy, 0.25 * gc_ours, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gh_legacy, gh_ours / 0.25, rtol=1e-5, atol=1e-7)
