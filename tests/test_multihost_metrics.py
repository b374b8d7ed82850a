"""The cross-process merges in a real two-process job (gloo over 127.0.0.1, one CPU device each): a streamed
image set split between the processes, and FID reference statistics of a folder's training split read by
both, give every process the same numbers as one process over everything; float64 sums (the held-out figures)
and int64 values come back exact. One job serves every test here. Children get an explicit environment and
are ended by process id, with a timeout, whatever happens."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import multihost_metrics_child as child
from conftest import ROOT
from test_multihost import _free_port, _wait
from test_reference_stats import _rgb_folder
from vqddm_jax.evaluation import reference_stats, streamed

TIMEOUT = 180


def _run_pair(folder, out_dir, tmp_path) -> list[dict[str, np.ndarray]]:
  env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_collective_timeout_seconds=60"}
  port, logs, procs = _free_port(), [tmp_path / f"child{i}.txt" for i in range(2)], []
  try:
    for i in range(2):
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multihost_metrics_child.py"), str(i), str(port),
             str(folder), str(out_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
  finally:
    codes = _wait(procs, [], timeout=TIMEOUT)  # also when starting the second failed: ends the first
  assert codes == [0, 0], "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
  return [dict(np.load(out_dir / f"{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(what each of the two processes wrote, the image folder)."""
  tmp_path = tmp_path_factory.mktemp("multihost_metrics")
  folder, out_dir = tmp_path / "images", tmp_path / "out"
  _rgb_folder(folder, train=11, test=2, size=16)  # 11 images: the hosts' shares differ in size.
  out_dir.mkdir()
  return _run_pair(folder, out_dir, tmp_path), folder


def test_two_processes_merge_streamed_sets_and_reference_stats_as_one_process(pair):
  results, folder = pair
  # The shares tile the set in order.
  assert [(int(r["lo"]), int(r["hi"])) for r in results] == [(0, 18), (18, child.SET_SIZE)]
  # Every process holds the same merged numbers, bit for bit.
  for key in results[0]:
    if key not in ("lo", "hi"):
      np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
  got = results[0]
  # One process over everything (the chunks cross the hosts' boundary here).
  net, images = child.toy_net(), child.image_set()
  one = streamed.stream(net, ((s, images[s:s + 4]) for s in range(0, child.SET_SIZE, 4)), child.SET_SIZE,
                        keep=child.KEEP)
  assert int(got["count"]) == one.moments.count == child.SET_SIZE
  np.testing.assert_allclose(got["mean"], one.moments.mean, rtol=1e-13)
  np.testing.assert_allclose(got["scatter"], one.moments.scatter, rtol=1e-12, atol=1e-12)
  # The kept rows are the set's first KEEP, in set order, though they came from both processes.
  np.testing.assert_array_equal(got["kept"], net.features(images[:child.KEEP]))
  np.testing.assert_array_equal(got["is_counts"], one.scores.counts)
  np.testing.assert_allclose(got["prob_sums"], one.scores.prob_sums, rtol=1e-13)
  np.testing.assert_allclose(got["neg_entropy_sums"], one.scores.neg_entropy_sums, rtol=1e-12, atol=1e-15)
  # Reference statistics: each of the 11 training images counted once over the two hosts' shares.
  ref = reference_stats.compute(child.folder_config(str(folder)).data, net, batch_size=3)
  assert int(got["ref_count"]) == ref.count == 11
  np.testing.assert_allclose(got["ref_mu"], ref.mu, rtol=1e-13)
  np.testing.assert_allclose(got["ref_sigma"], ref.sigma, rtol=1e-11, atol=1e-13)


def test_float64_sums_and_int64_values_cross_processes_exactly(pair):
  results, _ = pair
  for got in results:  # on both processes: the float64 sum in process order, not float32's rounding of it
    want = {k: np.add(child.wide_values(0)[k], child.wide_values(1)[k]) for k in ("loss", "sums")}
    assert got["wide_loss"].dtype == np.float64 and got["wide_loss"] == 1 + 1e-12 == want["loss"]
    np.testing.assert_array_equal(got["wide_sums"], want["sums"])
    assert np.isfinite(got["wide_sums"]).all()  # 2e300: float32 would make it inf
    assert got["wide_ints"].dtype == np.int64
    np.testing.assert_array_equal(got["wide_ints"], [child.wide_ints(0), child.wide_ints(1)])
