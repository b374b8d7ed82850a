"""The AR prior's transformer: cached decoding equals the full causal pass, causality, the START token,
parameter shapes and names, dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqddm_jax.models.gpt import GPT, init_cache

K, L, WIDTH, LAYERS, HEADS, B = 11, 16, 32, 2, 4, 3


@pytest.fixture(scope="module")
def model_and_params():
  model = GPT(num_classes=K, length=L, width=WIDTH, num_layers=LAYERS, num_heads=HEADS)
  # Jitted: op by op, init takes seconds.
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, L), jnp.int32))["params"])(jax.random.key(0))
  # Taming's position embedding starts at 0: make it random so that a wrong position index would show.
  params = {**params, "position_embedding": jax.random.normal(jax.random.key(1), (L, WIDTH))}
  return model, params


def _inputs(seed: int) -> jnp.ndarray:
  """i32[B, L]: START then random codes."""
  codes = jax.random.randint(jax.random.key(seed), (B, L - 1), 0, K, jnp.int32)
  return jnp.concatenate([jnp.full((B, 1), K, jnp.int32), codes], axis=1)


def test_cached_decoding_equals_the_full_causal_pass(model_and_params):
  model, params = model_and_params
  inputs = _inputs(2)
  full = jax.jit(model.apply)({"params": params}, inputs)
  assert full.shape == (B, L, K) and full.dtype == jnp.float32

  @jax.jit
  def step(cache, tokens):
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
    return logits, variables["cache"]

  cache = init_cache(model, B)
  via_init = jax.jit(lambda key: model.init(key, jnp.zeros((B, L), jnp.int32), decode=True)["cache"])(
      jax.random.key(5))
  assert jax.tree.structure(cache) == jax.tree.structure(via_init)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(via_init)):
    assert a.shape == b.shape and a.dtype == b.dtype and not np.any(np.asarray(b))   # init leaves it empty
  assert cache["block_0"]["attention"]["cached_key"].shape == (B, L, HEADS, WIDTH // HEADS)

  decoded = []
  for i in range(L):
    logits, cache = step(cache, inputs[:, i:i + 1])
    decoded.append(logits)
  assert int(cache["index"]) == L
  np.testing.assert_allclose(np.concatenate(decoded, axis=1), full, atol=1e-5, rtol=0)

  # Several positions at once (a prefill of 5), then one at a time: the same logits.
  cache = init_cache(model, B)
  first, cache = step(cache, inputs[:, :5])
  rest = [step(cache, inputs[:, 5:6])[0]]
  np.testing.assert_allclose(np.concatenate([first] + rest, axis=1), full[:, :6], atol=1e-5, rtol=0)


@pytest.mark.parametrize("j", [0, 7, L - 2])
def test_changing_a_code_changes_no_earlier_logits(model_and_params, j):
  """Code j is input j + 1: outputs 0..j (which predict codes 0..j) must not move, later ones must."""
  model, params = model_and_params
  inputs = _inputs(3)
  changed = inputs.at[:, j + 1].set((inputs[:, j + 1] + 1) % K)
  before = model.apply({"params": params}, inputs)
  after = model.apply({"params": params}, changed)
  np.testing.assert_allclose(after[:, :j + 1], before[:, :j + 1], atol=1e-6, rtol=0)
  assert np.min(np.max(np.abs(after[:, j + 1:] - before[:, j + 1:]), axis=(1, 2))) > 1e-4


def test_start_token_and_parameter_shapes(model_and_params):
  model, params = model_and_params
  assert params["token_embedding"]["embedding"].shape == (K + 1, WIDTH)
  assert params["position_embedding"].shape == (L, WIDTH)
  assert set(params["head"]) == {"kernel"} and params["head"]["kernel"].shape == (WIDTH, K)   # no head bias
  assert params["ln_final"]["scale"].shape == (WIDTH,)
  for i in range(LAYERS):
    block = params[f"block_{i}"]
    assert set(block) == {"ln_attn", "attention", "ln_mlp", "fc", "proj"}
    for name in ("query", "key", "value", "out"):
      assert block["attention"][name]["kernel"].shape == (WIDTH, WIDTH)
      assert block["attention"][name]["bias"].shape == (WIDTH,)
    assert block["fc"]["kernel"].shape == (WIDTH, 4 * WIDTH)
    assert block["proj"]["kernel"].shape == (4 * WIDTH, WIDTH)
  # Every linear layer is a Dense whose weight is named "kernel" (the leaves the optimiser decays).
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert sum(p.endswith("['kernel']") for p in paths) == LAYERS * 6 + 1
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))

  # START (row K) is its own token: as input 0 it gives other logits than any code would.
  inputs = jnp.arange(K + 1, dtype=jnp.int32)[:, None]
  first = np.asarray(model.apply({"params": params}, inputs)[:, 0])
  gaps = np.abs(first[K][None] - first[:K]).max(axis=-1)
  assert gaps.min() > 1e-4
  with pytest.raises(ValueError, match="more than its length"):
    model.apply({"params": params}, jnp.zeros((1, L + 1), jnp.int32))


def test_dropout_only_when_training_with_a_positive_rate(model_and_params):
  _, params = model_and_params
  inputs = _inputs(4)
  dropped = GPT(num_classes=K, length=L, width=WIDTH, num_layers=LAYERS, num_heads=HEADS, dropout=0.3)
  plain = GPT(num_classes=K, length=L, width=WIDTH, num_layers=LAYERS, num_heads=HEADS)
  reference = plain.apply({"params": params}, inputs)
  # Not training, or a rate of 0: deterministic, and no dropout rng is needed.
  np.testing.assert_array_equal(dropped.apply({"params": params}, inputs), reference)
  np.testing.assert_array_equal(plain.apply({"params": params}, inputs, train=True), reference)
  a = dropped.apply({"params": params}, inputs, train=True, rngs={"dropout": jax.random.key(0)})
  b = dropped.apply({"params": params}, inputs, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(a - reference).max() > 1e-3 and np.abs(a - b).max() > 1e-3
