"""The AR prior's train step and optimiser, and its config: a step with a non-finite loss is skipped on every
device, AdamW decays only the Dense kernels, and bad `ar` / `ar_sample` / `eval.compare_masks` values are
refused naming the field (the CLI exits 2 with one line, before any work)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.flatten_util
import numpy as np
import optax
import pytest

from conftest import ROOT, load_config
from vqddm_jax import config_schema, parallel
from vqddm_jax.errors import ConfigError
from vqddm_jax.models import ar_prior
from vqddm_jax.training import ar_step, optim

K, CODE_SHAPE = 12, (8, 8)


def _tiny_gpt():
  config = load_config("configs/mnist.py:tiny,compare")
  return config, ar_prior.build_gpt(config, K, CODE_SHAPE)


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_step_with_a_nan_loss_is_skipped_on_every_device(num_devices):
  """A code >= K in one device's batch (a corrupt code map) makes the averaged loss NaN: the step leaves the
  parameters, the EMA and the optimiser state as they were (finite = 0) and counts the step; a clean batch then
  trains (finite = 1)."""
  config, model = _tiny_gpt()
  ocfg = config.ar_train.optim.copy_and_resolve_references()
  ocfg.update(schedule="constant", warmup_steps=0)  # So that the clean step moves the parameters at once.
  optimizer = optim.make_optimizer(ocfg, 10)
  state = ar_step.init_state(model, optimizer, jax.random.key(0))
  p_step = parallel.pmap(functools.partial(ar_step.train_step, model=model, optimizer=optimizer, ema_decay=0.9),
                         in_axes=parallel.STEP_AXES)
  codes = np.random.default_rng(0).integers(0, K, (2 * num_devices,) + CODE_SHAPE).astype(np.int32)
  poisoned = codes.copy()
  poisoned[-1, 3, 5] = K  # On the last device only: the pmean spreads the NaN to every device's update.
  before = parallel.replicate(state)
  skipped, metrics = p_step(before, {"codes": parallel.shard(poisoned)}, jax.random.key(1))
  assert np.all(np.asarray(metrics["finite"]) == 0.0)
  assert np.all(np.isnan(np.asarray(metrics["loss_bits_per_code"])))
  np.testing.assert_array_equal(np.asarray(skipped.step), 1)
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(_leaves(getattr(skipped, name)), _leaves(getattr(before, name)), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)
  trained, metrics = p_step(skipped, {"codes": parallel.shard(codes)}, jax.random.key(1))
  assert np.all(np.asarray(metrics["finite"]) == 1.0)
  loss = np.asarray(metrics["loss_bits_per_code"])
  assert np.all(loss == loss[0]) and abs(loss[0] - np.log2(K)) < 0.5  # Averaged over devices; near uniform.
  moved = [not np.array_equal(a, b) for a, b in zip(_leaves(trained.params), _leaves(skipped.params))]
  assert all(moved)  # Every leaf gets a gradient (Adam moves each by about lr).
  assert all(np.isfinite(x).all() for x in _leaves(trained))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def test_adamw_decays_the_dense_kernels_only():
  """Zero gradients and one AdamW step: Adam's own update is 0, so what moves is the decay; only the leaves
  named `kernel` shrink (by lr · weight_decay), the token and position embeddings, LayerNorm scales and biases
  and the Dense biases stay as they are."""
  config, model = _tiny_gpt()
  assert config.ar_train.optim.weight_decay > 0  # The shipped AR optimiser is AdamW.
  ocfg = config.ar_train.optim.copy_and_resolve_references()
  ocfg.update(lr=0.1, weight_decay=0.5, schedule="constant", warmup_steps=0)
  optimizer = optim.make_optimizer(ocfg, 10)
  params = ar_prior.init_params(model, jax.random.key(0))
  # Every leaf away from 0 (the position table and the biases start at 0, the scales at 1): a decay would show.
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  params = unravel(1.0 + jax.random.uniform(jax.random.key(1), flat.shape))
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  decayed, kept = [], []
  for (path, old), after in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(new),
                                strict=True):
    name, old, after = _path_name(path), np.asarray(old), np.asarray(after)
    if path[-1].key == "kernel":
      np.testing.assert_allclose(after, old * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=name)
      decayed.append(name)
    else:
      np.testing.assert_array_equal(after, old, err_msg=name)
      kept.append(name)
  assert {"block_0/attention/query/kernel", "block_0/attention/out/kernel", "block_0/fc/kernel",
          "block_0/proj/kernel", "head/kernel"} <= set(decayed)
  assert {"token_embedding/embedding", "position_embedding", "block_0/ln_attn/scale", "block_0/ln_mlp/bias",
          "ln_final/scale", "block_0/fc/bias", "block_0/attention/query/bias"} <= set(kept)
  # weight_decay = 0 is plain Adam: nothing moves at all.
  ocfg.weight_decay = 0.0
  plain = optim.make_optimizer(ocfg, 10)
  updates, _ = plain.update(zeros, plain.init(params), params)
  assert all(not np.any(u) for u in _leaves(updates))


@pytest.mark.parametrize("field, value, words", [
    ("ar.num_heads", 7, r"a divisor of ar\.width = 16"),
    ("ar_sample.top_p", 0.0, r"a number in \(0\.0, 1\.0\]"),
    ("ar_sample.candidates", 0, r"an integer in \[1, 4096\]"),
    ("eval.compare_masks", ("nope",), r"one of .*random:FRACTION"),
])
def test_bad_ar_settings_are_refused_naming_the_field(field, value, words):
  config = load_config("configs/mnist.py:tiny,compare")
  section, name = field.split(".")
  config[section][name] = value
  shown = repr(value[0] if isinstance(value, tuple) else value)
  with pytest.raises(ConfigError, match=rf"^config\.{section}\.{name} = {shown} is not allowed: {words}"):
    config_schema.validate_config(config)


def test_cli_with_a_bad_ar_setting_exits_2_with_one_line_before_any_work(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  workdir = tmp_path / "w"
  out = subprocess.run([sys.executable, "-m", "vqddm_jax.main", "--config=configs/mnist.py:tiny",
                        "--config.ar.num_heads=7", f"--workdir={workdir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr == ("vqddm_jax: config.ar.num_heads = 7 is not allowed: a divisor of ar.width = 16\n"), \
      out.stderr[-2000:]
  assert not workdir.exists()


def test_a_second_draw_reuses_the_compiled_ar_sampler(monkeypatch):
  """Each draw of evaluate's comparison used to build a new pmap closure and compile the sampler again, so the
  report's "compiled" sampling time of a later draw included compiling (`generation.program_for`)."""
  from types import SimpleNamespace
  from vqddm_jax import ar_generation, autoregressive
  _, model = _tiny_gpt()
  params = parallel.replicate(ar_prior.init_params(model, jax.random.key(0)))
  gen = SimpleNamespace(ar=SimpleNamespace(model=model), code_shape=CODE_SHAPE,
                        ar_sampling=dict(temperature=1.0, top_k=0, top_p=1.0, candidates=4))
  traced = []
  real = autoregressive.sample
  monkeypatch.setattr(autoregressive, "sample", lambda *a, **k: traced.append(1) or real(*a, **k))
  for seed in (3, 4):  # Two draws, as `evaluation.comparison._ar_samples` makes them.
    for _, codes in ar_generation.sample_in_chunks(gen, params, key=jax.random.key(seed), num=16,
                                                    chunk_size=16):
      assert codes.shape == (16,) + CODE_SHAPE
  assert len(traced) == 1
