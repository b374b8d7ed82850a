"""`parallel.psum` / `parallel.pmean` inside mapped steps: the all-reduce by default; with ordered
reductions an all-gather summed in device order (tests/test_multihost.py shows what that buys: a 2 × 2-device
job equal to a 1 × 4-device process bit for bit)."""
import jax
import numpy as np
import pytest

from vqddm_jax import parallel


@pytest.fixture
def ordered():
  """Switches ordered reductions on for one test, and back off whatever happens."""
  parallel.set_ordered_reductions(True)
  yield
  parallel.set_ordered_reductions(False)


def _mapped():
  """A new mapped function each time: the choice is made at trace time, and pmap caches its traces."""
  return jax.pmap(lambda x, i: (parallel.psum(x), parallel.pmean({"a": x}), parallel.psum(i)),
                  axis_name=parallel.AXIS)


def _values(num_devices):
  rng = np.random.default_rng(0)
  # Magnitudes 1e-3 .. 1e3, so the order of additions shows in the last bits.
  scale = 10.0 ** rng.integers(-3, 4, (num_devices, 6))
  x = (rng.standard_normal((num_devices, 6)) * scale).astype(np.float32)
  return x, rng.integers(-100, 100, (num_devices, 3)).astype(np.int32)


def test_default_reductions_are_the_all_reduce(num_devices):
  x, i = _values(num_devices)
  hlo = _mapped().lower(x, i).as_text()
  assert "all_gather" not in hlo and "all_reduce" in hlo


def test_ordered_reductions_gather_floats_and_agree_with_the_all_reduce(num_devices, ordered):
  x, i = _values(num_devices)
  hlo = _mapped().lower(x, i).as_text()
  assert "all_gather" in hlo
  total, mean, isum = _mapped()(x, i)
  for out in (total, mean["a"], isum):  # every device holds the same values
    assert all(np.array_equal(out[0], out[d]) for d in range(num_devices))
  want = x.astype(np.float64).sum(0)
  np.testing.assert_allclose(total[0], want, rtol=1e-6, atol=1e-3 * np.abs(x).max() * 1e-6)
  np.testing.assert_allclose(mean["a"][0], want / num_devices, rtol=1e-6, atol=1e-9 * np.abs(x).max())
  np.testing.assert_array_equal(isum[0], i.sum(0))  # integers stay exact (and use the all-reduce)
