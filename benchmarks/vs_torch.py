"""Our prior steps against the PyTorch reference, interleaved in time, as ratios.

On a shared 2-core machine the speed of both sides drifts by 10-40 % over minutes (docs/performance.md), so
two separate runs a minute apart can give any ratio from 0.75 to 1.0 for the same code. Here both sides are
built once, each in a process of its own (`benchmarks/torch_reference.py --serve` for PyTorch, so neither
runtime shares a process or an allocator with the other), and timed in alternating blocks: `--block` steps
of ours, then as many of PyTorch's, for `--rounds` rounds. Each side waits, idle, while the other runs. Each
round's ratio compares the two under the same conditions; the median over rounds is the figure. The first
steps of every block are not timed. Prints each round and:

  train_ratio_median=...   reverse_ratio_median=...   (ours / PyTorch; the targets are <= 0.80)

    python benchmarks/vs_torch.py --preset=mnist              # needs `pip install torch` (CPU is enough)
    python benchmarks/vs_torch.py --preset=celeba --rounds=4
    python benchmarks/vs_torch.py --preset=mnist --host_devices=2   # ours on 2 XLA devices, as main runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class TorchSide:
  """The PyTorch reference in a child process, timing one block of steps per request."""

  def __init__(self, preset: str, num_steps: int, block: int):
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "torch_reference.py"), f"--preset={preset}", f"--T={num_steps}",
         f"--repeats={block}", "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in self.proc.stdout:
      print(f"  [torch] {line.rstrip()}", flush=True)
      if line.strip() == "ready":
        return
    raise SystemExit(f"benchmarks/torch_reference.py exited with {self.proc.wait()} before it was ready")

  def time(self, name: str) -> float:
    self.proc.stdin.write(name + "\n")
    self.proc.stdin.flush()
    answer = self.proc.stdout.readline().strip()
    try:
      return float(answer)
    except ValueError:
      raise SystemExit(f"benchmarks/torch_reference.py answered {answer!r} to {name!r}") from None

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def compare(name: str, ours, theirs: TorchSide, rounds: int, block: int, timed) -> float:
  """Median over rounds of (our block median / PyTorch's block median); prints each round."""
  ratios, ours_s, theirs_s = [], [], []
  for i in range(rounds):
    a, b = timed(ours, block), theirs.time(name)
    ours_s.append(a)
    theirs_s.append(b)
    ratios.append(a / b)
    print(f"  {name} round {i + 1}: ours {a:.4f} s, PyTorch {b:.4f} s, ratio {a / b:.3f}", flush=True)
  ratio = statistics.median(ratios)
  print(f"{name}_ours_s={statistics.median(ours_s):.4f}  {name}_torch_s={statistics.median(theirs_s):.4f}  "
        f"{name}_ratio_median={ratio:.3f}  (rounds {min(ratios):.3f}-{max(ratios):.3f}, target <= 0.80)",
        flush=True)
  return ratio


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=("mnist", "celeba"), default="mnist")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--block", type=int, default=4, help="timed steps per side per round")
  p.add_argument("--host_devices", type=int, default=0, help="XLA CPU devices for ours (0 = JAX's default)")
  p.add_argument("--no_reverse", action="store_true", help="compare the train steps only")
  args = p.parse_args(argv)
  if args.host_devices:  # Before JAX starts: XLA reads its flags once.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  sys.path[:0] = [HERE, os.path.dirname(HERE)]
  import step_time
  import jax
  ours_args = step_time._args([f"--preset={args.preset}"])  # pylint: disable=protected-access
  theirs = TorchSide(args.preset, ours_args.T, args.block)
  try:
    devices = jax.local_devices()
    print(f"ours: backend {jax.default_backend()}, {len(devices)} device(s)", flush=True)
    ours = step_time.prior_steps(ours_args, devices)
    timed = step_time._timed  # pylint: disable=protected-access
    compare("train", ours["train"], theirs, args.rounds, args.block, timed)
    if not args.no_reverse:
      compare("reverse", ours["reverse"], theirs, args.rounds, args.block, timed)
  finally:
    theirs.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
