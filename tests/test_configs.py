"""Every config file loads and validates; bad values fail naming the field; the CLI rejects bad input; one
validator per section, section keys that are the built modules' attributes, choices defined once."""
import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, load_config
from vqddm_jax import choices, config_schema, diffusion, kmeans
from vqddm_jax.config_checks import field_value, set_field
from vqddm_jax.errors import ConfigError
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.models import ar_prior
from vqddm_jax.models.discriminator import NLayerDiscriminator, build_discriminator
from vqddm_jax.models.gpt import GPT
from vqddm_jax.models import unet as unet_lib
from vqddm_jax.models.unet import UNet
from vqddm_jax.models.vqvae import VQVAE, build_vqvae

CONFIGS = ["configs/mnist.py", "configs/mnist.py:tiny", "configs/celeba.py", "configs/celeba.py:celeb_a",
           "configs/lsun_church.py", "configs/celeba.py:authors", "configs/lsun_church.py:authors",
           "configs/mnist.py:compare", "configs/mnist.py:tiny,compare", "configs/celeba.py:ar,authors",
           "configs/lsun_church.py:ar", "configs/mnist.py:conditional", "configs/mnist.py:tiny,conditional",
           "configs/imagenet.py", "configs/imagenet.py:authors"]


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_loads_and_validates(spec):
  config = load_config(spec)
  assert config_schema.validate_config(config) is config


def test_folder_variant_requires_a_folder():
  config = load_config("configs/celeba.py:folder")
  with pytest.raises(ValueError, match="data.image_folder"):
    config_schema.validate_config(config)


def test_celeba_matches_the_paper():
  config = load_config("configs/celeba.py")
  v = config.vqvae
  assert (v.ch, tuple(v.ch_mult), v.num_res_blocks, tuple(v.attn_resolutions)) == (128, (1, 1, 2, 2, 4), 2, (16,))
  assert (v.embed_dim, v.codebook_size, v.groups, config.vqvae_train.beta) == (256, 1024, 32, 0.25)


def test_imagenet_is_class_conditional_with_the_authors_sizes():
  config = load_config("configs/imagenet.py")
  p, t = config.prior, config.prior_train
  assert (p.num_classes, t.label_dropout, p.ch, tuple(p.ch_mult), config.diffusion.num_steps) == (
      1000, 0.1, 128, (1, 2, 4, 8), 4000)
  assert (t.batch_size, t.num_steps, t.optim.lr, config.refit.num_codes) == (180, 570_000, 1e-4, 1024)
  assert (config.vqvae.z_channels, config.vqvae.embed_dim, tuple(config.vqvae.ch_mult)) == (256, 256, (1, 1, 2, 2, 4))
  folder = load_config("configs/imagenet.py:folder")
  assert folder.data.class_folders and folder.data.source == "image_folder"
  unet = prior_lib.build_denoiser(config, 1024)
  shapes = unet_lib.param_shapes(unet, 16, 16)
  assert shapes["label_embed"]["embedding"].shape == (1001, 128)


def test_taming_f16_imports_stage_1_and_needs_the_converted_folder(tmp_path):
  config = load_config("configs/celeba.py:taming_f16")
  assert (config.vqvae_train.num_steps, config.vqvae_train.codebook_loss, config.vqvae.attn_at_resolution) == (
      0, "taming_legacy", 256)
  with pytest.raises(ConfigError, match="vqvae_train.init_from.*converted tokenizer"):
    config_schema.validate_config(config)
  config.vqvae_train.init_from = str(tmp_path)
  config_schema.validate_config(config)
  config = load_config("configs/imagenet.py:taming_f16,authors")
  assert config.vqvae.codebook_size == 1024 and config.prior.num_classes == 1000


def test_unknown_config_argument_raises():
  with pytest.raises(ValueError, match="tiny"):
    load_config("configs/mnist.py:huge")


@pytest.mark.parametrize("field,value,words", [
    ("vqvae.groups", 7, "divisor"),
    ("prior.groups", 3, "divisor"),
    ("vqvae_train.beta", -0.1, "number in"),
    ("vqvae.codebook_size", 1, "integer in"),
    ("vqvae.dtype", "float16", "one of"),
    ("vqvae_train.optim.schedule", "linear", "one of"),
    ("vqvae_train.optim.lr", -1.0, "number in"),
    ("vqvae_train.recon_loss", "l2", "one of"),
    ("data.image_size", 30, "multiple"),
    ("seed", -1, "integer in"),
    ("prior.dropout", 0.1, "num_res_blocks >= 2"),
    ("prior_train.hybrid_ce_weight", -0.5, "number in"),
    ("eval.sample_draws", 0, "integer in"),
    ("sample.temperature", 0.0, "number in"),
    ("refit.kmeans_overrelax", 2.0, "number in"),
    ("refit.kmeans_nested", ((0, 3),), "num_points >= 1"),
    ("distributed.local_device_ids", "a,b", "comma-separated"),
    ("distributed.coordinator_address", "host", "HOST:PORT"),
    ("distributed.heartbeat_timeout", 1, "integer in"),
    ("distributed.shutdown_timeout", 0, "integer in"),
    ("train_watchdog_minutes", -1.0, "number in"),
    # The data section speaks the same dialect (types and ranges in one check each).
    ("data.channels", 2, "one of 1, 3"),
    ("data.holdout_fraction", 1.0, r"number in \(0.0, 1.0\)"),
    ("data.train_split", " ", "non-empty string"),
    # A ConfigDict refuses 1 or 'yes' for a bool field, but not None; one check says what is allowed.
    ("refit.enabled", None, "True or False"),
    ("prior.softmax_q", None, "True or False"),
    ("diffusion.importance_sampling", None, "True or False"),
])
def test_bad_value_names_the_field(field, value, words):
  config = load_config("configs/mnist.py")
  set_field(config, field, value)
  with pytest.raises(ValueError, match=rf"config\.{field.replace('.', r'[.]')} = .*{words}"):
    config_schema.validate_config(config)


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "vqddm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_unknown_mode_and_bad_value_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  out = _main("--config=configs/mnist.py:tiny", f"--workdir={workdir}", "--mode=nope")
  assert out.returncode != 0 and "--mode" in out.stderr and "train_vqvae" in out.stderr
  out = _main("--config=configs/mnist.py:tiny", f"--workdir={workdir}", "--config.vqvae.groups=7")
  assert out.returncode == 2
  assert "config.vqvae.groups = 7" in out.stderr and "divisor" in out.stderr
  assert not workdir.exists()  # Nothing was done.


def test_cli_help_lists_the_modes():
  out = _main("--help")
  assert "train_vqvae" in out.stdout and "--workdir" in out.stdout


def test_distributed_fields_go_together_and_devices_must_divide_batches():
  config = load_config("configs/mnist.py")
  config.distributed.update(enabled=True, coordinator_address="10.0.0.1:1234")
  with pytest.raises(ValueError, match="go together.*num_processes, config.distributed.process_id"):
    config_schema.validate_config(config)
  config.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(ValueError, match=r"config\.distributed\.process_id = 2 .*\[0, 1\]"):
    config_schema.validate_config(config)
  config.distributed.process_id = 1
  config_schema.validate_config(config)
  config_schema.validate_for_devices(config, num_devices=16, num_hosts=2)
  with pytest.raises(ValueError, match=r"config\.vqvae_train\.batch_size = 16 .*multiple of the 32 devices"):
    config_schema.validate_for_devices(config, num_devices=32, num_hosts=4)


def test_kmeans_options_reach_the_config():
  config = load_config("configs/mnist.py")
  config.refit.update(kmeans_nested=((16384, 6), (65536, 2)), kmeans_overrelax=1.5)
  config_schema.validate_config(config)


def test_every_section_has_one_validator_named_for_it():
  config = config_schema.base_config()
  sections = {name for name, value in config.items() if isinstance(value, ml_collections.ConfigDict)}
  assert set(config_schema.VALIDATORS) == sections
  for name, validator in config_schema.VALIDATORS.items():
    assert validator.__name__ == f"validate_{name}"


def _attributes(module) -> set[str]:
  return {f.name for f in dataclasses.fields(module)} - {"parent", "name"}


def test_model_sections_are_the_attributes_of_the_modules_they_build():
  """`vqvae`, `prior` and `discriminator` hold exactly the modules' attributes, less what comes from elsewhere
  (the data's channels, the number of codes), so a builder is `Module(**section)` and no name can drift."""
  config = load_config("configs/celeba.py:authors")  # time_scale is a field reference there
  assert set(config.vqvae) == _attributes(VQVAE) - {"out_channels"}
  # prior.num_classes is the image classes of a conditional prior: the UNet's num_labels (its num_classes is K).
  assert set(config.prior) == _attributes(UNet) - {"num_classes", "num_labels"} | {"num_classes"}
  assert set(config.discriminator) == _attributes(NLayerDiscriminator)
  config.discriminator.update(ndf=32, num_layers=2)
  assert build_discriminator(config.discriminator) == NLayerDiscriminator(ndf=32, num_layers=2)
  vqvae, unet = build_vqvae(config.vqvae, 3, codebook_size=512), prior_lib.build_denoiser(config, 512)
  for model, section in ((vqvae, config.vqvae), (unet, config.prior)):
    for name, value in section.items():
      built = getattr(model, "num_labels" if (model, name) == (unet, "num_classes") else name)
      assert (built.dtype if name == "dtype" else built) == (value if name != "codebook_size" else 512), name
  assert (vqvae.out_channels, unet.num_classes, unet.time_scale) == (3, 512, 1.0)


def _num_params(model) -> int:
  shapes = jax.eval_shape(lambda: ar_prior.init_params(model, jax.random.key(0)))
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def test_the_ar_section_builds_the_gpt_at_the_sizes_the_configs_promise():
  """`ar` holds the GPT's attributes less the code count and the length; `:compare`'s AR prior is within 1% of
  the default denoiser's size; `:ar` on the 256×256 configs is taming's faces transformer (~800 M)."""
  config = load_config("configs/mnist.py:compare")
  assert config.ar_train.enabled and config.eval.sample_draws == 5
  assert set(config.ar) == _attributes(GPT) - {"num_classes", "length"}
  gpt = ar_prior.build_gpt(config, 128, (8, 8))
  assert (gpt.num_classes, gpt.length, gpt.width, gpt.num_layers) == (128, 64, 240, 4)
  denoiser = prior_lib.build_denoiser(config, 128)
  unet_params = jax.eval_shape(lambda: prior_lib.init_params(denoiser, jax.random.key(0), (8, 8)))
  unet_size = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(unet_params)))
  assert abs(_num_params(gpt) / unet_size - 1) < 0.01, (_num_params(gpt), unet_size)
  for spec in ("configs/celeba.py:ar", "configs/lsun_church.py:ar,authors"):
    config = load_config(spec)
    gpt = ar_prior.build_gpt(config, 1024, (16, 16))
    assert (gpt.width, gpt.num_layers, gpt.num_heads, gpt.length, gpt.dtype) == (1664, 24, 16, 256, jnp.bfloat16)
    assert 795e6 < _num_params(gpt) < 805e6 and config.ar_train.optim.weight_decay == 0.01
  assert not load_config("configs/celeba.py").ar_train.enabled  # Off unless asked for.


def test_the_code_takes_exactly_the_choices_the_schema_allows():
  """One tuple each, in `vqddm_jax.choices`: the code that acts on a name imports it, and accepts each."""
  assert kmeans.INITS is choices.KMEANS_INITS
  assert diffusion.SCHEDULE_KINDS is choices.SCHEDULE_KINDS
  assert diffusion.PARAMETRIZATIONS is choices.PARAMETRIZATIONS
  for kind in choices.SCHEDULE_KINDS:
    assert diffusion.make_schedule(10, kind, num_classes=4).kind == kind
  config = load_config("configs/mnist.py:tiny")
  for dtype in choices.DTYPES:
    config.vqvae.dtype = dtype
    assert build_vqvae(config.vqvae, 1).dtype.__name__ == dtype
  config.refit.kmeans_init = "random"
  allowed = ", ".join(repr(name) for name in choices.KMEANS_INITS)
  with pytest.raises(ConfigError, match=r"config\.refit\.kmeans_init = 'random' .*" + re.escape(allowed)):
    config_schema.validate_config(config)


def test_one_dotted_path_walker_reads_and_sets_and_names_a_missing_field():
  config = load_config("configs/mnist.py")
  set_field(config, "prior_train.optim.lr", 5e-4)
  assert field_value(config, "prior_train.optim.lr") == config.prior_train.optim.lr == 5e-4
  tree = {"sample": {"seed": 1}}  # plain nested dicts too (`vqddm_jax.load` overrides)
  set_field(tree, "sample.seed", 7)
  assert tree == {"sample": {"seed": 7}}
  for field in ("prior.nosuch", "nosuch.lr", "prior_train.optim.nosuch"):
    with pytest.raises(ConfigError, match=rf"config\.{field.replace('.', r'[.]')} is missing"):
      set_field(config, field, 1)  # a misspelt name adds no field
    with pytest.raises(ConfigError, match="is missing"):
      field_value(config, field)
  assert "nosuch" not in config.prior
