"""Jitted k-means over feature vectors sharded across devices (ReFiT's codebook rebuild).

Public API:
  kmeans(key, features, num_clusters, **options) -> centroids f32[K, d]   (fit.py)
  assign(features, centroids) -> (labels i32[N], inertia)                  (assign.py)
  INITS: the seedings `kmeans` offers by name                              (seeding.py)
Modules: `fit` (mini-batch, nested mini-batch and Lloyd steps), `assign`, `seeding` (greedy k-means++, k-means||,
AFK-MC²), `distances` (chunked nearest-centroid search).
"""
from vqddm_jax.kmeans.assign import assign
from vqddm_jax.kmeans.fit import check_num_clusters, default_chunk_size, kmeans
from vqddm_jax.kmeans.seeding import INITS

__all__ = ["INITS", "assign", "check_num_clusters", "default_chunk_size", "kmeans"]
