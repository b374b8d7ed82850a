"""`vqddm_jax.load` on the shared tiny run: the same samples as `--mode=sample`, encoding as the encode stage
did, inpainting that keeps the known codes, and clear refusals of stale work directories and wrong shapes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vqddm_jax
from conftest import ROOT
from vqddm_jax import checkpointing, data
from vqddm_jax import images as images_lib
from vqddm_jax import files as files_lib
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import ConfigError, MismatchError, MissingInputError
from vqddm_jax.workdir import Workdir


@pytest.fixture(scope="module")
def pipe(pipeline_run):
  """The shared tiny run restored from its stored config (a path, as a user passes it)."""
  _, workdir = pipeline_run
  return vqddm_jax.load(str(workdir.root))


@pytest.fixture(scope="module")
def heldout_images(pipeline_run):
  """The first 17 held-out images, u8[17, 32, 32, 1] (17: not a multiple of the 8 devices)."""
  config, _ = pipeline_run
  return images_lib.to_uint8(data.first_images(config.data, config.data.eval_split, 17))


def _mode_sample_outputs(config, workdir):
  """(codes, images) that `--mode=sample` wrote for the fixture's config (all T reverse steps)."""
  step = checkpointing.latest_step(workdir.prior.checkpoints)
  files = workdir.samples(step, config.diffusion.num_steps, num_samples=config.sample.num_samples,
                          seed=config.sample.seed)
  stored = files_lib.read_npz(files.npz)
  return stored["codes"], stored["images"]


def test_load_samples_what_mode_sample_samples(pipeline_run, pipe):
  config, workdir = pipeline_run
  codes, images = _mode_sample_outputs(config, workdir)
  n = config.sample.num_samples
  got_codes = pipe.sample_codes(n, seed=config.sample.seed)
  assert got_codes.dtype == np.int32 and got_codes.shape == codes.shape == (n, 8, 8)
  np.testing.assert_array_equal(got_codes, codes)
  got = pipe.sample(n, seed=np.int64(config.sample.seed))  # A NumPy integer is a seed too.
  assert got.dtype == np.uint8 and got.shape == (n, 32, 32, 1)
  np.testing.assert_array_equal(got, images_lib.to_uint8(images))
  other = pipe.sample_codes(n, seed=config.sample.seed + 1, steps=5)
  assert other.shape == codes.shape and (other != codes).any()
  assert "prior step 4" in repr(pipe) and pipe.image_shape == (32, 32, 1) and pipe.codebook_size == 12


def test_encode_gives_the_stored_code_maps_and_decode_round_trips(pipeline_run, pipe, heldout_images):
  config, workdir = pipeline_run
  stored = codes_lib.load_codes(workdir.code_store, config.data.eval_split)[:len(heldout_images)]
  codes = pipe.encode(heldout_images)
  assert codes.dtype == np.int32 and codes.shape == (17, 8, 8)
  np.testing.assert_array_equal(codes, stored)
  decoded = pipe.decode(codes.astype(np.int64))  # Any integer dtype.
  assert decoded.dtype == np.uint8 and decoded.shape == heldout_images.shape
  again = pipe.encode(decoded)
  # The tiny tokenizer trained 4 + 2 steps: its round trip is far from exact, so shape and dtype only.
  assert again.shape == codes.shape and again.dtype == np.int32


def test_inpaint_keeps_the_known_codes(pipe, heldout_images):
  images = heldout_images[:5]  # Padded to the 8 devices inside, the padding dropped.
  own = pipe.encode(images)
  completed, known = pipe.inpaint_codes(images, "left_half", steps=4)
  assert completed.shape == known.shape == (5, 8, 8) and completed.dtype == np.int32
  assert known[:, :, :4].all() and not known[:, :, 4:].any()
  np.testing.assert_array_equal(completed[known], own[known])
  assert completed.min() >= 0 and completed.max() < pipe.codebook_size
  # A pixel mask (True = known): code row 4 covers pixel rows 16..19, of which only 16 and 17 are known.
  pixels = np.zeros((32, 32), bool)
  pixels[:18] = True
  completed, known = pipe.inpaint_codes(images, pixels, steps=4, seed=7)
  assert known[:, :4].all() and not known[:, 4:].any()
  np.testing.assert_array_equal(completed[known], own[known])
  out = pipe.inpaint(images, pixels, steps=4, seed=7)
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out, pipe.decode(completed))


def test_a_stale_or_foreign_workdir_is_refused(pipeline_run, tmp_path):
  config, workdir = pipeline_run
  copy = Workdir(tmp_path / "w")
  shutil.copytree(workdir.root, copy.root)  # Never the shared run itself.
  rebuild = files_lib.read_json(copy.refit_rebuild)
  files_lib.write_json(copy.refit_rebuild, dict(rebuild, stage1_step=rebuild["stage1_step"] - 2))
  with pytest.raises(MismatchError, match=r"ReFiT under .*/refit was made from vqvae step 2, but .*/vqvae "
                     r"now holds vqvae step 4\. Rerun `python -m vqddm_jax.main --workdir=.*` \(--mode=all\) to be told "
                     r"what to remove"):
    vqddm_jax.load(copy.root)
  files_lib.write_json(copy.refit_rebuild, rebuild)
  other = config.copy_and_resolve_references()
  other.vqvae.ch = 16
  with pytest.raises(MismatchError, match=r"vqvae\.ch: stored 8, now 16"):
    vqddm_jax.load(copy.root, other)
  with pytest.raises(MissingInputError, match="no stored config in .*empty.*pass --config"):
    vqddm_jax.load(tmp_path / "empty")


def test_wrong_shapes_and_values_are_refused(pipe, heldout_images):
  with pytest.raises(MismatchError, match=r"encode: images must be uint8 \[N, 32, 32, 1\].*got float32 "
                     r"\[2, 32, 32, 1\] \(vqddm_jax\.images\.to_uint8 converts"):
    pipe.encode(images_lib.from_uint8(heldout_images[:2]))
  with pytest.raises(MismatchError, match=r"got uint8 \[2, 28, 28, 1\]"):
    pipe.encode(np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(MismatchError,
                     match=r"decode: code maps must be integers \[N, 8, 8\], got int32 \[2, 4, 4\]"):
    pipe.decode(np.zeros((2, 4, 4), np.int32))
  with pytest.raises(MismatchError, match=r"codes must lie in 0 \.\. 11 \(K = 12\), got 0 \.\. 12"):
    pipe.decode(np.pad(np.full((1, 1, 1), 12), ((0, 0), (0, 7), (0, 7))))  # int64, one code too large.
  with pytest.raises(ConfigError, match=r"config\.sample\.steps = 21 is not allowed: an integer in \[0, 20\]"):
    pipe.sample(2, steps=21)
  with pytest.raises(ConfigError, match=r"config\.sample\.temperature = 0\.0 is not allowed"):
    pipe.sample_codes(2, temperature=0.0)
  with pytest.raises(ConfigError, match=r"config\.sample\.num_samples = 0"):
    pipe.sample_codes(0)
  images = heldout_images[:2]
  with pytest.raises(ConfigError, match=r"config\.inpaint\.mask = 'left'"):
    pipe.inpaint(images, "left")
  with pytest.raises(MismatchError, match=r"mask array must be bool \[32, 32\] or \[2, 32, 32\]"):
    pipe.inpaint(images, np.ones((8, 8), bool))
  with pytest.raises(ConfigError, match="leaves every position known"):
    pipe.inpaint(images, np.ones((32, 32), bool))


def test_load_is_inference_only():
  """`vqddm_jax.inference` reaches neither training code nor the stages (nor `main`)."""
  from test_layout import _imports, _module_name, _reachable
  modules = {_module_name(p): p for p in (ROOT / "vqddm_jax").rglob("*.py")}
  graph = {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}
  bad = {m for m in _reachable(graph, "vqddm_jax.inference")
         if m.startswith(("vqddm_jax.training", "vqddm_jax.stages", "vqddm_jax.main"))}
  assert not bad, sorted(bad)


_THREE_DEVICES = """
import sys
import numpy as np
import vqddm_jax
from vqddm_jax import checkpointing, data
from vqddm_jax import images as images_lib
from vqddm_jax.data import codes as codes_lib
pipe = vqddm_jax.load(sys.argv[1])
images = pipe.sample(5, steps=2)
held = images_lib.to_uint8(data.first_images(pipe.config.data, pipe.config.data.eval_split, 5))
stored = codes_lib.load_codes(pipe.workdir.code_store, pipe.config.data.eval_split)[:5]
print(repr(pipe), images.dtype, images.shape, bool((pipe.encode(held) == stored).all()))
"""


def test_load_in_a_fresh_python_on_three_devices(pipeline_run):
  """A user's session: no test flags, three CPU devices (dividing neither 5 nor the run's batches)."""
  _, workdir = pipeline_run
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_NUM_CPU_DEVICES="3", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _THREE_DEVICES, str(workdir.root)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("3 device(s)) uint8 (5, 32, 32, 1) True"), out.stdout
