"""The stage-2 denoiser and its train and reverse steps in PyTorch, timed against `step_time.py` on one host.

The speed targets of this project are ratios to the authors' PyTorch on the same CPU. Their code is not part
of this repository, and a figure measured on one machine does not carry over to another (the same 2-core
machine type has measured 10-35 % apart between sessions). This script is a PyTorch implementation of the
same network and step, written for this benchmark from docs/method.md (not the authors' code): NCHW, eager
PyTorch, Adam, float32, as their training script runs. It counts the same parameters as the Flax `UNet`
(7.74 M at the MNIST preset, 117.45 M at CelebA's) and prints the count. Run both on an otherwise idle
machine:

  python benchmarks/torch_reference.py --preset=mnist      # needs `pip install torch` (CPU wheel is enough)
  python benchmarks/step_time.py --preset=mnist --stage1=
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError as e:  # pragma: no cover - an optional benchmark
  raise SystemExit(f"benchmarks/torch_reference.py needs PyTorch ({e}); `pip install torch` (CPU is enough)")

PRESETS = {"celeba": dict(ch=128, mults=(1, 2, 4, 8), k=512, hw=16, batch=8),
           "mnist": dict(ch=64, mults=(1, 2, 4), k=512, hw=8, batch=32)}
LOG_EPS = math.log(1e-30)


class Block(nn.Sequential):
  def __init__(self, cin, cout, groups=8):
    super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.Mish())


class ResnetBlock(nn.Module):
  def __init__(self, cin, cout, temb):
    super().__init__()
    self.block1, self.block2 = Block(cin, cout), Block(cout, cout)
    self.time_proj = nn.Sequential(nn.Mish(), nn.Linear(temb, cout))
    self.res = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x, t):
    h = self.block1(x) + self.time_proj(t)[:, :, None, None]
    return self.block2(h) + self.res(x)


class ReZeroAttention(nn.Module):
  """x + g · LinearAttention(x), g initialised to 0; softmax of k over positions and of q over features."""
  def __init__(self, c, heads=4, dim_head=32):
    super().__init__()
    self.heads, self.dim_head, hidden = heads, dim_head, heads * dim_head
    self.to_qkv, self.to_out = nn.Conv2d(c, 3 * hidden, 1, bias=False), nn.Conv2d(hidden, c, 1)
    self.g = nn.Parameter(torch.zeros(()))

  def forward(self, x):
    b, _, h, w = x.shape
    q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, self.dim_head, h * w).unbind(1)
    q, k = q.softmax(dim=-2), k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
    return x + self.g * self.to_out(out)


class UNet(nn.Module):
  """The layers, widths and skips of `vqddm_jax.models.unet.UNet` (2 res blocks, attention everywhere)."""
  def __init__(self, k, ch, mults, res_blocks=2):
    super().__init__()
    widths, self.ch = [ch * m for m in mults], ch
    self.time = nn.Sequential(nn.Linear(ch, 4 * ch), nn.Mish(), nn.Linear(4 * ch, ch))
    self.embed = nn.Embedding(k, ch)
    self.down, cin = nn.ModuleList(), ch
    for lvl, width in enumerate(widths):
      blocks = [ResnetBlock(cin if j == 0 else width, width, ch) for j in range(res_blocks)]
      down = nn.Conv2d(width, width, 3, stride=2, padding=1) if lvl < len(widths) - 1 else nn.Identity()
      self.down.append(nn.ModuleList([nn.ModuleList(blocks), ReZeroAttention(width), down]))
      cin = width
    self.mid = nn.ModuleList([ResnetBlock(cin, cin, ch), ReZeroAttention(cin), ResnetBlock(cin, cin, ch)])
    self.up = nn.ModuleList()
    for lvl in reversed(range(1, len(widths))):
      out = widths[lvl - 1]
      blocks = [ResnetBlock(cin + widths[lvl] if j == 0 else out, out, ch) for j in range(res_blocks)]
      self.up.append(nn.ModuleList([nn.ModuleList(blocks), ReZeroAttention(out),
                                    nn.ConvTranspose2d(out, out, 4, stride=2, padding=1)]))
      cin = out
    self.head = nn.Sequential(Block(cin, ch), nn.Conv2d(ch, k, 1))

  def forward(self, z, t):
    half = self.ch // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
    angles = t.float()[:, None] * freqs[None]
    temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))
    x, skips = self.embed(z).permute(0, 3, 1, 2), []
    for blocks, attn, down in self.down:
      for block in blocks:
        x = block(x, temb)
      x = attn(x)
      skips.append(x)
      x = down(x)
    x = self.mid[2](self.mid[1](self.mid[0](x, temb)), temb)
    for (blocks, attn, up), skip in zip(self.up, reversed(skips[1:])):
      x = torch.cat([x, skip], dim=1)
      for block in blocks:
        x = block(x, temb)
      x = up(attn(x))
    return self.head(x)  # [B, K, h, w]


def schedule(num_steps: int) -> dict[str, torch.Tensor]:
  """log ᾱ_t, log(1 − ᾱ_t), log α_t, log(1 − α_t) for t = 0..T (cosine, float64, cast once)."""
  s = 0.008
  f = np.cos(((np.arange(num_steps + 1) / num_steps) + s) / (1 + s) * np.pi / 2) ** 2
  abar = np.clip(f / f[0], 1e-30, 1.0)
  alpha = np.concatenate([[1.0], abar[1:] / abar[:-1]])
  log = lambda a: torch.tensor(np.log(np.maximum(a, 1e-30)), dtype=torch.float32)  # noqa: E731
  return {"log_abar": log(abar), "log_1m_abar": log(1 - abar), "log_alpha": log(alpha),
          "log_1m_alpha": log(1 - alpha)}


def _mix(log_p, log_keep, log_flip, k):
  """log(keep · p + (1 − keep) / K) per position; log_p: [B, K, h, w], log_keep / log_flip: [B]."""
  return torch.logaddexp(log_p + log_keep[:, None, None, None], log_flip[:, None, None, None] - math.log(k))


def posterior(sched, log_x0, z_t_onehot, t, k):
  """log N[θ(z_t, x0)] of q(z_{t−1} | z_t, x0) (docs/method.md §3.3), [B, K, h, w]."""
  fwd = _mix(z_t_onehot, sched["log_alpha"][t], sched["log_1m_alpha"][t], k)
  prev = _mix(log_x0, sched["log_abar"][t - 1], sched["log_1m_abar"][t - 1], k)
  unnorm = fwd + prev
  return unnorm - torch.logsumexp(unnorm, dim=1, keepdim=True)


def log_onehot(z, k):
  return torch.log(F.one_hot(z, k).permute(0, 3, 1, 2).float().clamp(min=1e-30))


def gumbel_sample(log_p):
  u = torch.rand_like(log_p)
  return (log_p - torch.log(-torch.log(u + 1e-30) + 1e-30)).argmax(dim=1)


def train_step(model, opt, sched, z0, k, num_steps):
  """One step of the L_t / p(t) estimator with uniform t (residual logits), Adam; returns the loss."""
  b = z0.shape[0]
  t = torch.randint(1, num_steps + 1, (b,))
  log_z0 = log_onehot(z0, k)
  z_t = gumbel_sample(_mix(log_z0, sched["log_abar"][t], sched["log_1m_abar"][t], k))
  log_zt = log_onehot(z_t, k)
  log_x0_hat = F.log_softmax(model(z_t, t) + log_zt.exp(), dim=1)
  log_q = posterior(sched, log_z0, log_zt, t, k)
  log_p = posterior(sched, log_x0_hat, log_zt, t, k)
  kl = (log_q.exp() * (log_q - log_p)).sum(dim=(1, 2, 3))
  nll = -(log_z0.exp() * log_x0_hat).sum(dim=(1, 2, 3))
  loss = torch.where(t == 1, nll, kl).mean() * num_steps
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return loss.item()


@torch.no_grad()
def reverse_step(model, sched, z_t, t, k):
  """z_{t−1} ~ N[θ(z_t, softmax(ℓ))] for the whole batch at step t."""
  tt = torch.full((z_t.shape[0],), t, dtype=torch.long)
  log_zt = log_onehot(z_t, k)
  log_x0_hat = F.log_softmax(model(z_t, tt) + log_zt.exp(), dim=1)
  return gumbel_sample(posterior(sched, log_x0_hat, log_zt, tt, k))


def _median_time(fn, repeats):
  for _ in range(3):  # warm-up (allocator, oneDNN primitive caches), as many calls as step_time.py's default
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def torch_steps(preset: str, num_steps: int) -> dict:
  """The PyTorch train step and one reverse step at a preset, as no-argument callables (`train`, `reverse`).

  `train` updates the model in place from call to call, as a training loop does; the model switches between
  train and eval mode as each step needs.
  """
  c = PRESETS[preset]
  torch.manual_seed(0)
  model = UNet(c["k"], c["ch"], c["mults"])
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prior: "
        f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters, ch {c['ch']}, mults "
        f"{','.join(map(str, c['mults']))}, K {c['k']}, {c['hw']}x{c['hw']}, batch {c['batch']}, T {num_steps}",
        flush=True)
  opt, sched = torch.optim.Adam(model.parameters(), lr=1e-4), schedule(num_steps)
  z0 = torch.randint(0, c["k"], (c["batch"], c["hw"], c["hw"]))

  def train():
    model.train()
    return train_step(model, opt, sched, z0, c["k"], num_steps)

  def reverse():
    model.eval()
    return reverse_step(model, sched, z0, num_steps // 2, c["k"])
  return dict(train=train, reverse=reverse)


def serve(steps: dict, repeats: int) -> None:
  """Answers each stdin line naming a step with its median time over `repeats` steps, until EOF or 'quit'.

  `benchmarks/vs_torch.py` runs this in a process of its own and interleaves these blocks with its own, so
  that both sides are timed under the same conditions without sharing a process (a JAX runtime and its
  allocations in the same process slowed PyTorch's steps by up to ~20 %).
  """
  print("ready", flush=True)
  for line in sys.stdin:
    name = line.strip()
    if name == "quit":
      return
    print(f"{_median_time(steps[name], repeats):.6f}" if name in steps else f"error: no step {name!r}",
          flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="mnist")
  p.add_argument("--T", type=int, default=4000)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
  p.add_argument("--serve", action="store_true",
                 help="time blocks on request (for benchmarks/vs_torch.py): read 'train' / 'reverse' lines "
                      "on stdin, answer each with the median seconds of --repeats steps")
  args = p.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  steps = torch_steps(args.preset, args.T)
  if args.serve:
    serve(steps, args.repeats)
    return
  print(f"torch_prior_train_step_s={_median_time(steps['train'], args.repeats):.4f}", flush=True)
  print(f"torch_prior_sample_step_s={_median_time(steps['reverse'], args.repeats):.4f}", flush=True)


if __name__ == "__main__":
  main()
