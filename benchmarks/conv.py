"""Benchmark: XLA's convolutions against the im2col forms of vqddm_jax/models/conv.py, per shape and UNet.

    python benchmarks/conv.py                       # the models' conv shapes (UNets, VQ-VAE f16)
    python benchmarks/conv.py --tables=mnist_unet   # one table
    python benchmarks/conv.py --tables= --unet      # only the whole MNIST-size UNet, XLA vs conv.Conv
    python benchmarks/conv.py --tables= --sweep --sizes=2,4 --channels=256,1024 --batches=8

Shape tables: every convolution the model makes (recorded by tracing its init with `jax.eval_shape`), once
per distinct shape, with its count per forward pass; columns are median milliseconds of the jitted forward
and of forward + backward (gradients w.r.t. input and kernel), XLA (`lax.conv_general_dilated` /
`lax.conv_transpose`), im2col, the ratio XLA / im2col, and the path `impl='auto'` picks. The last row sums
count x time for XLA only, im2col only and the auto choice. `--sweep` times a grid of square maps, widths
(C_in = C_out), batches and kinds (3x3 stride 1, 1x1, 3x3 stride 2, 4x4 stride-2 transposed): the data
behind `conv.use_im2col`. `--unet` times the whole MNIST-size denoiser, forward and loss + gradient, with
XLA's convs (`impl='xla'`, which is flax's call), with the `impl='auto'` choice and with im2col forced, through
the `VQDDM_CONV_IMPL` switch the model's convs read while tracing.

Compile time is excluded: an untimed warm-up call after compiling, then repeats until `--budget` seconds or
`--repeats` calls, and the median is reported; a warm-up call longer than the budget is the measurement
(some XLA:CPU conv gradients take seconds). Wall time on a shared machine is noisy: compare within a run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Run as a script from anywhere: the repository root is the package's parent.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vqddm_jax.models import conv, unet, vqvae  # noqa: E402

Shape = collections.namedtuple("Shape", "kind x k strides padding")  # kind: 'conv' or 'convT'


@contextlib.contextmanager
def _recording(shapes: collections.Counter):
  """Counts the convolutions flax makes (its modules call `jax.lax.conv_*` by attribute, at call time)."""
  orig_conv, orig_convt = lax.conv_general_dilated, lax.conv_transpose

  def _pads(p):
    return p if isinstance(p, str) else tuple(tuple(q) for q in p)

  def rec_conv(x, k, strides, padding, *args, **kwargs):
    shapes[Shape("conv", x.shape, k.shape, tuple(strides), _pads(padding))] += 1
    return orig_conv(x, k, strides, padding, *args, **kwargs)

  def rec_convt(x, k, strides, padding, *args, **kwargs):
    shapes[Shape("convT", x.shape, k.shape, tuple(strides), _pads(padding))] += 1
    return orig_convt(x, k, strides, padding, *args, **kwargs)

  lax.conv_general_dilated, lax.conv_transpose = rec_conv, rec_convt
  try:
    yield
  finally:
    lax.conv_general_dilated, lax.conv_transpose = orig_conv, orig_convt


def model_shapes(name: str, max_size: int) -> collections.Counter:
  """Distinct conv shapes (with counts) of one forward pass of a model, maps of at most max_size only."""
  if name == "celeba_unet":
    model, b, size = unet.UNet(num_classes=512, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2), 8, 16
  elif name == "mnist_unet":
    model, b, size = unet.UNet(num_classes=512, ch=64, ch_mult=(1, 2, 4), num_res_blocks=2), 32, 8
  elif name == "vqvae_f16":
    model = vqvae.VQVAE(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                        z_channels=256, embed_dim=256, codebook_size=1024, out_channels=3, groups=32)
  else:
    raise ValueError(f"unknown table {name!r}")
  shapes = collections.Counter()
  with _recording(shapes):
    if name == "vqvae_f16":
      x = jax.ShapeDtypeStruct((8, 256, 256, 3), jnp.float32)
      # One encode (init runs it) and one decode: the forward pass of a training step.
      jax.eval_shape(lambda xx: model.init(jax.random.PRNGKey(0), xx, method="encode"), x)
      shapes_enc = collections.Counter(shapes)
      shapes.clear()
      jax.eval_shape(lambda xx: model.init(jax.random.PRNGKey(0), xx, method="decode"),
                     jax.ShapeDtypeStruct((8, 16, 16, 256), jnp.float32))
      shapes.update(shapes_enc)
    else:
      z = jax.ShapeDtypeStruct((b, size, size), jnp.int32)
      t = jax.ShapeDtypeStruct((b,), jnp.int32)
      jax.eval_shape(lambda zz, tt: model.init(jax.random.PRNGKey(0), zz, tt), z, t)
  return collections.Counter({s: n for s, n in shapes.items() if max(s.x[1:3]) <= max_size})


def _fns(s: Shape) -> tuple[Callable, Callable]:
  """(XLA, im2col) functions of (x, kernel) for a recorded shape."""
  nsp = len(s.strides)
  pads = conv._canonical_padding(s.padding if isinstance(s.padding, str) else list(s.padding), nsp)
  if s.kind == "convT":
    xla = lambda x, k: lax.conv_transpose(x, k, s.strides, pads)  # noqa: E731
    im2col = lambda x, k: conv.im2col_conv_transpose(  # noqa: E731
        x, k, s.strides, conv.transpose_padding(s.k[:nsp], s.strides, pads))
  else:
    xla = lambda x, k: lax.conv_general_dilated(  # noqa: E731
        x, k, s.strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    explicit = lax.padtype_to_pads(s.x[1:-1], s.k[:nsp], s.strides, pads) if isinstance(pads, str) else pads
    im2col = lambda x, k: conv.im2col_conv(x, k, s.strides, explicit)  # noqa: E731
  return xla, im2col


def _time_ms(fn: Callable, args, budget: float, repeats: int) -> float:
  """Median milliseconds of `fn(*args)` (already compiled), over repeats within `budget` seconds.

  The first call (it allocates buffers and wakes thread pools) is not counted, unless it alone exceeds the
  budget: then it is the measurement (XLA:CPU takes seconds for some convolution gradients).
  """
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  if first > budget:
    return 1e3 * first
  times, start = [], time.perf_counter()
  while not times or (len(times) < repeats and time.perf_counter() - start < budget):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def bench_shape(s: Shape, budget: float, repeats: int) -> dict[str, float]:
  """{'xla', 'im2col'} x {'fwd', 'grad'} milliseconds for one shape (compile excluded)."""
  kx, kk = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, s.x, jnp.float32)
  k = jax.random.normal(kk, s.k, jnp.float32) / (s.k[0] * s.k[1] * s.k[2]) ** 0.5
  out = {}
  for impl, fn in zip(("xla", "im2col"), _fns(s)):
    # sum(y^2) / 2, not sum(y): its cotangent is y, so the forward pass cannot be left out.
    grad = jax.grad(lambda xx, ww, f=fn: 0.5 * jnp.sum(jnp.square(f(xx, ww))), argnums=(0, 1))
    for mode, f in (("fwd", fn), ("grad", grad)):
      compiled = jax.jit(f).lower(x, k).compile()
      out[f"{impl}_{mode}"] = _time_ms(compiled, (x, k), budget, repeats)
  return out


def _row(label: str, n: int, r: dict[str, float], auto: bool) -> str:
  return (f"{label:<34} {n:>3} | {r['xla_fwd']:>9.1f} {r['im2col_fwd']:>8.1f} "
          f"{r['xla_fwd'] / r['im2col_fwd']:>6.1f} | {r['xla_grad']:>9.1f} {r['im2col_grad']:>8.1f} "
          f"{r['xla_grad'] / r['im2col_grad']:>6.1f} | {'im2col' if auto else 'xla'}")


def _label(s: Shape) -> str:
  b, h, w, cin = s.x
  pad = s.padding if isinstance(s.padding, str) else "".join(str(p[0]) + str(p[1]) for p in s.padding)
  return f"{s.kind} {s.k[0]}x{s.k[1]}/{s.strides[0]} p{pad} {b}x{h}x{w}x{cin}>{s.k[-1]}"


def print_table(title: str, shapes: collections.Counter, budget: float, repeats: int) -> None:
  """One table of `shapes` (distinct shapes with counts), with a weighted total."""
  print(f"\n## {title}")
  print(f"{'shape (kind kernel/stride pad BxHxWxCin>Cout)':<34} {'n':>3} | {'xla fwd':>9} {'im2col':>8} "
        f"{'ratio':>6} | {'xla f+b':>9} {'im2col':>8} {'ratio':>6} | auto")
  tot = collections.Counter()
  for s, n in sorted(shapes.items(), key=lambda kv: (-kv[0].x[1], kv[0].x[-1], kv[0].kind)):
    r = bench_shape(s, budget, repeats)
    auto = conv.use_im2col(s.x[1:-1], s.x[-1], s.k[-1], s.k[:-2], s.strides, transpose=s.kind == "convT")
    for mode in ("fwd", "grad"):
      tot[f"xla_{mode}"] += n * r[f"xla_{mode}"]
      tot[f"im2col_{mode}"] += n * r[f"im2col_{mode}"]
      tot[f"auto_{mode}"] += n * r[f"{'im2col' if auto else 'xla'}_{mode}"]
    print(_row(_label(s), n, r, auto), flush=True)
  print(f"{'total (count-weighted)':<38} | {tot['xla_fwd']:>9.1f} {tot['im2col_fwd']:>8.1f} "
        f"{tot['xla_fwd'] / tot['im2col_fwd']:>6.1f} | {tot['xla_grad']:>9.1f} {tot['im2col_grad']:>8.1f} "
        f"{tot['xla_grad'] / tot['im2col_grad']:>6.1f} |")
  print(f"{'total with impl=auto':<38} | {tot['auto_fwd']:>9.1f} {'':>15} | {tot['auto_grad']:>9.1f}")


def sweep_shapes(kinds, sizes, channels, batches) -> collections.Counter:
  """The `--sweep` grid as a Counter of shapes (count 1 each)."""
  spec = {"3x3": ("conv", 3, 1, ((1, 1), (1, 1))), "1x1": ("conv", 1, 1, ((0, 0), (0, 0))),
          "3x3s2": ("conv", 3, 2, ((1, 1), (1, 1))), "T4x4s2": ("convT", 4, 2, ((2, 2), (2, 2)))}
  shapes = collections.Counter()
  for kind, b, size, c in ((kd, b, n, c) for kd in kinds for b in batches for n in sizes for c in channels):
    op, k, stride, pad = spec[kind]
    if op == "conv" and stride == 2 and size == 1:
      continue
    shapes[Shape(op, (b, size, size, c), (k, k, c, c), (stride, stride), pad)] += 1
  return shapes


@contextlib.contextmanager
def _env(name: str, value: str):
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      del os.environ[name]
    else:
      os.environ[name] = old


def bench_unet(budget: float, repeats: int) -> None:
  """Whole MNIST-size UNet, forward and forward + backward (grad w.r.t. params), per conv implementation."""
  model = unet.UNet(num_classes=512, ch=64, ch_mult=(1, 2, 4), num_res_blocks=2)
  z = jax.random.randint(jax.random.PRNGKey(1), (32, 8, 8), 0, 512, dtype=jnp.int32)
  t = jax.random.randint(jax.random.PRNGKey(2), (32,), 1, 251, dtype=jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), z, t)["params"]

  def compiled():
    # Fresh functions per variant: jax.jit caches traces per function object, and the convs are chosen
    # while tracing.
    def fwd(p, zz, tt):
      return model.apply({"params": p}, zz, tt)

    def loss(p, zz, tt):
      logp = jax.nn.log_softmax(fwd(p, zz, tt))
      return -jnp.mean(jnp.take_along_axis(logp, zz[..., None], axis=-1))
    return (jax.jit(fwd).lower(params, z, t).compile(),
            jax.jit(jax.value_and_grad(loss)).lower(params, z, t).compile())

  print("\n## whole UNet(num_classes=512, ch=64, ch_mult=(1,2,4), num_res_blocks=2), z i32[32,8,8]")
  print(f"{'convs':<28} {'fwd ms':>8} {'fwd+bwd ms':>11}")
  variants = (("XLA convs (impl=xla)", "xla"), ("conv.Conv impl=auto", "auto"),
              ("conv.Conv impl=im2col", "im2col"))
  for name, impl in variants:
    with _env(conv.IMPL_ENV, impl):  # the UNet's convs read it while tracing
      f, g = compiled()
    ms = _time_ms(f, (params, z, t), budget, repeats), _time_ms(g, (params, z, t), budget, repeats)
    print(f"{name:<28} {ms[0]:>8.1f} {ms[1]:>11.1f}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tables", default="celeba_unet,mnist_unet,vqvae_f16",
                 help="comma-separated: celeba_unet, mnist_unet, vqvae_f16 (empty: none)")
  p.add_argument("--max_size", type=int, default=16, help="only maps of at most this size (VQ-VAE: 32)")
  p.add_argument("--unet", action="store_true", help="also time the whole MNIST-size UNet")
  p.add_argument("--sweep", action="store_true", help="time the grid below")
  p.add_argument("--kinds", default="3x3,1x1,3x3s2,T4x4s2")
  p.add_argument("--sizes", default="1,2,4,8,16")
  p.add_argument("--channels", default="64,128,256,512,1024")
  p.add_argument("--batches", default="8")
  p.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per measurement")
  p.add_argument("--repeats", type=int, default=7, help="most timed calls per measurement")
  args = p.parse_args()
  print(f"backend {jax.default_backend()}, {jax.local_device_count()} device(s), jax {jax.__version__}")
  for name in filter(None, args.tables.split(",")):
    print_table(name, model_shapes(name, args.max_size), args.budget, args.repeats)
  if args.sweep:
    ints = lambda v: [int(i) for i in v.split(",")]  # noqa: E731
    grid = sweep_shapes(args.kinds.split(","), ints(args.sizes), ints(args.channels), ints(args.batches))
    print_table("sweep", grid, args.budget, args.repeats)
  if args.unet:
    bench_unet(args.budget, args.repeats)


if __name__ == "__main__":
  main()
