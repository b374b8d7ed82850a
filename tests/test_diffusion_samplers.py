"""Samplers: step sequences, exact-posterior sampling of a two-map data set, chunking, inpainting."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax import diffusion

K, T, SHAPE = 8, 40, (8, 4, 4)


@pytest.fixture(scope="module")
def two_maps():
  rng = np.random.default_rng(0)
  maps = rng.integers(0, K, (2,) + SHAPE[1:])
  maps[1] = (maps[0] + rng.integers(1, K, SHAPE[1:])) % K   # the maps differ at every position
  return jnp.asarray(maps, jnp.int32)


def exact_logits_fn(maps, sched):
  """x̂_0 logits under which N[θ_{s←t}(z_t, x̂_0)] is the data set's exact per-position reverse marginal.

  With p(m | z_t) the posterior over the maps m, the per-position reverse marginal is
  Σ_c p(z_0 = c | z_t) q(z_s | z_t, c), which equals N[θ_{s←t}(z_t, v)] for
  v_c ∝ p(z_0 = c | z_t) / q(z_t | c).
  """
  def fn(z_t, t):
    t = t[:, None, None]
    log_resample = sched.log_1m_alpha_bar[t] - np.log(K)
    hit = z_t[..., None] == jnp.arange(K)
    log_q = jnp.where(hit, jnp.logaddexp(sched.log_alpha_bar[t], log_resample)[..., None],
                      log_resample[..., None])                     # log q(z_t | z_0 = c): [B, h, w, K]
    one_hot_maps = diffusion.log_one_hot(maps, K)                    # [M, h, w, K]
    log_lik = jnp.sum(jnp.take_along_axis(log_q[:, None], maps[None, ..., None], axis=-1)[..., 0],
                      axis=(-2, -1))                                 # [B, M]
    log_post = jax.nn.log_softmax(log_lik, axis=-1)
    log_marginal = jax.nn.logsumexp(log_post[:, :, None, None, None] + one_hot_maps[None], axis=1)
    return log_marginal - log_q
  return fn


def test_sampling_timesteps():
  np.testing.assert_array_equal(diffusion.sampling_timesteps(10, 4), [10, 8, 5, 3, 0])
  np.testing.assert_array_equal(diffusion.sampling_timesteps(5), [5, 4, 3, 2, 1, 0])
  for big_t, s in ((4000, 50), (4000, 3999), (7, 6), (1000, 1)):
    ts = diffusion.sampling_timesteps(big_t, s)
    assert ts.dtype == np.int32 and ts.size == s + 1 and ts[0] == big_t and ts[-1] == 0
    assert np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError):
    diffusion.sampling_timesteps(10, 11)


@pytest.mark.parametrize("kind", ("cosine", "cosine_sqrt"))
def test_exact_posterior_sampler_returns_a_data_map(two_maps, kind):
  sched = diffusion.make_schedule(T, kind, num_classes=K)
  logits_fn = exact_logits_fn(two_maps, sched)

  @jax.jit
  def run(key):
    return (diffusion.sample(key, logits_fn, sched, SHAPE),
            diffusion.sample(jax.random.fold_in(key, 1), logits_fn, sched, SHAPE, num_sampling_steps=8))

  for samples in run(jax.random.PRNGKey(0)):
    samples = np.asarray(samples)
    is_a = np.all(samples == np.asarray(two_maps[0]), axis=(1, 2))
    is_b = np.all(samples == np.asarray(two_maps[1]), axis=(1, 2))
    assert np.all(is_a | is_b), samples
    assert is_a.any() and is_b.any()


def test_chunked_sampling_equals_one_call(two_maps):
  sched = diffusion.make_schedule(T, "cosine", num_classes=K)
  logits_fn = exact_logits_fn(two_maps, sched)
  ts = diffusion.sampling_timesteps(T, 10)
  key = jax.random.PRNGKey(3)
  chunk = jax.jit(lambda z, ts_chunk: diffusion.reverse_chunk(key, z, ts_chunk, logits_fn, sched))

  @jax.jit
  def one_call_and_init():
    return (diffusion.sample(key, logits_fn, sched, SHAPE, num_sampling_steps=10),
            diffusion.uniform_codes(jax.random.fold_in(key, 0), SHAPE, K))

  one_call, z = one_call_and_init()
  for i in range(0, ts.size - 1, 5):   # two chunks of 5 transitions (one compile), ts[0:6] and ts[5:11]
    z = chunk(z, ts[i:i + 6])
  np.testing.assert_array_equal(np.asarray(z), np.asarray(one_call))


def test_inpainting_keeps_known_positions_and_completes_in_context(two_maps):
  sched = diffusion.make_schedule(T, "cosine_sqrt", num_classes=K)
  logits_fn = exact_logits_fn(two_maps, sched)
  rows = 64  # completion is random: enough rows that the rate below is far from both bounds
  rng = np.random.default_rng(1)
  mask = jnp.asarray(rng.random((rows,) + SHAPE[1:]) < 0.4)
  target = jnp.asarray(np.where(np.arange(rows)[:, None, None] % 2, two_maps[1], two_maps[0]))
  z0_known = jnp.where(mask, target, 0)
  key = jax.random.PRNGKey(5)

  @jax.jit
  def run():
    full = diffusion.inpaint(key, logits_fn, sched, mask, z0_known)
    ts = diffusion.sampling_timesteps(T, 12)
    z = diffusion.inpaint_init(key, mask, z0_known, sched)
    z = diffusion.inpaint_chunk(key, z, ts[:7], logits_fn, sched, mask, z0_known)
    z = diffusion.inpaint_chunk(key, z, ts[6:], logits_fn, sched, mask, z0_known)
    return full, z, diffusion.inpaint(key, logits_fn, sched, mask, z0_known, num_sampling_steps=12)

  full, chunked, strided = (np.asarray(x) for x in run())
  for out in (full, strided):
    np.testing.assert_array_equal(out[np.asarray(mask)], np.asarray(z0_known)[np.asarray(mask)])
    # The unknown positions are filled in context: rows complete to the map their known codes came from.
    # With ~6 of 16 codes known, 88 % of rows do on average (200 keys; min 50 % of 8 rows), against ~50 %
    # for a map drawn without the context.
    assert np.mean(np.all(out == np.asarray(target), axis=(1, 2))) >= 0.7
  np.testing.assert_array_equal(chunked, strided)


def test_temperature_scales_the_logits_of_x0_in_every_reverse_step():
  """τ divides x̂_0's logits before the posterior; τ = 1 is the model itself; τ < 1 lowers the entropy."""
  sched = diffusion.make_schedule(T, "cosine", num_classes=K)
  logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), SHAPE + (K,))
  fn = lambda z_t, t: logits  # noqa: E731
  assert diffusion.tempered(fn, 1.0) is fn
  with pytest.raises(ValueError, match="temperature"):
    diffusion.tempered(fn, 0.0)
  z_t = diffusion.uniform_codes(jax.random.PRNGKey(1), SHAPE, K)
  entropies = {}
  for tau in (0.5, 1.0, 2.0):
    for t, s in ((1, 0), (T // 2, T // 4)):
      log_p = diffusion.model_log_posterior(z_t, t, s, diffusion.tempered(fn, tau), sched)
      expected = diffusion.log_posterior(jax.nn.log_softmax(logits / tau, axis=-1), z_t,
                                         jnp.full((SHAPE[0],), t), sched, jnp.full((SHAPE[0],), s))
      np.testing.assert_allclose(np.asarray(log_p), np.asarray(expected), atol=1e-5)
    entropies[tau] = float(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1).mean())
  assert entropies[0.5] < entropies[1.0] < entropies[2.0]
