"""Tests of the k-means package (vqddm_jax/kmeans/): recovery, device-count independence, re-seeding, errors.

Every fit uses the same shapes (N = 1,003 points in 3-D, K = 7, batch 64, chunks of 16 rows) so that the
tests share compiled programs; N is not a multiple of 8 or of the batch, which exercises the padding.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from vqddm_jax import kmeans
from vqddm_jax.kmeans import distances, seeding, sharding

N, DIM, K = 1003, 3, 7
FIT = dict(batch_size=64, chunk_size=16)


def _blobs(spread: float, seed: int):
  """K Gaussian blobs of unit std, centres about `spread` apart: (f32[N, DIM], true labels i32[N])."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(K, DIM)) * spread
  labels = np.sort(np.arange(N) % K)
  return (centres[labels] + rng.normal(size=(N, DIM))).astype(np.float32), labels


def _brute_force(x, c):
  d = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
  return d.argmin(1), d.min(1).sum()


def _same_partition(a, b) -> bool:
  """True when labelings `a` and `b` are equal up to a permutation of the label values."""
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def separated():
  return _blobs(spread=40.0, seed=0)


@pytest.fixture(scope="module")
def overlapping():
  return _blobs(spread=3.0, seed=1)[0]


@pytest.mark.parametrize("init", ["kmeans++", "kmeans||", "afkmc2"])
def test_separated_blobs_are_recovered_exactly(separated, init):
  x, truth = separated
  c = kmeans.kmeans(jax.random.key(0), x, K, init=init, num_iters=20, refine_iters=5, chain_length=50, **FIT)
  labels, inertia = kmeans.assign(x, c, chunk_size=16)
  assert _same_partition(labels, truth)
  means = np.stack([x[truth == k].mean(0) for k in range(K)])
  order = [labels[truth == k][0] for k in range(K)]
  np.testing.assert_allclose(c[order], means, atol=1e-3)
  assert inertia == pytest.approx(_brute_force(x, c)[1], rel=1e-5)


def test_nested_levels_recover_separated_blobs(separated):
  x, truth = separated
  c = kmeans.kmeans(jax.random.key(0), x, K, num_iters=0, nested=((128, 5), (512, 3)), refine_iters=2,
                   overrelax=1.5, **FIT)
  labels, _ = kmeans.assign(x, c, chunk_size=16)
  assert _same_partition(labels, truth)


def test_a_nested_level_over_all_points_is_full_batch_lloyd(overlapping):
  kw = dict(num_iters=5, overrelax=1.3, **FIT)
  full = kmeans.kmeans(jax.random.key(2), overlapping, K, refine_iters=3, tol=0.0, **kw)
  nested = kmeans.kmeans(jax.random.key(2), overlapping, K, nested=((N, 3),), refine_iters=0, tol=0.0, **kw)
  np.testing.assert_array_equal(full, nested)
  # A prefix of a few mini-batches sees fewer points, and ends elsewhere.
  part = kmeans.kmeans(jax.random.key(2), overlapping, K, nested=((128, 3),), refine_iters=0, tol=0.0, **kw)
  assert not np.allclose(part, full)


def test_argmin_columns_is_argmin_with_first_index_on_ties():
  s = np.random.default_rng(0).integers(0, 4, size=(9, 64)).astype(np.float32)  # many ties
  np.testing.assert_array_equal(distances.argmin_columns(s), np.argmin(s, axis=0))


def test_rows_are_dealt_round_robin_so_a_mini_batch_is_contiguous_on_every_shard(num_devices):
  assert sharding.num_shards() == num_devices and sharding.num_shards(jax.devices()[:3]) == 3
  rows = np.arange(32).reshape(16, 2)
  dealt = sharding.shard_strided(rows, 4)  # row i -> shard i % 4, local row i // 4
  assert dealt.shape == (4, 4, 2)
  np.testing.assert_array_equal(dealt[:, :, 0] // 2, [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14],
                                                      [3, 7, 11, 15]])
  # Mini-batch 1 of 8 rows (rows 8..15) is local rows 2..3 of every shard.
  np.testing.assert_array_equal(np.sort(dealt[:, 2:4].reshape(-1, 2), axis=0), rows[8:16])
  with pytest.raises(ValueError, match="not divisible by 5 shards"):
    sharding.shard_strided(rows, 5)


@pytest.mark.parametrize("schedule", ["minibatch_lloyd", "nested_overrelaxed"])
def test_same_centroids_on_8_devices_and_on_1(overlapping, num_devices, schedule):
  # reseed_ratio 0.3 makes the mini-batch phase re-seed clusters, so that path is compared too.
  kw = dict(num_iters=37, refine_iters=4, reseed_ratio=0.3, **FIT)
  if schedule == "nested_overrelaxed":
    kw.update(nested=((200, 3), (600, 2)), overrelax=1.5, init="kmeans||")
  key = jax.random.key(3)
  c8 = kmeans.kmeans(key, overlapping, K, **kw)
  c1 = kmeans.kmeans(key, overlapping, K, devices=jax.local_devices()[:1], **kw)
  np.testing.assert_allclose(c8, c1, rtol=1e-5, atol=1e-5)
  l8, e8 = kmeans.assign(overlapping, c8, chunk_size=16)
  l1, e1 = kmeans.assign(overlapping, c8, chunk_size=16, devices=jax.local_devices()[:1])
  np.testing.assert_array_equal(l8, l1)
  assert e8 == pytest.approx(e1, rel=1e-6)


def test_deterministic_for_a_key(overlapping):
  kw = dict(num_iters=37, refine_iters=4, reseed_ratio=0.3, **FIT)
  a = kmeans.kmeans(jax.random.key(3), overlapping, K, **kw)
  b = kmeans.kmeans(jax.random.key(3), overlapping, K, **kw)
  c = kmeans.kmeans(jax.random.key(4), overlapping, K, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("num_iters,refine_iters", [(30, 0), (0, 6)], ids=["minibatch", "lloyd"])
@pytest.mark.parametrize("start", ["duplicates", "far_away"])
def test_dead_clusters_are_reseeded(overlapping, num_iters, refine_iters, start):
  if start == "duplicates":  # every centre on one point: all but one cluster start empty
    init = np.repeat(overlapping[:1], K, axis=0)
  else:  # one sensible centre, the others far outside the data
    init = np.concatenate([overlapping[:1], 1e3 * np.ones((K - 1, DIM), np.float32)
                           + np.arange(K - 1, dtype=np.float32)[:, None]])
  c = kmeans.kmeans(jax.random.key(0), overlapping, K, init=init, num_iters=num_iters,
                   refine_iters=refine_iters, **FIT)
  labels, _ = kmeans.assign(overlapping, c, chunk_size=16)
  assert np.bincount(labels, minlength=K).min() > 0
  assert np.abs(c).max() < 100.0


def test_assign_matches_brute_force(overlapping):
  c = overlapping[::150][:K] + 0.5
  labels, inertia = kmeans.assign(overlapping, c, chunk_size=16)
  want_labels, want_inertia = _brute_force(overlapping, c)
  np.testing.assert_array_equal(labels, want_labels)
  assert labels.dtype == np.int32 and labels.shape == (N,)
  assert inertia == pytest.approx(want_inertia, rel=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "kmeans||", "afkmc2"])
def test_seeds_are_distinct_data_points(overlapping, init):
  c = kmeans.kmeans(jax.random.key(5), overlapping, K, init=init, num_iters=0, refine_iters=0,
                   chain_length=50, **FIT)
  dist = ((c[:, None, :] - overlapping[None, :, :]) ** 2).sum(-1).min(1)
  np.testing.assert_allclose(dist, 0.0, atol=1e-8)
  assert len({tuple(r) for r in np.round(c, 4)}) == K


def test_as_many_clusters_as_points():
  x = np.random.default_rng(0).normal(size=(12, DIM)).astype(np.float32)
  c = kmeans.kmeans(jax.random.key(0), x, len(x), num_iters=0, refine_iters=2)
  assert sorted(map(tuple, np.round(c, 4))) == sorted(map(tuple, np.round(x, 4)))


@pytest.mark.parametrize("k", [0, -1, N + 1, 2.0])
def test_bad_num_clusters_raises(overlapping, k):
  with pytest.raises(ValueError, match=rf"num_clusters=.* must be an integer in \[1, {N}\]"):
    kmeans.kmeans(jax.random.key(0), overlapping, k)


def test_bad_arguments_raise(overlapping):
  key = jax.random.key(0)
  for kwargs, match in [(dict(init="random"), "init="), (dict(batch_size=0), "batch_size="),
                        (dict(init=np.zeros((3, 3))), "init centroids"),
                        (dict(init_size=2), "init_size="), (dict(nested=((0, 2),)), r"nested\[0\]="),
                        (dict(nested=((64,),)), r"nested\[0\]="), (dict(nested=((64, 1),) * 17), "levels"),
                        (dict(overrelax=2.0), "overrelax="), (dict(overrelax=0.0), "overrelax="),
                        (dict(init="kmeans||", init_rounds=0), "init_rounds="),
                        (dict(init="kmeans||", init_oversample=0), "init_oversample="),
                        (dict(init="kmeans||", init_rounds=1, init_oversample=2), "fewer than num_clusters")]:
    with pytest.raises(ValueError, match=match):
      kmeans.kmeans(key, overlapping, 4, **kwargs)
  with pytest.raises(ValueError, match="centroids"):
    kmeans.assign(overlapping, np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match="features"):
    kmeans.kmeans(key, np.zeros((5,), np.float32), 1)


def test_proportional_sampling_follows_the_weights():
  w = np.array([0, 1, 2, 0, 5, 0, 0, 3, 1, 0, 4], np.float32)  # n = 11: the last block is padded
  u = jax.random.uniform(jax.random.key(0), (40_000,))
  idx = np.asarray(jax.jit(seeding.sample_proportional)(u, w))
  freq = np.bincount(idx, minlength=w.size) / idx.size
  assert freq[w == 0].sum() == 0
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.01)


def test_kmeans_parallel_candidates_weigh_the_points_nearest_to_them(overlapping):
  x = overlapping - overlapping.mean(0)
  cand, w = seeding.oversample_candidates(jax.random.key(0), x, rounds=3, oversample=5, chunk=16)
  cand, w = np.asarray(cand), np.asarray(w)
  assert cand.shape == (16, DIM) and w.shape == (16,)
  d = ((x[:, None, :].astype(np.float64) - cand[None].astype(np.float64)) ** 2).sum(-1)
  # Exact ties (a candidate drawn twice) go to the first copy, as np.argmin does.
  np.testing.assert_array_equal(w, np.bincount(d.argmin(1), minlength=len(cand)))
  assert w.sum() == len(x)


def test_weighted_kmeanspp_never_picks_a_point_of_weight_zero(overlapping):
  weights = np.zeros(N, np.float32)
  weights[::3] = 1.0 + np.arange(len(weights[::3])) % 4
  c = np.asarray(seeding.kmeanspp(jax.random.key(1), overlapping, weights, num_clusters=K, trials=3))
  picked = ((c[:, None, :] - overlapping[None]) ** 2).sum(-1).argmin(1)
  assert (weights[picked] > 0).all() and len(set(picked.tolist())) == K
