"""Benchmark: vqddm_jax.kmeans.kmeans against scikit-learn KMeans / MiniBatchKMeans (and faiss-cpu if present).

Prints, per data set, wall time and final inertia of every method and the two target ratios: inertia /
inertia of scikit-learn KMeans (Lloyd, one k-means++ init; target <= 1.01) and time / time of MiniBatchKMeans
(target <= 0.5). All inertias are measured the same way (`kmeans.assign`, exact per-point distances), on the
full data set, and averaged over the timed runs. `kmeans` is timed twice: its first call from cold caches
(compile included) and the best of `--repeats` later calls with other keys (compile excluded). The fast
methods run in interleaved rounds (same load for all) and report the best of `--repeats` runs with different
seeds; scikit-learn KMeans runs once because it is slow. Wall and CPU seconds are both printed: on a shared
machine the CPU seconds of a process pinned to one core (`--threads=1`) are the robust measure (OpenMP thread
teams stall on busy cores).

On a CPU host, `--host_devices=n` (n = cores) shards `kmeans` over n XLA:CPU devices, as it is sharded over
accelerators: one XLA:CPU device keeps a second core only partly busy in this loop-heavy program, while
scikit-learn uses every core through OpenMP.

  python benchmarks/kmeans.py --host_devices=2              # synthetic mixtures, 200,000 x 64, K = 512
  python benchmarks/kmeans.py --threads=1 --presets=fast    # one pinned core, for a busy machine
  python benchmarks/kmeans.py --host_devices=2 --features=workdir/refit/features.npy

scikit-learn and faiss are benchmark-only dependencies (scikit-learn comes with mlxtend).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _pin_threads() -> None:
  """`--threads=n`: pins the process to n cores and sizes every thread pool, before numpy starts BLAS."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=0)
  n = pre.parse_known_args()[0].threads
  if n:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
      os.environ[var] = str(n)


_pin_threads()

import numpy as np  # noqa: E402  (after _pin_threads)


# Settings of vqddm_jax.kmeans.kmeans under test ("default": the function's own defaults).
PRESETS = {
    "fast": dict(init_size=8192, num_iters=50, refine_iters=2),
    "balanced": dict(init_size=65536, num_iters=25, refine_iters=1),
    # k-means|| seeding on 65,536 points (16 greedy trials per centre over the weighted draws), then
    # nested mini-batches, over-relaxed: 6 Lloyd steps on 16,384 points, 3 on 32,768, 2 on 65,536, 3 on all.
    "nested": dict(init="kmeans||", init_size=65536, init_trials=16, num_iters=0,
                   nested=((16384, 6), (32768, 3), (65536, 2)), refine_iters=3, overrelax=1.5),
    "default": dict(),  # init_size 64 K = 32,768, 100 mini-batch steps, up to 10 Lloyd steps
    "accurate": dict(init_size=65536, num_iters=50, refine_iters=10),
}


def _preset_for(preset: dict, num_points: int) -> dict:
  """`preset` for a data set of `num_points`: nested levels are subsamples, so a level of at least all the
  points is dropped (its steps would be full passes, which `refine_iters` already sets)."""
  if "nested" not in preset:
    return preset
  return {**preset, "nested": tuple(level for level in preset["nested"] if level[0] < num_points)}


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--features", action="append", default=[], help=".npy file f32[N, d] (repeatable)")
  p.add_argument("--no-synthetic", dest="synthetic", action="store_false", help="skip the Gaussian mixtures")
  p.add_argument("--num_points", type=int, default=200_000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--num_clusters", type=int, default=512)
  p.add_argument("--repeats", type=int, default=3, help="timed runs of the fast methods (best is reported)")
  p.add_argument("--host_devices", type=int, default=0, help="fake CPU devices for jax (0: jax's default)")
  p.add_argument("--threads", type=int, default=0,
                 help="CPU threads for every method (0: library defaults); 1 makes timings robust on a "
                      "shared machine, where OpenMP thread teams stall when cores are oversubscribed")
  p.add_argument("--skip_kmeans", action="store_true", help="skip scikit-learn KMeans (slow)")
  p.add_argument("--presets", default="fast,nested,default,accurate",
                  help=f"comma-separated settings of kmeans.kmeans to time, from {sorted(PRESETS)}")
  return p.parse_args()


def gaussian_mixture(seed: int, n: int, dim: int, components: int, std: tuple[float, float]) -> np.ndarray:
  """`components` Gaussians with N(0, I) centres and isotropic std drawn from U(std), equal weights."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(components, dim))
  scale = rng.uniform(*std, size=components)
  labels = rng.integers(0, components, n)
  return (centres[labels] + rng.normal(size=(n, dim)) * scale[labels, None]).astype(np.float32)


def _load_features(path: str) -> np.ndarray:
  """f32[N, d] from a .npy of shape [..., d] (e.g. [B, h, w, d] feature maps)."""
  x = np.load(path)
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)


def _timed(fn):
  """(wall s, CPU s) of one call, and its output."""
  t = np.array([time.perf_counter(), time.process_time()])
  out = fn()
  return tuple(np.array([time.perf_counter(), time.process_time()]) - t), out


def bench(name: str, x: np.ndarray, args) -> list[tuple[str, tuple[float, float], float]]:
  """Runs every method on `x`; returns rows (method, best (wall s, CPU s), mean inertia)."""
  import jax
  from sklearn.cluster import KMeans, MiniBatchKMeans
  from vqddm_jax import kmeans as km
  from vqddm_jax.kmeans import fit as km_fit

  k = args.num_clusters
  presets = args.presets.split(",")
  settings = {p: _preset_for(PRESETS[p], x.shape[0]) for p in presets}
  fast = {f"vqddm kmeans [{p}]": (lambda r, kw=settings[p]: km.kmeans(jax.random.key(r + 1), x, k, **kw))
          for p in presets}
  fast["sklearn MiniBatchKMeans"] = (
      lambda r: MiniBatchKMeans(k, n_init=1, random_state=r).fit(x).cluster_centers_)
  try:
    import faiss  # pytype: disable=import-error
  except ImportError:
    print(f"  [{name}] faiss-cpu is not installed: skipped", flush=True)
  else:
    def run_faiss(r):
      model = faiss.Kmeans(x.shape[1], k, niter=20, seed=r + 1)
      model.train(x)
      return model.centroids
    fast["faiss Kmeans (20 iterations)"] = run_faiss

  def inertia(centroids):  # mean over runs: the seed matters as much as the method
    return float(np.mean([km.assign(x, np.asarray(c))[1] for c in centroids]))

  rows = []
  for p in presets:
    jax.clear_caches()  # so that every preset's first call pays its whole compile
    km_fit._fit_fn.cache_clear()  # pylint: disable=protected-access
    sec, c = _timed(lambda p=p: km.kmeans(jax.random.key(0), x, k, **settings[p]))
    rows.append((f"vqddm kmeans [{p}], 1st call (compile)", sec, inertia([c])))
  # Interleaved rounds, so that every method meets the same load on a shared machine.
  times = {m: [] for m in fast}
  outs = {m: [] for m in fast}
  for r in range(args.repeats):
    for method, fn in fast.items():
      sec, c = _timed(lambda fn=fn: fn(r))
      times[method].append(sec)
      outs[method].append(c)
    print(f"  [{name}] round {r + 1} of {args.repeats} done", flush=True)
  for method in fast:
    rows.append((method, tuple(np.min(times[method], axis=0)), inertia(outs[method])))
  if not args.skip_kmeans:
    sec, m = _timed(lambda: KMeans(k, n_init=1, algorithm="lloyd", random_state=0).fit(x))
    rows.append(("sklearn KMeans (lloyd, n_init=1)", sec, inertia([m.cluster_centers_])))
    print(f"  [{name}] KMeans done ({m.n_iter_} iterations)", flush=True)
  return rows


def report(name: str, x: np.ndarray, rows) -> None:
  ref_inertia = dict((r[0], r[2]) for r in rows).get("sklearn KMeans (lloyd, n_init=1)")
  ref_wall, ref_cpu = dict((r[0], r[1]) for r in rows)["sklearn MiniBatchKMeans"]
  load = os.getloadavg()[0]
  print(f"\n{name}: N = {x.shape[0]:,}, d = {x.shape[1]} (load average now {load:.1f})")
  print(f"| {'method':44s} | {'wall s':>7s} | {'CPU s':>7s} | {'inertia':>12s} | {'inertia / KMeans':>16s} |"
        f" {'wall / MiniBatch':>16s} | {'CPU / MiniBatch':>15s} |")
  print(f"|{'-' * 46}|{'-' * 8}:|{'-' * 8}:|{'-' * 13}:|{'-' * 17}:|{'-' * 17}:|{'-' * 16}:|")
  for method, (wall, cpu), e in rows:
    ratio = f"{e / ref_inertia:.4f}" if ref_inertia else "n/a"
    print(f"| {method:44s} | {wall:7.2f} | {cpu:7.2f} | {e:12.6g} | {ratio:>16s} | {wall / ref_wall:16.3f} |"
          f" {cpu / ref_cpu:15.3f} |")
  sys.stdout.flush()


def main():
  args = _args()
  flags = os.environ.get("XLA_FLAGS", "")
  if args.host_devices:
    flags += f" --xla_force_host_platform_device_count={args.host_devices}"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  print(f"jax {jax.__version__}, devices: {jax.devices()}; {os.cpu_count()} CPUs; kmeans presets: "
        + "; ".join(f"{p} {PRESETS[p]}" for p in args.presets.split(",")), flush=True)
  sets = []
  if args.synthetic:
    n, d = args.num_points, args.dim
    comps = 2 * args.num_clusters
    sets.append((f"mixture of {comps} separated Gaussians (std 0.1-0.5)",
                 lambda: gaussian_mixture(0, n, d, comps, (0.1, 0.5))))
    sets.append((f"mixture of {comps} overlapping Gaussians (std 1.0)",
                 lambda: gaussian_mixture(1, n, d, comps, (1.0, 1.0))))
  for path in args.features:
    sets.append((path, lambda path=path: _load_features(path)))
  for name, make in sets:
    x = make()
    report(name, x, bench(name, x, args))


if __name__ == "__main__":
  main()
