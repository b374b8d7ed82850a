"""Step times of the prior (train step, one reverse step) and of stage 1, with FLOPs, FLOP/s and MFU.

    python benchmarks/step_time.py --preset=celeba          # the paper's 117 M denoiser, K 512, 16x16, batch 8
    python benchmarks/step_time.py --preset=mnist           # ch 64, mults 1,2,4, K 512, 8x8, batch 32
    python benchmarks/step_time.py --ch=128 --mults=1,2,4,8 --k=512 --hw=16 --batch=8 --T=4000 [--dtype=bfloat16]
    python benchmarks/step_time.py --preset=celeba --sampling   # + samples/s at T and T/10 steps
    python benchmarks/step_time.py --stage1=mnist,f16          # stage-1 train steps
    python benchmarks/step_time.py --preset=celeba --peak_flops=989e12   # MFU on an H200 (bf16 dense)

Prints `name=value` lines: `prior_train_step_s`, `prior_sample_step_s` (one reverse step of the whole batch),
`vqvae_train_step_s[...]`, each with the step's FLOPs from XLA's `cost_analysis` (per device), the achieved
FLOP/s and, with `--peak_flops` (per device), the MFU; then the ratio to the authors' PyTorch figures measured
on a 2-core CPU (presets only). Times: compile excluded, `--warmup` untimed calls first, then the median of
`--repeats` calls with `block_until_ready`. The steps are the project's own (`training.prior_step.train_step`,
`generation`'s reverse chunk, `training.vqvae_step.train_step`), pmapped over `--devices` local devices (the
global batch split over them, as the main command does); on a CPU host `--host_devices=n` makes n XLA
devices of its cores.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

# The authors' PyTorch (their Unet + DiscreteDiffusion, Adam, float32) on a 2-core CPU, seconds per train step
# and per reverse step of the batch; targets are 0.8x these.
AUTHORS = {"celeba": (1.89, 0.37), "mnist": (0.19, 0.075)}
PRESETS = {
    "celeba": dict(ch=128, mults="1,2,4,8", k=512, hw=16, batch=8, T=4000, res_blocks=2),
    "mnist": dict(ch=64, mults="1,2,4", k=512, hw=8, batch=32, T=4000, res_blocks=2),
}
# Untimed calls before timing: the first few calls after compiling run up to 2x slower on XLA:CPU.
WARMUP_CALLS = 3

STAGE1 = {  # (config sizes, image size, channels, batch)
    "mnist": (dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                   embed_dim=32, codebook_size=256, groups=8), 32, 1, 16),
    "f16": (dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                 embed_dim=256, codebook_size=1024, groups=32), 256, 3, 2),
}


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default=None)
  for name, kind in (("ch", int), ("mults", str), ("k", int), ("hw", int), ("batch", int), ("T", int),
                     ("res_blocks", int)):
    p.add_argument(f"--{name}", type=kind, default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--no_prior", action="store_true", help="skip the prior")
  p.add_argument("--sampling", action="store_true", help="also samples/s at T and T/10 steps (chunked)")
  p.add_argument("--chunk_steps", type=int, default=200, help="reverse steps per compiled sampler call")
  p.add_argument("--sample_time_steps", type=int, default=400,
                 help="reverse steps timed per chain with --sampling (the rest extrapolated)")
  p.add_argument("--full_chain", action="store_true", help="time whole sampling chains")
  p.add_argument("--stage1", default="", help="comma-separated stage-1 configs to time: mnist, f16")
  p.add_argument("--devices", type=int, default=0, help="local devices to map over (0 = all)")
  p.add_argument("--host_devices", type=int, default=0, help="XLA CPU devices to make (0 = JAX's default)")
  # One call in ten can be 2x slower on a busy 2-core host: a median of 5 after one warm-up call once read
  # 0.225 s where 30 read 0.116 s.
  p.add_argument("--warmup", type=int, default=WARMUP_CALLS, help="untimed calls before timing (at least 1)")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s of one device, for MFU")
  args = p.parse_args(argv)
  base = dict(PRESETS[args.preset or "mnist"])
  for key in base:
    if getattr(args, key) is None:
      setattr(args, key, base[key])
  return args


def _on_devices(tree, devices, replicate: bool):
  """Puts `[n, ...]` host arrays (or, with `replicate`, copies of each leaf) on `devices`, one slice each."""
  import jax
  import numpy as np
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)),
                                        jax.sharding.PartitionSpec("d"))
  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape) if replicate else x, sharding)
  return jax.tree_util.tree_map(put, tree)


def _timed(fn, repeats: int, warmup: int = WARMUP_CALLS) -> float:
  import jax
  for _ in range(max(1, warmup)):  # the program is compiled already; these settle allocator and threads
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _compiled(p_fn, *args):
  """(the compiled program, its per-device FLOPs from XLA's cost analysis or None): one compilation serves
  both the timing and the count."""
  compiled = p_fn.lower(*args).compile()
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return compiled, (float(cost["flops"]) if cost and "flops" in cost else None)


def _hlo_text(compiled) -> str:
  """The optimised HLO of a compiled program, for `benchmarks/profile_step.py` (empty if unavailable)."""
  try:
    return compiled.as_text() or ""
  except Exception:  # pylint: disable=broad-except
    return ""


def _report(name: str, seconds: float, flops: float | None, peak: float, authors: float | None) -> None:
  print(f"{name}={seconds:.4f}", flush=True)
  if flops:
    print(f"  {name}_gflop_per_device={flops / 1e9:.2f}  achieved_gflop_per_s_per_device="
          f"{flops / seconds / 1e9:.1f}" + (f"  mfu={flops / seconds / peak:.3%}" if peak else ""), flush=True)
  if authors:
    print(f"  vs authors' PyTorch {authors:.3f} s: ratio {seconds / authors:.2f} (target <= 0.80)", flush=True)


def prior_steps(args, devices) -> dict:
  """The compiled prior train step and one reverse step at `args`' architecture, ready to time.

  Returns a dict: `train` and `reverse` (no-argument callables that run one step and block until it is
  done; `train` carries its state from call to call), `train_flops` / `reverse_flops` (per device, or None),
  `train_hlo` / `reverse_hlo` (the compiled programs' HLO text, for `profile_step.py`),
  and for `bench_sampling` the mapped chunk function `p_chunk` with its arguments `rparams`, `z`, `key`.
  """
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from vqddm_jax import diffusion, generation, parallel
  from vqddm_jax.models import prior as prior_lib
  from vqddm_jax.training import optim, prior_step
  cfg = ml_collections.ConfigDict(dict(
      prior=dict(ch=args.ch, ch_mult=tuple(int(m) for m in args.mults.split(",")),
                 num_res_blocks=args.res_blocks, attention=True, mid_attention=True, groups=8, dropout=0.0,
                 softmax_q=True, time_scale=1.0, dtype=args.dtype),
      diffusion=dict(num_steps=args.T, schedule="cosine")))
  model = prior_lib.build_denoiser(cfg, args.k)
  sched = prior_lib.build_schedule(cfg, args.k)
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, schedule="cosine", warmup_steps=0, grad_clip=0.0)), 1000)
  state = prior_step.init_state(model, opt, jax.random.key(0), (args.hw, args.hw), args.T)
  print(f"prior: {sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)) / 1e6:.2f} M parameters, "
        f"ch {args.ch}, mults {args.mults}, K {args.k}, {args.hw}x{args.hw}, batch {args.batch}, T {args.T}, "
        f"{args.dtype}, {len(devices)} device(s)", flush=True)
  n = len(devices)
  step = functools.partial(prior_step.train_step, model=model, optimizer=opt, sched=sched,
                           parametrization="residual", use_importance=True, ema_decay=0.999, t_buckets=4)
  # The main command's own mapping: state donated, so the optimiser updates in place.
  p_step = parallel.pmap(step, in_axes=parallel.STEP_AXES, donate_state=True, devices=devices)
  codes = np.random.default_rng(0).integers(0, args.k, (n, args.batch // n, args.hw, args.hw)).astype(np.int32)
  rstate = _on_devices(state, devices, replicate=True)
  batch = {"codes": _on_devices(codes, devices, replicate=False)}
  key = jax.random.key(1)
  c_step, train_flops = _compiled(p_step, rstate, batch, key)
  holder = [rstate]

  def train():
    holder[0], metrics = c_step(holder[0], batch, key)
    return jax.block_until_ready(metrics)

  def chunk_fn(params, z, key, ts):
    return diffusion.reverse_chunk(generation.device_key(key), z, ts,
                                   prior_lib.logits_fn(model, params, "residual"), sched)
  p_chunk = jax.pmap(chunk_fn, axis_name=parallel.AXIS, in_axes=(0, 0, None, None), devices=devices)
  rparams = _on_devices(state.ema_params, devices, replicate=True)
  z = batch["codes"]
  ts = jnp.asarray([args.T, args.T - 1], jnp.int32)
  c_chunk, reverse_flops = _compiled(p_chunk, rparams, z, key, ts)
  return dict(train=train, reverse=lambda: jax.block_until_ready(c_chunk(rparams, z, key, ts)),
              train_flops=train_flops, reverse_flops=reverse_flops, p_chunk=p_chunk, rparams=rparams, z=z,
              key=key, train_hlo=_hlo_text(c_step), reverse_hlo=_hlo_text(c_chunk))


def bench_prior(args, devices) -> None:
  """Train step and one reverse step of the denoiser at the given architecture."""
  steps = prior_steps(args, devices)
  _report("prior_train_step_s", _timed(steps["train"], args.repeats, args.warmup), steps["train_flops"],
          args.peak_flops, AUTHORS[args.preset][0] if args.preset else None)
  _report("prior_sample_step_s", _timed(steps["reverse"], args.repeats, args.warmup), steps["reverse_flops"],
          args.peak_flops, AUTHORS[args.preset][1] if args.preset else None)
  if args.sampling:
    bench_sampling(args, steps["p_chunk"], steps["rparams"], steps["z"], steps["key"])


def bench_sampling(args, p_chunk, rparams, z, key) -> None:
  """Samples per second of chains of T and T/10 (strided) reverse steps, run as the sampler runs them:
  chunks of `--chunk_steps` transitions, one compiled program per chunk length, the codes kept on device.

  A whole T = 4000 chain of the CelebA denoiser takes about 20 minutes on 2 CPU cores, so by default the
  first `--sample_time_steps` transitions are timed and the rest extrapolated (every chunk of a length runs
  the same program on the same shapes); `--full_chain` times the whole chain.
  """
  import jax
  import jax.numpy as jnp
  from vqddm_jax import diffusion
  for steps in (args.T, max(1, args.T // 10)):
    ts = diffusion.sampling_timesteps(args.T, None if steps == args.T else steps)
    chunk = min(args.chunk_steps, steps)
    starts = list(range(0, steps, chunk))
    programs = {}
    for i in starts:  # compile each chunk length once, outside the timing
      piece = jnp.asarray(ts[i:i + chunk + 1])
      if piece.shape[0] not in programs:
        programs[piece.shape[0]] = p_chunk.lower(rparams, z, key, piece).compile()
    timed = starts if args.full_chain else starts[:max(1, -(-args.sample_time_steps // chunk))]
    out = z
    jax.block_until_ready(programs[len(ts[0:chunk + 1])](rparams, out, key, jnp.asarray(ts[0:chunk + 1])))
    t0 = time.perf_counter()
    for i in timed:
      piece = jnp.asarray(ts[i:i + chunk + 1])
      out = programs[piece.shape[0]](rparams, out, key, piece)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    done = min(steps, timed[-1] + chunk)
    total = seconds * steps / done
    how = "timed whole" if done == steps else f"timed {done} of {steps} steps, extrapolated"
    print(f"sampling_{steps}_steps: {args.batch} samples in {total:.1f} s ({how}) = "
          f"{args.batch / total:.4f} samples/s, {total / steps * 1e3:.1f} ms/step", flush=True)


def bench_stage1(name: str, args, devices) -> None:
  import jax
  import ml_collections
  import numpy as np
  from vqddm_jax import parallel
  from vqddm_jax.models.vqvae import build_vqvae
  from vqddm_jax.training import optim, vqvae_step
  sizes, image, channels, batch = STAGE1[name]
  cfg = ml_collections.ConfigDict(dict(sizes, dropout=0.0, dtype=args.dtype))
  model = build_vqvae(cfg, channels)
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, schedule="constant", warmup_steps=0, grad_clip=0.0)), 1000)
  state = vqvae_step.init_state(model, opt, jax.random.key(0), (image, image, channels))
  n = len(devices)
  batch = max(batch, n) // n * n
  step = functools.partial(vqvae_step.train_step, model=model, optimizer=opt, beta=0.25, recon_loss="mse",
                           ema_decay=0.999)
  # The main command's own mapping: state donated, so the optimiser updates in place.
  p_step = parallel.pmap(step, in_axes=parallel.STEP_AXES, donate_state=True, devices=devices)
  images = np.random.default_rng(0).uniform(-1, 1, (n, batch // n, image, image, channels)).astype(np.float32)
  rstate = _on_devices(state, devices, replicate=True)
  data = {"image": _on_devices(images, devices, replicate=False)}
  key = jax.random.key(1)
  c_step, flops = _compiled(p_step, rstate, data, key)
  holder = [rstate]
  print(f"stage 1 [{name}]: {sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params)) / 1e6:.2f} M "
        f"parameters, {image}x{image}x{channels}, batch {batch}, {args.dtype}", flush=True)

  def train():
    holder[0], metrics = c_step(holder[0], data, key)
    return metrics
  seconds = _timed(train, args.repeats, args.warmup)
  _report(f"vqvae_train_step_s[{name}]", seconds, flops, args.peak_flops, None)


def local_devices(args) -> list:
  """The devices to map over (`--devices`), after making `--host_devices` XLA CPU devices and putting the
  repository root on the path; call before anything imports JAX (XLA reads its flags once)."""
  if args.host_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  devices = jax.local_devices()[:args.devices or None]
  print(f"backend {jax.default_backend()}, {len(devices)} device(s): {devices[0].device_kind}", flush=True)
  return devices


def main(argv=None) -> int:
  args = _args(argv)
  devices = local_devices(args)
  if not args.no_prior:
    bench_prior(args, devices)
  for name in filter(None, args.stage1.split(",")):
    bench_stage1(name, args, devices)
  return 0


if __name__ == "__main__":
  sys.exit(main())
