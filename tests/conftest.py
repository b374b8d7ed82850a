"""Test set-up: 8 fake CPU devices, forced before jax is imported anywhere."""
import os

# Tests are compile-bound (tiny shapes, few steps): a cheaper XLA:CPU backend pipeline cuts the suite's CPU
# time by about a quarter; results are compared within one process, so the optimisation level cannot matter.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402  (must follow the flag above)
import pytest  # noqa: E402

# Stages rebuild their jitted steps on every call (resume tests run a stage twice, sampling tests sample
# several times): a persistent compilation cache for the session turns those repeats into cache hits, about a
# quarter less time on the resume tests. It is off by default since a SIGSEGV while loading a cached
# executable (2026-12-06), which turned out to be the memory-map limit `_release_compiled_programs` now keeps
# the suite under, not the cache; VQDDM_TEST_COMPILE_CACHE=1 turns it on for a faster local run.
if os.environ.get("VQDDM_TEST_COMPILE_CACHE", "0") == "1":
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="vqddm_jax_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Each XLA:CPU executable keeps memory maps of its
  code, and stages build new jitted steps on every call: kept for the whole session they grew the process
  past vm.max_map_count (65,530) late in the suite, and LLVM crashed (SIGSEGV) compiling the next program."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.local_device_count() == 8, jax.devices()
  return jax.local_device_count()

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(spec: str):
  """Loads `configs/NAME.py[:arg]` the way `--config=` does (without command-line overrides)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_cfg", ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.fixture
def tiny_config(tmp_path):
  """configs/mnist.py:tiny with its data under this test's tmp dir (MNIST-5k is built once per session)."""
  config = load_config("configs/mnist.py:tiny")
  config.data.data_dir = str(_session_data_dir())
  return config


_DATA_DIR = None


def _session_data_dir():
  global _DATA_DIR
  if _DATA_DIR is None:
    import tempfile
    _DATA_DIR = pathlib.Path(tempfile.mkdtemp(prefix="vqddm_tfds_"))
  return _DATA_DIR


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
  """The whole pipeline (stage 1 → ReFiT → encode → stage 2 → sample → evaluate) once on configs/mnist.py:tiny
  (whose AR prior is off: `train_ar` skips; tests/test_compare.py adds it to a copy).

  Shared by the tests that check each stage's outputs, so the suite compiles and trains each stage once.
  Returns (config, workdir: vqddm_jax.workdir.Workdir).
  """
  from vqddm_jax import run_config, stages
  from vqddm_jax.workdir import Workdir
  config = load_config("configs/mnist.py:tiny")
  config.data.data_dir = str(_session_data_dir())
  workdir = Workdir(tmp_path_factory.mktemp("pipeline"))
  run_config.check_or_record(config, workdir, code_version="test", write=True)  # As `main` does first.
  for stage in stages.PIPELINE:
    result = stages.run_stage(stage, config, workdir)
    assert result.completed and result.skipped == (stage.name == "train_ar"), stage.name
  return config, workdir


def sigterm_training_at(monkeypatch, step: int):
  """Patches `training.loop.run` so that this process gets SIGTERM after training step `step` (the way a
  preempted host does); returns the real `loop.run`, to patch back before resuming."""
  import signal
  from vqddm_jax.training import loop
  real_run = loop.run

  def run_with_sigterm(spec, **kwargs):
    kill = lambda s, _: s == step and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    kwargs["periodic"] = list(kwargs.get("periodic", ())) + [(1, kill)]
    return real_run(spec, **kwargs)
  monkeypatch.setattr(loop, "run", run_with_sigterm)
  return real_run
