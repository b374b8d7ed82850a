"""`parallel.psum` / `parallel.pmean` inside mapped steps: the all-reduce by default; with ordered
reductions an all-gather summed in device order (tests/test_multihost.py shows what that buys: a 2 × 2-device
job equal to a 1 × 4-device process bit for bit). Also the one `pmap` wrapper, the host shares
(`host_slice`) and the cross-process gather and sum on one process (two processes:
tests/test_multihost_metrics.py)."""
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


# ------------------------------------------------------------------------------------ the one pmap wrapper


def test_pmap_broadcasts_the_step_key_and_donates_only_when_asked(num_devices):
  def step(state, batch, key):
    return state + batch.sum() + jax.random.uniform(key), jax.lax.axis_index(parallel.AXIS)

  key = jax.random.key(0)
  for donate in (False, True):
    state = parallel.replicate(np.zeros((3,), np.float32))
    new, index = parallel.pmap(step, in_axes=parallel.STEP_AXES, donate_state=donate)(
        state, parallel.shard(np.ones((num_devices * 2,), np.float32)), key)
    assert state.is_deleted() == donate
    # One key for every device: each adds the same draw.
    np.testing.assert_array_equal(np.asarray(new), np.broadcast_to(np.asarray(new)[0], new.shape))
    np.testing.assert_array_equal(np.asarray(index), np.arange(num_devices))
  one = parallel.pmap(lambda x, y: x * y, devices=jax.devices()[:1])(np.ones((1, 2)), np.full((1, 2), 3.0))
  assert one.shape == (1, 2) and len(one.sharding.device_set) == 1


# ------------------------------------------------------------------------------------------ host shares


def _shares(total, count, remainder):
  return [parallel.host_slice(total, process_index=p, process_count=count, remainder=remainder)
          for p in range(count)]


@pytest.mark.parametrize("remainder", parallel.HOST_REMAINDERS)
def test_host_shares_tile_the_set_in_order(remainder):
  for count in (1, 2, 3, 4, 7):
    for total in (0, 1, 5, 11, 12, 37, 100):
      shares = _shares(total, count, remainder)
      assert shares[0].start == 0 and shares[-1].stop == total, (total, count, shares)
      assert all(a.stop == b.start for a, b in zip(shares, shares[1:])), (total, count, shares)
      assert all(s.start <= s.stop for s in shares), (total, count, shares)


def test_host_shares_are_what_each_caller_cut_before():
  """The three ways the code cut shares, written out as before the one helper: the shares stay the same."""
  for count in (1, 2, 3, 4, 7):
    for total in (0, 1, 5, 11, 12, 37, 100):
      spread = [slice(p * total // count, (p + 1) * total // count) for p in range(count)]
      base, extra = divmod(total, count)
      first = [slice(p * base + min(p, extra), p * base + min(p, extra) + base + (p < extra))
               for p in range(count)]
      block = -(-total // count)
      items = np.arange(total)
      assert _shares(total, count, "spread") == spread
      assert _shares(total, count, "first") == first
      got = [items[s] for s in _shares(total, count, "blocks")]
      assert all(np.array_equal(g, items[p * block:(p + 1) * block]) for p, g in enumerate(got))
      if total % count == 0:  # equal shares (the inpainting's maps): every rule agrees
        equal = [slice(p * (total // count), (p + 1) * (total // count)) for p in range(count)]
        assert all(_shares(total, count, r) == equal for r in parallel.HOST_REMAINDERS)


def test_host_slice_defaults_to_this_process_and_rejects_bad_input():
  assert parallel.host_slice(10) == slice(0, 10)  # one process here
  assert parallel.this_host() == (0, 1)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    parallel.host_slice(10, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="remainder='last' is not one of"):
    parallel.host_slice(10, remainder="last")


# ------------------------------------------------------------------------- across processes, one process


def test_on_one_process_gather_and_sum_keep_every_bit_and_dtype():
  tree = {"loss": 1 + 1e-12, "hist": np.array([1e300, np.pi, -1 / 3]), "count": np.int64(2**40 + 1)}
  total = parallel.sum_over_processes(tree)
  assert all(v.dtype == np.float64 for v in total.values())
  assert total["loss"] == np.float64(1 + 1e-12) and total["count"] == np.float64(2**40 + 1)
  np.testing.assert_array_equal(total["hist"], tree["hist"])
  wide = np.array([[2**40 + 1, -2**62]], np.int64)
  gathered = parallel.gather_processes(wide)
  assert gathered.dtype == np.int64 and gathered.shape == (1, 1, 2)
  np.testing.assert_array_equal(gathered[0], wide)
