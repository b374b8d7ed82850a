"""AR sampling: logit filtering, greedy and prefix-forced sampling against the uncached pass, and the
sample-then-reweight inpainting, checked for exactness on a toy model whose conditionals are known."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax import autoregressive as ar
from vqddm_jax.models.gpt import GPT

K, L, B = 11, 16, 4


@pytest.fixture(scope="module")
def gpt_setup():
  """A small GPT whose parameters are spread out (init ± noise), so that greedy choices have clear margins."""
  model = GPT(num_classes=K, length=L, width=32, num_layers=2, num_heads=4)

  @jax.jit   # One program, and one draw for all the noise: per-leaf draws took seconds to compile.
  def init(key):
    flat, unflatten = jax.flatten_util.ravel_pytree(model.init(key, jnp.zeros((1, L), jnp.int32))["params"])
    return unflatten(flat + 0.3 * jax.random.normal(jax.random.fold_in(key, 1), flat.shape))
  params = init(jax.random.key(0))
  return model, params, jax.jit(lambda inputs: model.apply({"params": params}, inputs))


def _greedy_by_full_pass(full, prefix: np.ndarray, start: int) -> np.ndarray:
  """Greedy decoding with the uncached pass `full: inputs i32[B, L] -> f32[B, L, K]`: code i = argmax of
  output i, for i = start..L-1 after the given prefix (later positions of the padded inputs cannot matter: the
  pass is causal, see test_gpt)."""
  codes = np.array(prefix, np.int32)
  for i in range(start, L):
    logits = np.asarray(full(ar.shifted_inputs(jnp.asarray(codes), K)))[:, i]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4), "near tie: the comparison would be fragile"
    codes[:, i] = logits.argmax(-1)
  return codes


def test_filter_logits_top_k_top_p_and_temperature():
  logits = jax.random.normal(jax.random.key(0), (5, 10))
  kept = np.isfinite(ar.filter_logits(logits, top_k=1))
  np.testing.assert_array_equal(kept, np.eye(10, dtype=bool)[np.argmax(logits, -1)])
  kept3 = np.isfinite(ar.filter_logits(logits, top_k=3))
  np.testing.assert_array_equal(kept3, np.argsort(np.argsort(-np.asarray(logits), -1), -1) < 3)
  np.testing.assert_allclose(ar.filter_logits(logits, temperature=2.0), np.asarray(logits) / 2, rtol=1e-6)
  np.testing.assert_array_equal(ar.filter_logits(logits), logits)   # the defaults keep everything

  # Probabilities 0.5, 0.3, 0.15, 0.05, in shuffled order: the nucleus is the smallest set reaching top_p.
  order = np.array([2, 0, 3, 1])
  log_p = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])[order])
  for top_p, size in [(1e-6, 1), (0.45, 1), (0.75, 2), (0.81, 3), (0.96, 4)]:
    kept = np.isfinite(ar.filter_logits(log_p, top_p=top_p))
    np.testing.assert_array_equal(kept, order < size, err_msg=f"top_p={top_p}")
  # top_k first, then the nucleus of the renormalised rest (0.625, 0.375): 0.6 keeps one code, not two.
  np.testing.assert_array_equal(np.isfinite(ar.filter_logits(log_p, top_p=0.6)), order < 2)
  np.testing.assert_array_equal(np.isfinite(ar.filter_logits(log_p, top_k=2, top_p=0.6)), order < 1)
  # Documented tie rule: codes tied with the k-th largest value are all kept.
  assert np.isfinite(ar.filter_logits(jnp.array([1.0, 3.0, 3.0, 0.0]), top_k=1)).tolist() == [False, True,
                                                                                               True, False]
  for bad in [dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]:
    with pytest.raises(ValueError):
      ar.filter_logits(logits, **bad)


def test_top_k_1_is_greedy_decoding(gpt_setup):
  model, params, full = gpt_setup
  greedy = _greedy_by_full_pass(full, np.zeros((B, L), np.int32), 0)
  draw = jax.jit(lambda p, key: ar.sample(ar.gpt_decoder(model, p), key, B, top_k=1))
  for seed in range(3):
    np.testing.assert_array_equal(draw(params, jax.random.key(seed)), greedy)
  # Sampling at temperature 1 is not greedy (the test above can fail).
  plain = jax.jit(lambda p, key: ar.sample(ar.gpt_decoder(model, p), key, B))(params, jax.random.key(0))
  assert plain.shape == (B, L) and plain.dtype == jnp.int32 and not np.array_equal(plain, greedy)


def test_prefix_forced_sampling_keeps_known_codes_and_continues_greedily(gpt_setup):
  model, params, full = gpt_setup
  known = jax.random.randint(jax.random.key(7), (B, L), 0, K, jnp.int32)
  scattered = jax.random.bernoulli(jax.random.key(8), 0.5, (B, L))
  top_half = jnp.broadcast_to(jnp.arange(L) < L // 2, (B, L))

  @functools.partial(jax.jit, static_argnames="top_k")
  def forced(params, key, mask, top_k):
    return ar.sample(ar.gpt_decoder(model, params), key, B, top_k=top_k, known=known, known_mask=mask)

  codes = forced(params, jax.random.key(9), scattered, top_k=0)
  np.testing.assert_array_equal(np.asarray(codes)[scattered], np.asarray(known)[scattered])
  codes = forced(params, jax.random.key(10), top_half, top_k=1)
  prefix = np.where(top_half, known, 0)
  np.testing.assert_array_equal(codes, _greedy_by_full_pass(full, prefix, L // 2))
  with pytest.raises(ValueError, match="together"):
    ar.sample(ar.gpt_decoder(model, params), jax.random.key(0), B, known=known)


def test_one_candidate_reweighting_is_prefix_forced_sampling(gpt_setup):
  model, params, _ = gpt_setup
  known = jax.random.randint(jax.random.key(3), (B, L), 0, K, jnp.int32)
  mask = jax.random.bernoulli(jax.random.key(4), 0.5, (B, L))
  key = jax.random.key(5)

  @jax.jit   # One program for the lot: op by op the GPT passes take seconds.
  def run(params):
    decoder = ar.gpt_decoder(model, params)
    reweighted = ar.inpaint_reweighted(decoder, key, known, mask, num_candidates=1)
    forced = ar.sample(decoder, jax.random.fold_in(key, 0), B, known=known, known_mask=mask)
    log_p = ar.log_probs(decoder, forced)
    full = jax.nn.log_softmax(model.apply({"params": params}, ar.shifted_inputs(forced, K)), axis=-1)
    return reweighted, forced, log_p, ar.log_weights(log_p, mask), full

  (codes, ess, log_w), forced, log_p, expected_log_w, full = jax.tree.map(np.asarray, run(params))
  np.testing.assert_array_equal(codes, forced)
  np.testing.assert_allclose(ess, np.ones(B), rtol=1e-6)
  np.testing.assert_allclose(log_w, expected_log_w, rtol=1e-6)
  assert np.all(log_w < 0)   # the random mask has known codes after unknown ones in every row
  # log_probs is the teacher-forced pass of the model itself.
  np.testing.assert_allclose(log_p, np.take_along_axis(full, forced[..., None], -1)[..., 0], atol=1e-6)


def test_log_weights_count_known_codes_after_the_first_unknown():
  logp = -jnp.arange(1.0, 7.0)[None].repeat(2, axis=0)                    # -1 .. -6
  mask = jnp.array([[True, True, False, True, False, True],                # counts positions 3 and 5
                    [False, True, True, False, False, False]])             # counts 1 and 2
  np.testing.assert_allclose(ar.log_weights(logp, mask), [-4.0 - 6.0, -2.0 - 3.0])
  np.testing.assert_allclose(ar.log_weights(logp, jnp.ones((2, 6), bool)), [0.0, 0.0])   # all known: a prefix


def test_effective_sample_size():
  np.testing.assert_allclose(ar.effective_sample_size(jnp.full((50, 3), -7.0)), [50.0] * 3, rtol=1e-5)
  dominant = jnp.full((50, 2), -1000.0).at[4].set(0.0)
  np.testing.assert_allclose(ar.effective_sample_size(dominant), [1.0, 1.0], rtol=1e-5)
  two = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])[:, None]
  np.testing.assert_allclose(ar.effective_sample_size(two), [2.0], rtol=1e-6)


# --- Exactness on a toy model with known conditionals -------------------------------------------------------

TOY_K, TOY_L = 3, 3


def toy_decoder(joint: np.ndarray) -> ar.Decoder:
  """The `Decoder` of the explicit joint distribution `joint: [K] * L` (all entries > 0).

  log p(z_i = c | z_<i) is tabulated at [i, Σ_{j<i} z_j K^j, c]; the cache is (the codes so far, i32[B, L],
  the position, i32[]).
  """
  k, length = joint.shape[0], joint.ndim
  table = np.full((length, k ** length, k), 1.0 / k)   # rows of unused prefix indices: any distribution
  radix = k ** np.arange(length)
  for z in itertools.product(range(k), repeat=length):
    for i in range(length):
      next_mass = joint[z[:i]].reshape(k, -1).sum(axis=1)     # p(z_<i, z_i = c) for each c
      table[i, int(np.dot(z[:i], radix[:i]))] = next_mass / next_mass.sum()
  log_table, radix = jnp.asarray(np.log(table), jnp.float32), jnp.asarray(radix, jnp.int32)

  def step(cache, inputs):
    codes, pos = cache
    codes = jnp.where(jnp.arange(length) == pos - 1, inputs[:, None], codes)   # input pos is code pos - 1
    prefix = jnp.sum(jnp.where(jnp.arange(length) < pos, codes, 0) * radix, axis=1)
    return log_table[pos, prefix], (codes, pos + 1)

  def logits(inputs):
    weighted = inputs[:, 1:] * radix[:-1]
    prefix = jnp.concatenate([jnp.zeros_like(weighted[:, :1]), jnp.cumsum(weighted, axis=1)], axis=1)
    return log_table[jnp.arange(length)[None], prefix]

  init = lambda batch: (jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))  # noqa: E731
  return ar.Decoder(num_classes=k, length=length, init_cache=init, step=step, logits=logits)


def _max_z_score(samples: np.ndarray, unknown: list[int], target: np.ndarray) -> float:
  """The largest |empirical - target| / standard error over the outcomes of the unknown positions."""
  outcome = np.ravel_multi_index(tuple(samples[:, i] for i in unknown), (TOY_K,) * len(unknown))
  freq = np.bincount(outcome, minlength=target.size) / len(samples)
  se = np.sqrt(target.ravel() * (1 - target.ravel()) / len(samples))
  return float(np.max(np.abs(freq - target.ravel()) / se))


@pytest.mark.parametrize("known_values", [{2: 1}, {0: 2, 2: 0}], ids=["known_2", "known_0_and_2"])
def test_reweighting_is_exact_on_a_toy_model(known_values):
  rng = np.random.default_rng(0)
  joint = rng.dirichlet(np.full(TOY_K ** TOY_L, 0.5)).reshape((TOY_K,) * TOY_L)
  decoder = toy_decoder(joint)
  copies = 2000
  known = np.zeros((copies, TOY_L), np.int32)
  mask = np.zeros((copies, TOY_L), bool)
  for i, value in known_values.items():
    known[:, i], mask[:, i] = value, True
  unknown = [i for i in range(TOY_L) if i not in known_values]
  # p(z_unknown | z_known) from the table, and what prefix-forced sampling draws instead.
  index = tuple(known_values.get(i, slice(None)) for i in range(TOY_L))
  conditional = joint[index] / joint[index].sum()
  prefix_index = tuple(v if i in known_values and i < unknown[0] else slice(None) for i, v in
                       ((i, known_values.get(i)) for i in range(TOY_L)))
  forced_law = joint[prefix_index].sum(axis=tuple(range(len(unknown), joint[prefix_index].ndim)))
  forced_law = forced_law / forced_law.sum()

  num = 400
  inpaint = jax.jit(lambda key: ar.inpaint_reweighted(decoder, key, known, mask, num_candidates=num))
  codes, ess, _ = map(np.asarray, inpaint(jax.random.key(1)))
  np.testing.assert_array_equal(codes[mask], known[mask])
  assert np.all((ess >= 1) & (ess <= num))
  # 4 standard errors of `copies` draws per outcome. Resampling from N candidates is biased by O(Var w / N):
  # here the ESS is about 0.6 N, so that is ~1e-3 in probability, a tenth of one standard error (~1e-2).
  assert _max_z_score(codes, unknown, conditional) < 4.0

  forced = np.asarray(jax.jit(lambda key: ar.sample(decoder, key, copies, known=known, known_mask=mask))(
      jax.random.key(2)))
  assert _max_z_score(forced, unknown, forced_law) < 4.0       # the toy decoder's own conditionals are right
  assert _max_z_score(forced, unknown, conditional) > 10.0     # and they are not the conditional we want
