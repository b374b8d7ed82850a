"""Class-conditional priors: labels in the code store, the label embedding and label dropout, classifier-free
guidance (the formula, s = 1 and s = 0), and the whole conditional pipeline on a copy of the tiny run."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

from conftest import load_config
from vqddm_jax import diffusion, files as files_lib, parallel, stages
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import ConfigError, MismatchError, MissingInputError
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.models.unet import UNet
from vqddm_jax.stages import sample
from vqddm_jax.training import prior_step
from vqddm_jax.workdir import Workdir

K, C, BIG_T = 7, 3, 12


@pytest.fixture(scope="module")
def conditional_net():
  model = UNet(num_classes=K, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4, num_labels=C)
  params = prior_lib.init_params(model, jax.random.key(0), (4, 4))
  # Distinct label rows, as training would make them (at init they are N(0, 1) already; scale them up so that
  # the label visibly changes the logits).
  params = dict(params)
  params["label_embed"] = dict(params["label_embed"])
  params["label_embed"]["embedding"] = params["label_embed"]["embedding"] * 3.0
  return model, params


def test_label_embedding_has_a_null_row_and_none_means_the_null_label(conditional_net):
  model, params = conditional_net
  assert params["label_embed"]["embedding"].shape == (C + 1, 8)
  z = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, K)
  t = jnp.array([3, 9])
  apply = jax.jit(lambda y: model.apply({"params": params}, z, t, y))
  null = apply(jnp.full((2,), C))
  np.testing.assert_array_equal(jax.jit(lambda: model.apply({"params": params}, z, t))(), null)
  assert not np.allclose(apply(jnp.array([0, 1])), null)
  plain = UNet(num_classes=K, ch=8, ch_mult=(1, 2), num_res_blocks=1, groups=4)
  with pytest.raises(ValueError, match="unconditional"):
    plain.init(jax.random.key(0), z, t, jnp.array([0, 1]))


@pytest.mark.parametrize("t,scale", [(1, 0.5), (12, 3.0)])
def test_guided_x0_is_the_formula_on_separate_calls(conditional_net, t, scale):
  model, params = conditional_net
  z = jax.random.randint(jax.random.key(2), (3, 4, 4), 0, K)
  labels, tt = jnp.array([0, 1, 2]), jnp.full((3,), t)
  cond = jax.nn.log_softmax(jax.jit(prior_lib.logits_fn(model, params, "x0", labels=labels))(z, tt), -1)
  null = jax.nn.log_softmax(jax.jit(prior_lib.logits_fn(model, params, "x0"))(z, tt), -1)
  expected = null + scale * (cond - null)
  expected = expected - jax.scipy.special.logsumexp(expected, axis=-1, keepdims=True)
  got = jax.jit(prior_lib.guided_logits_fn(model, params, "x0", labels, scale))(z, tt)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(jnp.exp(got).sum(-1), 1.0, atol=1e-5)  # p ∝ p_c^s p_u^(1-s), normalised


def test_guidance_scale_1_samples_the_conditional_model_and_0_the_null_label(conditional_net):
  model, params = conditional_net
  sched = diffusion.make_schedule(BIG_T, num_classes=K)
  labels = jnp.array([0, 2])
  draw = lambda fn: jax.jit(lambda: diffusion.sample(jax.random.key(5), fn, sched, (2, 4, 4)))()  # noqa: E731
  guided = lambda s: prior_lib.guided_logits_fn(model, params, "x0", labels, s)  # noqa: E731
  np.testing.assert_array_equal(draw(guided(1.0)), draw(prior_lib.logits_fn(model, params, "x0", labels=labels)))
  np.testing.assert_array_equal(draw(guided(0.0)), draw(prior_lib.logits_fn(model, params, "x0")))
  assert not np.array_equal(draw(guided(3.0)), draw(guided(1.0)))


def test_label_dropout_replaces_about_p_of_the_labels_by_the_null_label():
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(4000))
  labels = jnp.arange(4000) % C
  dropped = prior_step._dropped_labels({"label": labels}, keys, C, 0.25)
  null = np.asarray(dropped == C)
  assert abs(null.mean() - 0.25) < 0.03  # ~4.6 standard errors
  np.testing.assert_array_equal(np.asarray(dropped)[~null], np.asarray(labels)[~null])
  np.testing.assert_array_equal(prior_step._dropped_labels({"label": labels}, keys, C, 0.0), labels)
  assert prior_step._dropped_labels({"label": labels}, keys, 0, 0.25) is None


def test_conditional_train_step_runs_on_8_devices(num_devices, conditional_net):
  model, _ = conditional_net
  sched = diffusion.make_schedule(BIG_T, num_classes=K)
  optimizer = optax.adam(1e-3)
  state = prior_step.init_state(model, optimizer, jax.random.key(0), (4, 4), BIG_T)
  step = functools.partial(prior_step.train_step, model=model, optimizer=optimizer, sched=sched,
                           parametrization="x0", use_importance=False, ema_decay=0.9, t_buckets=2,
                           label_dropout=0.5)
  rng = np.random.default_rng(0)
  batch = {"codes": parallel.shard(rng.integers(0, K, (16, 4, 4)).astype(np.int32)),
           "label": parallel.shard(rng.integers(0, C, (16,)).astype(np.int32))}
  new, metrics = parallel.pmap(step, in_axes=parallel.STEP_AXES)(parallel.replicate(state), batch, jax.random.key(1))
  assert float(metrics["finite"][0]) == 1.0
  grad_rows = np.asarray(parallel.unreplicate(new).params["label_embed"]["embedding"]
                         - state.params["label_embed"]["embedding"])
  assert np.abs(grad_rows).sum(axis=1).min() > 0  # every row, the null one included, was trained


def test_code_store_keeps_labels_and_refuses_what_does_not_fit(tmp_path):
  store = epath.Path(tmp_path)
  codes = {"train": np.arange(6 * 4, dtype=np.int32).reshape(6, 2, 2),  # six distinct maps
           "test": np.zeros((2, 2, 2), np.int32)}
  labels = {"train": np.array([0, 1, 2, 0, 1, 2], np.int32), "test": np.array([2, 1], np.int32)}
  codes_lib.write_codes(store, codes, {"codebook_size": 24}, labels, ["a", "b", "c"])
  got_codes, got_labels = codes_lib.load_labelled_codes(store, "train", 3)
  np.testing.assert_array_equal(got_labels, labels["train"])
  np.testing.assert_array_equal(got_codes, codes["train"])
  np.testing.assert_array_equal(codes_lib.load_codes(store, "test"), codes["test"])
  with pytest.raises(MismatchError, match="set config.prior.num_classes = 3"):
    codes_lib.load_labelled_codes(store, "train", 4)
  batches = codes_lib.CodeBatches(codes["train"], per_shard=1, num_shards=2, seed=0, labels=labels["train"])
  for _ in range(5):  # Over an epoch boundary: each label stays with its map.
    b = next(batches)
    idx = [int(np.flatnonzero((codes["train"] == m).all(axis=(1, 2)))[0]) for m in b["codes"].reshape(-1, 2, 2)]
    np.testing.assert_array_equal(b["label"].reshape(-1), labels["train"][idx])
  plain = epath.Path(tmp_path / "plain")
  codes_lib.write_codes(plain, codes, {"codebook_size": 24})
  with pytest.raises(MissingInputError, match="holds no class labels"):
    codes_lib.load_labelled_codes(plain, "train", 3)


def test_guidance_needs_a_conditional_prior_with_label_dropout():
  from vqddm_jax.config_schema import validate_config
  config = load_config("configs/mnist.py:tiny")
  config.sample.guidance_scale = 2.0
  with pytest.raises(ConfigError, match="sample.guidance_scale.*unconditional"):
    validate_config(config)
  config = load_config("configs/mnist.py:tiny,conditional")
  config.prior_train.label_dropout = 0.0
  with pytest.raises(ConfigError, match="eval.guidance_scales.*label_dropout"):
    validate_config(config)
  config = load_config("configs/mnist.py:tiny,conditional")
  config.sample.class_labels = (3, 10)
  with pytest.raises(ConfigError, match="sample.class_labels"):
    validate_config(config)


def test_conditional_pipeline_on_the_tiny_run(pipeline_run, tmp_path):
  """Stage 1, ReFiT and the code store (which holds MNIST's labels) of the shared tiny run; a conditional
  prior trained on them and evaluated with the guidance section (`sample` draws through the same programs)."""
  base_config, base = pipeline_run
  workdir = Workdir(tmp_path / "w")
  for name in ("vqvae", "refit", "codes"):
    shutil.copytree(base.root / name, workdir.root / name)
  (workdir.eval_dir).mkdir(parents=True)
  for cached in base.eval_dir.glob("*.npz"):  # The reference statistics and the classifier, computed once.
    shutil.copy(cached, workdir.eval_dir / cached.name)
  shutil.copy(base.classifier_cache, workdir.classifier_cache)
  config = load_config("configs/mnist.py:tiny,conditional")
  config.data.data_dir = base_config.data.data_dir
  config.eval.update(guidance_scales=(1.0, 2.0), step_fractions=(1,), inpaint_images=8)
  config.sample.class_labels = (7, 3)
  for name in ("train_prior", "evaluate"):
    result = stages.run_stage(next(s for s in stages.REGISTRY if s.name == name), config, workdir)
    assert result.completed and not result.skipped, name
  nelbo = files_lib.read_json(workdir.prior.eval_json)
  assert np.isfinite(nelbo["nelbo_bits_per_code"]) and np.isfinite(nelbo["null_label_nelbo_bits_per_code"])
  labels, per_class = sample.sample_labels(config)  # `--mode=sample`'s chains: blocks of one class, one grid row each
  np.testing.assert_array_equal(labels, [7] * 8 + [3] * 8)
  assert per_class == 8 and sample.outputs(config, workdir)[0][0].name == "samples_S20_n16_seed1_s1_y7-3.json"
  report = files_lib.read_json(workdir.eval_report("json"))
  rows = report["conditional"]["rows"]
  assert [r["guidance_scale"] for r in rows] == [1.0, 2.0] and len(rows[0]["per_class"]) == 10
  assert all(0.0 <= r["overall"]["accuracy"] <= 1.0 for r in rows)
  assert (workdir.eval_dir / "classes_s2.png").exists()
  assert "Class-conditional samples under guidance" in workdir.eval_report("md").read_text()
