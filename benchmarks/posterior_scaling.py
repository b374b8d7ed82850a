"""Time and memory of the diffusion posterior + KL (the stage-2 loss term) as K grows.

    python benchmarks/posterior_scaling.py [--ks 256,1024,4096,16384] [--batch 8] [--size 16]

For each K it jits `loss_t` (model posterior, true posterior, KL and decoder NLL, i.e. everything per step of
training except the network) on B × size × size codes; "generic" is the same KL composed from two full
`log_posterior` tensors and `categorical_kl`; with --grad, the value and gradient of `loss_t` with respect to
the network output (log_softmax included). Time: median wall time and median process CPU time (all threads) of
repeated calls after a warm-up call; on a shared machine the CPU time is the steadier measure of cost.
Memory: XLA's own accounting of the compiled executable (`compiled.memory_analysis()`: arguments + outputs +
temporaries − aliased bytes), i.e. the peak live memory the program needs on the device. Cost should grow
linearly in K: no K×K array exists, so the ratio time(16384)/time(1024) should be about 16 (≤ 24 required).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqddm_jax import diffusion


def _peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def _time(compiled, arg_sets, min_seconds: float, max_repeats: int):
  """(median wall seconds, median process CPU seconds) per call, cycling through `arg_sets`.

  CPU time (all threads) is the steadier measure on a shared machine.
  """
  jax.block_until_ready(compiled(*arg_sets[0]))   # warm-up
  walls, cpus = [], []
  start = time.perf_counter()
  while len(walls) < max_repeats and (len(walls) < 3 or time.perf_counter() - start < min_seconds):
    args = arg_sets[len(walls) % len(arg_sets)]
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return statistics.median(walls), statistics.median(cpus)


def bench(k: int, batch: int, size: int, big_t: int, grad: bool, min_seconds: float, max_repeats: int,
          cold_bytes: int):
  """Returns {name: ((wall, CPU) hot, (wall, CPU) cold, peak bytes)} for one K.

  "hot" repeats one input (which stays in the CPU caches when it is small); "cold" cycles through enough
  copies of the K-sized input (>= cold_bytes in all) that every call reads it from main memory, as for
  large K.
  """
  sched = diffusion.make_schedule(big_t, "cosine", num_classes=k)
  rng = np.random.default_rng(k)
  z0 = jnp.asarray(rng.integers(0, k, (batch, size, size)), jnp.int32)
  t = jnp.asarray(rng.integers(1, big_t + 1, batch), jnp.int32)
  z_t = diffusion.q_sample(jax.random.PRNGKey(0), z0, t, sched)
  net_out = jnp.asarray(rng.normal(size=(batch, size, size, k)), jnp.float32)
  log_x0 = jax.nn.log_softmax(net_out, axis=-1)

  def loss_fn(log_x0, z0, z_t, t):
    return diffusion.loss_t(log_x0, z0, z_t, t, sched)

  def value_and_grad_fn(net_out, z0, z_t, t):
    def total(out):
      lx = jax.nn.log_softmax(diffusion.x0_logits(out, z_t, "residual"), axis=-1)
      return jnp.sum(diffusion.loss_t(lx, z0, z_t, t, sched))
    return jax.value_and_grad(total)(net_out)

  def generic_fn(log_x0, z0, z_t, t):
    # The same KL composed from the public building blocks: two full posteriors, then categorical_kl.
    log_p = diffusion.log_posterior(log_x0, z_t, t, sched)
    log_q = diffusion.log_posterior(diffusion.log_one_hot(z0, k), z_t, t, sched)
    return jnp.sum(diffusion.categorical_kl(log_q, log_p), axis=(1, 2))

  results = {}
  cases = [("posterior+KL", loss_fn, (log_x0, z0, z_t, t)),
           ("generic", generic_fn, (log_x0, z0, z_t, t))]
  if grad:
    cases.append(("value+grad", value_and_grad_fn, (net_out, z0, z_t, t)))
  for name, fn, args in cases:
    compiled = jax.jit(fn).lower(*args).compile()
    copies = max(1, -(-cold_bytes // args[0].nbytes))
    cold_sets = [(jax.device_put(np.array(args[0])),) + tuple(args[1:]) for _ in range(copies)]
    results[name] = (_time(compiled, [args], min_seconds, max_repeats),
                     _time(compiled, cold_sets, min_seconds, max_repeats), _peak_bytes(compiled))
    del cold_sets
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ks", default="256,1024,4096,16384")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--num_steps", type=int, default=4000)
  parser.add_argument("--grad", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--min_seconds", type=float, default=2.0)
  parser.add_argument("--max_repeats", type=int, default=50)
  parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                      help="also time K=1024 with 16x the batch (as many elements as K=16384)")
  parser.add_argument("--cold_mib", type=float, default=96.0,
                      help="total size of the input copies cycled through in the cold runs (> the L3 cache)")
  args = parser.parse_args()
  ks = [int(x) for x in args.ks.split(",")]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"B={args.batch}, {args.size}x{args.size} codes, T={args.num_steps}")
  print(f"{'K':>6} {'case':>13} {'hot wall ms':>12} {'hot CPU ms':>11} {'cold wall ms':>13} "
        f"{'cold CPU ms':>12} {'peak MiB':>9} {'bytes/(B·h·w·K)':>16}")
  table = {}
  for k in ks:
    results = bench(k, args.batch, args.size, args.num_steps, args.grad, args.min_seconds,
                    args.max_repeats, int(args.cold_mib * 2**20))
    for name, (hot, cold, peak) in results.items():
      table[(k, name)] = hot + cold
      elements = args.batch * args.size * args.size * k
      print(f"{k:>6} {name:>13} {hot[0] * 1e3:>12.2f} {hot[1] * 1e3:>11.2f} {cold[0] * 1e3:>13.2f} "
            f"{cold[1] * 1e3:>12.2f} {peak / 2**20:>9.1f} {peak / elements:>16.1f}", flush=True)
  if 1024 in ks and 16384 in ks:
    print("time(16384)/time(1024) (linear: 16; required <= 24):")
    for name in sorted({n for _, n in table}):
      ratios = [b / a for a, b in zip(table[(1024, name)], table[(16384, name)])]
      print(f"  {name:>13}: hot wall {ratios[0]:.2f}, hot CPU {ratios[1]:.2f}, "
            f"cold wall {ratios[2]:.2f}, cold CPU {ratios[3]:.2f}")
    if args.control:
      # Same number of elements as K = 16384: if the time matches, the cost depends on B·h·w·K alone and any
      # excess of the ratio above 16 comes from the small problem fitting the CPU caches.
      big_batch = args.batch * 16
      print(f"control: K=1024 with B={big_batch} (as many elements as K=16384, B={args.batch}):")
      results = bench(1024, big_batch, args.size, args.num_steps, args.grad, args.min_seconds,
                      args.max_repeats, int(args.cold_mib * 2**20))
      for name, (hot, cold, peak) in results.items():
        ratios = [b / a for a, b in zip(hot + cold, table[(16384, name)])]
        print(f"  {name:>13}: hot CPU {hot[1] * 1e3:.2f} ms, cold CPU {cold[1] * 1e3:.2f} ms; "
              f"time(16384, B={args.batch}) / this: hot CPU {ratios[1]:.2f}, cold CPU {ratios[3]:.2f}")


if __name__ == "__main__":
  main()
