"""Schedules, q(z_t | z_0), q_sample, the posterior and the KL against a float64 brute-force oracle."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from test_diffusion_oracle import alphas_f64, bayes_posterior, transition
from vqddm_jax import diffusion
from vqddm_jax.diffusion import posterior

KINDS = ("cosine", "cosine_sqrt")
TOL = 1e-5
MAX_ERR = {}   # largest |error| seen per check, printed at the end (pytest -s)


def _record(name, err):
  MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), float(err))
  assert err <= TOL, (name, err)


@pytest.fixture(scope="module", autouse=True)
def _report():
  yield
  for name, err in sorted(MAX_ERR.items()):
    print(f"\nmax |posterior − brute force| {name}: {err:.3g}")


@jax.jit
def _posterior_probs(log_v, z_t, t, s, sched):
  return jnp.exp(diffusion.log_posterior(log_v, z_t, t, sched, s))


def _random_model_probs(rng, n, k):
  v = rng.dirichlet(np.full(k, 0.3), size=n).astype(np.float32)
  return np.maximum(v, 1e-30) / np.maximum(v, 1e-30).sum(-1, keepdims=True)


def test_schedule_tables_and_errors():
  for kind in KINDS:
    sched = diffusion.make_schedule(4000, kind)
    alpha, alpha_bar = alphas_f64(4000, kind)
    assert sched.num_steps == 4000 and sched.log_alpha.dtype == jnp.float32
    assert float(sched.log_alpha[0]) == 0.0 and float(sched.log_alpha_bar[0]) == 0.0
    for table in (sched.log_1m_alpha, sched.log_1m_alpha_bar):
      assert float(table[0]) == diffusion.LOG_ZERO
      assert np.all(np.isfinite(np.asarray(table)))
    ok = alpha_bar > 1e-30
    np.testing.assert_allclose(np.exp(np.asarray(sched.log_alpha_bar, np.float64))[ok], alpha_bar[ok],
                               rtol=1e-6)
    # 1 − α_1 ≈ 1e-5: float64-built logs keep its digits.
    np.testing.assert_allclose(np.exp(float(sched.log_1m_alpha[1])), 1.0 - alpha[1], rtol=1e-6)
  assert np.isclose(np.exp(float(diffusion.make_schedule(4000, "cosine_sqrt").log_alpha[-1])),
                    np.sqrt(0.001), rtol=1e-6)
  with pytest.raises(ValueError, match="kind"):
    diffusion.make_schedule(10, "linear")
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.make_schedule(0)


@pytest.mark.parametrize("kind", KINDS)
def test_q_zt_given_z0_is_product_of_one_step_transitions(kind):
  k, big_t = 6, 4000
  sched = diffusion.make_schedule(big_t, kind)
  alpha, _ = alphas_f64(big_t, kind)
  ts = np.arange(1, big_t + 1)
  log_z0 = jnp.broadcast_to(diffusion.log_one_hot(jnp.arange(k), k), (big_t, k, k))
  got = np.exp(np.asarray(jax.jit(diffusion.log_q_zt_given_z0)(
      log_z0, jnp.asarray(ts), sched), np.float64))
  product = np.eye(k)
  worst = 0.0
  for t in ts:
    product = product @ transition(alpha[t], k)   # Q̄_t = Q_1 Q_2 ... Q_t
    worst = max(worst, np.abs(got[t - 1] - product).max())
  _record(f"q(z_t|z_0) vs Π Q_i, K={k}, T={big_t}, {kind}", worst)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_posterior_every_t_small_k_matrix_oracle(kind):
  """Every t = 1..T, every (z_0, z_t) pair and model vectors, against Bayes with products of Q_i."""
  k, big_t = 5, 4000
  rng = np.random.default_rng(0)
  sched = diffusion.make_schedule(big_t, kind)
  alpha, _ = alphas_f64(big_t, kind)
  z0, z_t = (x.ravel() for x in np.meshgrid(np.arange(k), np.arange(k), indexing="ij"))
  v_model = _random_model_probs(rng, z0.size, k)
  inputs = {"one-hot": (np.asarray(diffusion.log_one_hot(jnp.asarray(z0), k)), np.eye(k)[z0]),
            "model": (np.log(v_model), v_model.astype(np.float64))}
  ts = np.arange(1, big_t + 1)
  got = {}
  for name, (log_v, _) in inputs.items():
    n = z0.size
    got[name] = np.asarray(_posterior_probs(
        jnp.broadcast_to(log_v, (big_t, n, k)), jnp.broadcast_to(z_t, (big_t, n)), jnp.asarray(ts),
        jnp.asarray(ts - 1), sched), np.float64)
  q_bar_prev = np.eye(k)   # Q̄_{t−1}
  worst = {name: 0.0 for name in inputs}
  for t in ts:
    q_t = transition(alpha[t], k)
    for name, (_, v) in inputs.items():
      want = bayes_posterior(v, z_t, q_t, q_bar_prev)
      worst[name] = max(worst[name], np.abs(got[name][t - 1] - want).max())
    q_bar_prev = q_bar_prev @ q_t
  for name, err in worst.items():
    _record(f"one-step, every t, K={k}, T={big_t}, {kind}, {name}", err)
  # t = 1: the true posterior is e_{z_0}.
  np.testing.assert_allclose(got["one-hot"][0], np.eye(k)[z0], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_strided_posterior_random_s_lt_t(kind):
  """Random 0 <= s < t: Bayes with Q_{s→t} = Q_{s+1}···Q_t and Q̄_s = Q_1···Q_s as explicit products."""
  k, big_t, pairs = 7, 4000, 40
  rng = np.random.default_rng(1)
  sched = diffusion.make_schedule(big_t, kind)
  alpha, _ = alphas_f64(big_t, kind)
  t = rng.integers(1, big_t + 1, pairs)
  t[:4] = [1, 2, big_t, big_t]
  s = np.array([rng.integers(max(0, tt - 3), tt) if i % 2 else rng.integers(0, tt)
                for i, tt in enumerate(t)])
  s[:4] = [0, 0, big_t - 1, 0]
  z0 = rng.integers(0, k, pairs)
  z_t = np.where(rng.random(pairs) < 0.5, z0, rng.integers(0, k, pairs))
  v_model = _random_model_probs(rng, pairs, k)
  prefix = [np.eye(k)]
  for i in range(1, big_t + 1):
    prefix.append(prefix[-1] @ transition(alpha[i], k))
  for name, log_v, v in (("one-hot", diffusion.log_one_hot(jnp.asarray(z0), k), np.eye(k)[z0]),
                         ("model", np.log(v_model), v_model.astype(np.float64))):
    got = np.asarray(_posterior_probs(jnp.asarray(log_v)[:, None], jnp.asarray(z_t)[:, None],
                                      jnp.asarray(t), jnp.asarray(s), sched), np.float64)[:, 0]
    worst = 0.0
    for i in range(pairs):
      q_st = np.eye(k)
      for j in range(s[i] + 1, t[i] + 1):
        q_st = q_st @ transition(alpha[j], k)
      want = bayes_posterior(v[i:i + 1], z_t[i:i + 1], q_st, prefix[s[i]])[0]
      worst = max(worst, np.abs(got[i] - want).max())
    _record(f"strided, K={k}, T={big_t}, {kind}, {name}", worst)


@pytest.mark.parametrize("kind", KINDS)
def test_large_k_posterior_matrix_oracle(kind):
  """K = 1024, T = 4000 at t in {1, 2, 3, T/2, T−1, T} (one-step) and random strided s, K×K oracle."""
  k, big_t = 1024, 4000
  rng = np.random.default_rng(2)
  sched = diffusion.make_schedule(big_t, kind)
  _, alpha_bar = alphas_f64(big_t, kind)
  t = np.array([1, 2, 3, big_t // 2, big_t - 1, big_t, 2, 17, 900, 3001, big_t, big_t])
  s = np.concatenate([t[:6] - 1, [0, 15, 450, 2999, 0, big_t - 7]])
  n = 3   # positions per (t, s): z_t = z_0, z_t != z_0, and a second random z_t
  z0 = rng.integers(0, k, (t.size, n))
  z_t = np.stack([z0[:, 0], (z0[:, 1] + 1) % k, rng.integers(0, k, t.size)], axis=1)
  v_model = _random_model_probs(rng, t.size * n, k).reshape(t.size, n, k)
  cases = {"one-hot": (diffusion.log_one_hot(jnp.asarray(z0), k), np.eye(k)[z0]),
           "model": (np.log(v_model), v_model.astype(np.float64))}
  got = {name: np.asarray(_posterior_probs(jnp.asarray(log_v), jnp.asarray(z_t), jnp.asarray(t),
                                           jnp.asarray(s), sched), np.float64)
         for name, (log_v, _) in cases.items()}
  worst = {name: 0.0 for name in cases}
  for i in range(t.size):
    q_st = transition(alpha_bar[t[i]] / alpha_bar[s[i]], k)
    q_s = transition(alpha_bar[s[i]], k)
    for name, (_, v) in cases.items():
      worst[name] = max(worst[name], np.abs(got[name][i] - bayes_posterior(v[i], z_t[i], q_st, q_s)).max())
  for name, err in worst.items():
    _record(f"K={k}, T={big_t}, selected t and s, {kind}, {name}", err)


@pytest.mark.parametrize("kind", KINDS)
def test_large_k_posterior_every_t_closed_form_f64(kind):
  """K = 1024, T = 4000, every t: float32 result vs the same product formula in float64 probabilities."""
  k, big_t, chunk = 1024, 4000, 1000
  rng = np.random.default_rng(3)
  sched = diffusion.make_schedule(big_t, kind)
  alpha, alpha_bar = alphas_f64(big_t, kind)
  z0 = np.array([5, 5, 9])
  z_t = np.array([5, 700, 700])
  v = np.concatenate([np.eye(k)[z0[:2]], _random_model_probs(rng, 1, k).astype(np.float64)])
  log_v = np.concatenate([np.asarray(diffusion.log_one_hot(jnp.asarray(z0[:2]), k)),
                          np.log(v[2:].astype(np.float32))])
  worst = 0.0
  for start in range(1, big_t + 1, chunk):
    ts = np.arange(start, start + chunk)
    got = np.asarray(_posterior_probs(jnp.broadcast_to(log_v, (chunk, 3, k)),
                                      jnp.broadcast_to(z_t, (chunk, 3)), jnp.asarray(ts),
                                      jnp.asarray(ts - 1), sched), np.float64)
    a, ab = alpha[ts][:, None, None], alpha_bar[ts - 1][:, None, None]
    lik = a * np.eye(k)[z_t][None] + (1 - a) / k
    post = lik * (ab * v[None] + (1 - ab) / k)
    worst = max(worst, np.abs(got - post / post.sum(-1, keepdims=True)).max())
  _record(f"K={k}, T={big_t}, every t (closed form), {kind}", worst)


def test_q_sample_histogram_matches_q():
  k, n = 5, 20000
  sched = diffusion.make_schedule(100, "cosine", num_classes=k)
  ts = jnp.array([1, 30, 70, 100])

  @jax.jit
  def run(key):
    # Per-example keys under vmap, as the trainer calls it; one row of draws per t.
    keys = jax.random.split(key, n)
    draw = jax.vmap(lambda kk, t: diffusion.q_sample(kk, jnp.int32(2), t, sched), in_axes=(0, None))
    samples = jax.vmap(lambda t: draw(keys, t))(ts)
    probs = jnp.exp(diffusion.log_q_zt_given_z0(diffusion.log_one_hot(jnp.full((4,), 2), k), ts, sched))
    batched = diffusion.q_sample(key, jnp.zeros((3, 4, 4), jnp.int32), jnp.array([1, 50, 100]), sched)
    return samples, probs, batched

  samples, probs, batched = jax.device_get(run(jax.random.PRNGKey(0)))
  for i, t in enumerate(np.asarray(ts)):
    counts = np.bincount(samples[i], minlength=k)
    expected = probs[i].astype(np.float64) * n
    if expected.min() >= 5:
      p_value = stats.chisquare(counts, expected * n / expected.sum()).pvalue
    else:   # t = 1: changed codes are too rare for chi-square; test their total instead
      p_value = stats.binomtest(int(n - counts[2]), n, 1.0 - float(probs[i][2])).pvalue
    assert p_value > 1e-3, (t, counts, expected)
  # Batched form: t: i32[B] against z0: i32[B, h, w].
  assert batched.shape == (3, 4, 4) and batched.dtype == np.int32


@pytest.mark.parametrize("k", [12, 7, 512, 4001])
def test_categorical_draws_follow_softmax_exactly(k):
  """The two-level Gumbel-max (G groups of S; the primes 7 and 4001 padded with −inf to 3 x 3 and 64 x 63)
  against Cat(softmax(log_p)): chi-square over 40,000 draws, with codes of very different mass, a whole
  group of −inf and near-LOG_ZERO entries."""
  (g, size), n = posterior.grouping(k), 40_000
  assert (g, size) == {12: (3, 4), 7: (3, 3), 512: (16, 32), 4001: (64, 63)}[k]
  assert (posterior.grouping(128), posterior.grouping(1000), posterior.grouping(2)) == ((8, 16), (25, 40), (1, 2))
  log_p = np.log(np.random.default_rng(k).dirichlet(np.ones(k) * 0.7)).astype(np.float32)
  log_p[size:2 * size] = -np.inf  # a whole group that must never be drawn
  log_p[-1] = diffusion.LOG_ZERO
  draws = np.asarray(jax.jit(lambda key: diffusion.categorical(key, jnp.broadcast_to(log_p, (n, k))))(
      jax.random.key(3)))
  assert draws.shape == (n,) and draws.dtype == np.int32
  p = np.exp(log_p.astype(np.float64) - np.logaddexp.reduce(log_p.astype(np.float64)))
  counts = np.bincount(draws, minlength=k)
  assert counts[p == 0].sum() == 0 and counts[-1] == 0
  big = p * n >= 5  # chi-square over the codes expected often enough, their rest pooled
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(p[big], p[~big].sum()) * n
  assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_categorical_kl_nonnegative_zero_and_finite():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 64, 50)) * 3, jnp.float32)

  @jax.jit
  def run(logits):
    log_p, log_q = jax.nn.log_softmax(logits, axis=-1)
    floored = diffusion.log_one_hot(jnp.arange(64) % 50, 50)
    with_inf = jnp.where(floored < -1.0, -jnp.inf, 0.0)
    kl = diffusion.categorical_kl
    return (kl(log_p, log_q), kl(log_p, log_p), kl(floored, log_q), kl(with_inf, log_q),
            -log_q[jnp.arange(64), jnp.arange(64) % 50])

  kl_pq, kl_pp, kl_floored, kl_inf, nll = jax.device_get(run(logits))
  assert np.all(kl_pq > 0.01)
  assert np.all(kl_pp == 0.0)
  assert np.all(np.isfinite(kl_floored)) and np.all(np.isfinite(kl_inf))
  np.testing.assert_allclose(kl_inf, nll, rtol=1e-6)
  np.testing.assert_allclose(kl_floored, nll, rtol=1e-5)


def test_x0_logits_parametrizations():
  net_out = jnp.zeros((1, 2, 2, 4))
  z_t = jnp.array([[[0, 1], [2, 3]]])
  np.testing.assert_array_equal(diffusion.x0_logits(net_out, z_t, "residual"), jax.nn.one_hot(z_t, 4))
  np.testing.assert_array_equal(diffusion.x0_logits(net_out, z_t, "x0"), net_out)
  with pytest.raises(ValueError, match="parametrization"):
    diffusion.x0_logits(net_out, z_t, "eps")
