"""Every config file loads and validates; bad values fail naming the field; the CLI rejects bad input."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from vqddm_jax import config_schema

CONFIGS = ["configs/mnist.py", "configs/mnist.py:tiny", "configs/celeba.py", "configs/celeba.py:celeb_a",
           "configs/lsun_church.py", "configs/celeba.py:authors", "configs/lsun_church.py:authors"]


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_loads_and_validates(spec):
  config = load_config(spec)
  assert config_schema.validate_config(config) is config


def test_folder_variant_requires_a_folder():
  config = load_config("configs/celeba.py:folder")
  with pytest.raises(ValueError, match="data.image_folder"):
    config_schema.validate_config(config)


def test_celeba_matches_the_paper():
  v = load_config("configs/celeba.py").vqvae
  assert (v.ch, tuple(v.ch_mult), v.num_res_blocks, tuple(v.attn_resolutions)) == (128, (1, 1, 2, 2, 4), 2, (16,))
  assert (v.embed_dim, v.codebook_size, v.beta) == (256, 1024, 0.25)


def test_unknown_config_argument_raises():
  with pytest.raises(ValueError, match="tiny"):
    load_config("configs/mnist.py:huge")


@pytest.mark.parametrize("field,value,words", [
    ("vqvae.norm_groups", 7, "divisor"),
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
])
def test_bad_value_names_the_field(field, value, words):
  config = load_config("configs/mnist.py")
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
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
  out = _main("--config=configs/mnist.py:tiny", f"--workdir={workdir}", "--config.vqvae.norm_groups=7")
  assert out.returncode == 2
  assert "config.vqvae.norm_groups = 7" in out.stderr and "divisor" in out.stderr
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
