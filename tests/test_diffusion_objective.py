"""Loss terms, −ELBO estimators and the importance sampler of t."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_diffusion_oracle import alphas_f64, bayes_posterior, transition
from vqddm_jax import diffusion
from vqddm_jax.diffusion import importance


def _oracle_loss_t(log_x0, z0, z_t, t, alpha, alpha_bar):
  """Float64 brute force L_t per image (KL for t >= 2, NLL for t = 1) with explicit K×K matrices."""
  k = log_x0.shape[-1]
  out = []
  for b in range(z0.shape[0]):
    x0 = np.exp(log_x0[b].reshape(-1, k).astype(np.float64))
    x0 /= x0.sum(-1, keepdims=True)
    zt, z = z_t[b].ravel(), z0[b].ravel()
    q_t, q_bar = transition(alpha[t[b]], k), transition(alpha_bar[t[b] - 1], k)
    p = bayes_posterior(x0, zt, q_t, q_bar)
    if t[b] == 1:
      out.append(-np.log(p[np.arange(z.size), z]).sum())
    else:
      q = bayes_posterior(np.eye(k)[z], zt, q_t, q_bar)
      out.append(np.sum(np.where(q > 0, q * (np.log(np.maximum(q, 1e-300)) - np.log(p)), 0.0)))
  return np.array(out)


@pytest.mark.parametrize("kind", ("cosine", "cosine_sqrt"))
def test_loss_t_matches_brute_force(kind):
  k, big_t = 6, 50
  rng = np.random.default_rng(0)
  sched = diffusion.make_schedule(big_t, kind, num_classes=k)
  alpha, alpha_bar = alphas_f64(big_t, kind)
  t = np.array([1, 2, 3, 25, big_t - 1, big_t])
  z0 = rng.integers(0, k, (t.size, 3, 3))
  net_out = rng.normal(size=z0.shape + (k,)).astype(np.float32) * 2

  @jax.jit
  def run(z0, t, net_out):
    z_t = diffusion.q_sample(jax.random.PRNGKey(0), z0, t, sched)
    log_x0 = jax.nn.log_softmax(diffusion.x0_logits(net_out, z_t), axis=-1)
    # A model that predicts z_0 exactly: zero KL at t >= 2 and ≈ zero NLL at t = 1.
    exact = diffusion.loss_t(diffusion.log_one_hot(z0, k), z0, z_t, t, sched)
    return z_t, log_x0, diffusion.loss_t(log_x0, z0, z_t, t, sched), exact

  z_t, log_x0, got, exact = jax.device_get(run(jnp.asarray(z0), jnp.asarray(t), jnp.asarray(net_out)))
  np.testing.assert_allclose(got, _oracle_loss_t(log_x0, z0, z_t, t, alpha, alpha_bar), rtol=1e-4, atol=1e-5)
  assert np.all(got >= 0)
  assert np.all(exact[1:] == 0.0) and exact[0] < 1e-6


def _generic_loss_t(log_x0, z0, z_t, t, sched):
  """loss_t composed from the public building blocks (two full posteriors, categorical_kl)."""
  log_p = diffusion.log_posterior(log_x0, z_t, t, sched)
  log_q = diffusion.log_posterior(diffusion.log_one_hot(z0, log_x0.shape[-1]), z_t, t, sched)
  kl = jnp.sum(diffusion.categorical_kl(log_q, log_p), axis=(1, 2))
  nll = -jnp.sum(jnp.take_along_axis(log_p, z0[..., None], axis=-1), axis=(1, 2, 3))
  return jnp.where(t == 1, nll, kl)


@pytest.mark.parametrize("kind", ("cosine", "cosine_sqrt"))
def test_loss_t_near_zero_kl_large_k_relative_accuracy(kind):
  """Nearly perfect models at K = 1024, T = 4000: loss_t keeps digits where the KL is tiny."""
  k, big_t = 1024, 4000
  rng = np.random.default_rng(5)
  sched = diffusion.make_schedule(big_t, kind, num_classes=k)
  alpha, alpha_bar = alphas_f64(big_t, kind)
  t = np.array([2, 3, 10, 500, 2000, 3999, big_t, 2, 10, 2000])
  z0 = rng.integers(0, k, (t.size, 1, 1))
  z_t = z0.copy()
  z_t[7:] = (z0[7:] + 1 + rng.integers(0, k - 1, (3, 1, 1))) % k      # the last three: z_t != z_0
  eps = np.array([1e-3, 1e-2, 1e-4, 1e-3, 1e-2, 1e-3, 1e-3, 1e-3, 1e-2, 1e-3])[:, None]
  noise = rng.dirichlet(np.ones(k), t.size)
  v = ((1 - eps) * np.eye(k)[z0[:, 0, 0]] + eps * noise).astype(np.float32)
  log_v = np.log(v / v.sum(-1, keepdims=True, dtype=np.float64)).astype(np.float32)[:, None, None]
  got = np.asarray(jax.jit(diffusion.loss_t)(jnp.asarray(log_v), jnp.asarray(z0), jnp.asarray(z_t),
                                             jnp.asarray(t), sched), np.float64)
  want = _oracle_loss_t(log_v, z0, z_t, t, alpha, alpha_bar)
  # KL from 0 (t = T; ±1e-16 in float64) and 3e-13 to 0.4 nats: relative digits where it matters, and 5e-8
  # absolute (1/20 of the ~1e-6 floor from subtracting two float32 log-normalisers, as a generic KL does).
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=5e-8)


def test_loss_t_gradient_matches_generic_autodiff():
  k, big_t = 16, 30
  rng = np.random.default_rng(6)
  sched = diffusion.make_schedule(big_t, "cosine_sqrt", num_classes=k)
  t = jnp.array([1, 2, 3, 15, big_t])
  z0 = jnp.asarray(rng.integers(0, k, (5, 3, 3)), jnp.int32)
  net_out = jnp.asarray(rng.normal(size=(5, 3, 3, k)) * 2, jnp.float32)

  @jax.jit
  def run(net_out):
    z_t = diffusion.q_sample(jax.random.PRNGKey(0), z0, t, sched)
    grads = []
    for fn in (diffusion.loss_t, _generic_loss_t):
      total = lambda out, fn=fn: jnp.sum(fn(jax.nn.log_softmax(out, axis=-1), z0, z_t, t, sched))
      grads.append(jax.value_and_grad(total)(net_out))
    return grads

  (v_fast, g_fast), (v_gen, g_gen) = run(net_out)
  np.testing.assert_allclose(float(v_fast), float(v_gen), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_fast), np.asarray(g_gen), rtol=1e-3, atol=1e-6)


def test_prior_kl_matches_brute_force():
  k = 16
  for kind in ("cosine", "cosine_sqrt"):
    for big_t in (10, 4000):
      sched = diffusion.make_schedule(big_t, kind)
      _, alpha_bar = alphas_f64(big_t, kind)
      q = transition(alpha_bar[-1], k)[0]
      want = np.sum(q * np.log(q * k)) * 12
      got = diffusion.prior_kl(jnp.zeros((2, 3, 4), jnp.int32), sched, k)
      np.testing.assert_allclose(np.asarray(got), [want, want], rtol=1e-4, atol=1e-9)
  with pytest.raises(ValueError, match="num_classes"):
    diffusion.prior_kl(jnp.zeros((1, 2, 2), jnp.int32), diffusion.make_schedule(10))


def test_gradients_finite_large_k_and_t():
  """d loss / d network output at t = 1, 2, T for K = 1024, T = 4000, both schedules and parametrisations."""
  k, big_t = 1024, 4000
  rng = np.random.default_rng(0)   # NumPy inputs: eager jax.random ops would each compile
  t = jnp.array([1, 2, big_t])
  z0 = jnp.asarray(rng.integers(0, k, (3, 4, 4)), jnp.int32)
  net_out = 3.0 * rng.normal(size=(3, 4, 4, k))
  # Confidently wrong at some positions: p(z_0) ~ e^-60 (and p(z_t) too, where z_t = z_0).
  np.put_along_axis(net_out[:, :2], np.asarray(z0)[:, :2, :, None], -60.0, axis=-1)
  net_out = jnp.asarray(net_out, jnp.float32)
  cases = [("cosine", "residual"), ("cosine_sqrt", "x0")]   # parametrisation only adds one_hot(z_t)

  @jax.jit
  def run(out):
    results = []
    for kind, param in cases:
      sched = diffusion.make_schedule(big_t, kind, num_classes=k)
      z_t = diffusion.q_sample(jax.random.PRNGKey(1), z0, t, sched)

      def loss(out, sched=sched, z_t=z_t, param=param):
        log_x0 = jax.nn.log_softmax(diffusion.x0_logits(out, z_t, param), axis=-1)
        per_image = diffusion.importance_weighted_nelbo(
            diffusion.loss_t(log_x0, z0, z_t, t, sched), jnp.full((3,), 1.0 / big_t),
            diffusion.prior_kl(z0, sched))
        return jnp.sum(per_image)

      results.append(jax.value_and_grad(loss)(out))
    return results

  for (kind, param), (value, grad) in zip(cases, run(net_out)):
    grad = np.asarray(grad)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), (kind, param)
    assert all(np.abs(grad[i]).max() > 0 for i in range(3)), (kind, param)


def _exact_nelbo_one_position(z0, logits_fn, sched, k):
  """−ELBO of a single code (h = w = 1) with E_{z_t} done by enumerating the K values of z_t at every t."""
  big_t = sched.num_steps
  ts = jnp.repeat(jnp.arange(1, big_t + 1), k)
  z_t = jnp.tile(jnp.arange(k), big_t).reshape(-1, 1, 1)
  z0s = jnp.full_like(z_t, z0)
  q = jnp.exp(diffusion.log_q_zt_given_z0(diffusion.log_one_hot(z0s, k), ts, sched))
  q_of_zt = jnp.take_along_axis(q, z_t[..., None], axis=-1).reshape(-1)
  log_x0 = jax.nn.log_softmax(logits_fn(z_t, ts), axis=-1)
  expected = jnp.sum(q_of_zt * diffusion.loss_t(log_x0, z0s, z_t, ts, sched))
  return expected + diffusion.prior_kl(z0s[:1], sched, k)[0]


def _toy_logits_fn(k):
  table = jnp.asarray(np.random.default_rng(7).normal(size=(k, 9, k)), jnp.float32)
  return lambda z_t, t: table[z_t, t.reshape((-1,) + (1,) * (z_t.ndim - 1))]


def test_nelbo_estimators_are_unbiased_and_chunk_invariant():
  k, big_t, n = 3, 4, 2000
  sched = diffusion.make_schedule(big_t, "cosine_sqrt", num_classes=k)
  logits_fn = _toy_logits_fn(k)
  z0 = jnp.ones((n, 1, 1), jnp.int32)

  @jax.jit   # one compile for all four computations
  def run(key, z0):
    keys = jax.random.split(key, n)
    return (_exact_nelbo_one_position(1, logits_fn, sched, k),
            diffusion.nelbo_all_t(keys, z0, logits_fn, sched),
            diffusion.nelbo_all_t(keys[:8], z0[:8], logits_fn, sched, t_chunk=3),
            diffusion.nelbo_monte_carlo(keys, z0, logits_fn, sched, num_samples=4))

  exact, all_t, chunked, (est, stderr) = run(jax.random.PRNGKey(0), z0)
  exact = float(exact)
  mean, se = float(jnp.mean(all_t)), float(jnp.std(all_t)) / np.sqrt(n)
  assert abs(mean - exact) < 4 * se, (mean, exact, se)
  np.testing.assert_allclose(chunked, all_t[:8], rtol=1e-5)
  mean, se = float(jnp.mean(est)), float(jnp.std(est)) / np.sqrt(n)
  assert abs(mean - exact) < 4 * se, (mean, exact, se)
  # The reported standard error matches the spread of the estimates (M = 4 draws: loose band).
  assert 0.6 < float(jnp.sqrt(jnp.mean(stderr**2))) / float(jnp.std(est)) < 1.4


def test_uniform_model_scores_log2_k_bits_per_code():
  k, big_t, n = 4, 6, 1000
  sched = diffusion.make_schedule(big_t, "cosine_sqrt", num_classes=k)
  uniform_fn = lambda z_t, t: jnp.zeros(z_t.shape + (k,))
  z0 = jnp.asarray(np.random.default_rng(1).integers(0, k, (n, 2, 2)), jnp.int32)
  nats = jax.jit(lambda key, z: diffusion.nelbo_all_t(jax.random.split(key, n), z, uniform_fn, sched))(
      jax.random.PRNGKey(2), z0)
  bits = np.asarray(diffusion.bits_per_code(nats, 4))
  assert abs(bits.mean() - np.log2(k)) < 4 * bits.std() / np.sqrt(n), bits.mean()
  assert float(diffusion.bits_per_code(jnp.float32(4 * np.log(k)), 4)) == pytest.approx(np.log2(k))


def test_x0_cross_entropy_matches_brute_force_and_its_gradient():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 2, 4, 9)), jnp.float32)
  z0 = jnp.asarray(rng.integers(0, 9, (3, 2, 4)), jnp.int32)
  ce = lambda lg: diffusion.x0_cross_entropy(jax.nn.log_softmax(lg, axis=-1), z0)  # noqa: E731
  lg64 = np.asarray(logits, np.float64)
  log_p = lg64 - np.log(np.exp(lg64).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_p, np.asarray(z0)[..., None], -1)[..., 0].sum((1, 2))
  np.testing.assert_allclose(ce(logits), want, rtol=1e-5)
  # d/dlogits of −log softmax(z_0) is softmax − one_hot(z_0), per position.
  grad = jax.grad(lambda lg: jnp.sum(ce(lg)))(logits)
  np.testing.assert_allclose(grad, np.exp(log_p) - np.eye(9)[np.asarray(z0)], atol=1e-6)


def test_importance_sampler_switches_and_follows_sqrt_ema():
  big_t = 5
  state = diffusion.init_importance(big_t)
  update = jax.jit(importance.update)
  probs_of = jax.jit(diffusion.importance_probs)
  losses = {t: 2.0 * t for t in range(1, big_t + 1)}
  ema = np.zeros(big_t + 1)
  for step in range(11):
    ts = np.arange(1, big_t + 1) if step < 10 else np.arange(1, big_t)   # t = T lags one sample behind
    state = update(state, jnp.asarray(ts), jnp.asarray([losses[t] for t in ts]))
    for t in ts:
      ema[t] = 0.9 * ema[t] + 0.1 * losses[t] ** 2
    np.testing.assert_allclose(np.asarray(probs_of(state)),
                               np.r_[0.0, np.full(big_t, 1 / big_t)], rtol=1e-6)
  assert not bool(diffusion.is_ready(state))
  state = update(state, jnp.array([big_t, big_t]), jnp.array([losses[big_t]] * 2))
  ema[big_t] = 0.9 * ema[big_t] + 0.1 * losses[big_t] ** 2
  assert bool(diffusion.is_ready(state))
  np.testing.assert_allclose(np.asarray(state.history), ema, rtol=1e-5)
  weights = np.sqrt(ema + 1e-10) + 1e-4
  weights[1], weights[0] = weights[2], 0.0
  probs = np.asarray(probs_of(state))
  np.testing.assert_allclose(probs, weights / weights.sum(), rtol=1e-5)
  # Sampling follows p(t) and reports it.
  draw = jax.jit(lambda key, st: jax.vmap(diffusion.sample_t, in_axes=(0, None))(
      jax.random.split(key, 20000), st))
  t, p_t = draw(jax.random.PRNGKey(0), state)
  t = np.asarray(t)
  assert t.min() >= 1 and t.max() <= big_t
  np.testing.assert_allclose(np.asarray(p_t), probs[t], rtol=1e-6)
  freq = np.bincount(t, minlength=big_t + 1) / t.size
  np.testing.assert_allclose(freq, probs, atol=0.015)
  # Uniform mode without a state.
  t_u, p_u = jax.jit(lambda key: diffusion.sample_t(key, num_steps=big_t))(jax.random.PRNGKey(3))
  assert 1 <= int(t_u) <= big_t and float(p_u) == pytest.approx(1 / big_t)


def test_importance_update_duplicates_deterministic():
  state = diffusion.init_importance(8)
  rng = np.random.default_rng(0)
  t = rng.integers(1, 9, 64)
  loss = rng.random(64).astype(np.float32) * 100
  new = jax.jit(importance.update)(state, jnp.asarray(t), jnp.asarray(loss))
  perm = rng.permutation(64)
  again = jax.jit(importance.update)(state, jnp.asarray(t[perm]), jnp.asarray(loss[perm]))
  np.testing.assert_array_equal(np.asarray(new.history), np.asarray(again.history))
  np.testing.assert_array_equal(np.asarray(new.count), np.bincount(t, minlength=9))
  for tt in range(1, 9):
    np.testing.assert_allclose(float(new.history[tt]), 0.1 * np.mean(loss[t == tt].astype(np.float64)**2),
                               rtol=1e-5)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
