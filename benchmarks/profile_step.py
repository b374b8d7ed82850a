"""Per-op profile of the prior's train step (or one reverse step): where the time goes, grouped by layer.

    python benchmarks/profile_step.py --preset=mnist                    # the MNIST-size denoiser, 1 device
    python benchmarks/profile_step.py --ch=64 --mults=1,2,2 --res_blocks=1 --host_devices=2   # the default's
    python benchmarks/profile_step.py --preset=celeba --reverse --top=30

Builds the same compiled steps as `benchmarks/step_time.py` (all its architecture flags apply), runs
`--profile_steps` of them under `jax.profiler.trace` after a warm-up, reads the Perfetto trace it writes and
joins each executed HLO op with the `op_name` metadata of the compiled module, which names the flax module
and the JAX primitive it came from. Prints, per step and summed over the device threads (so two devices
add up): the ops with the most time, then the time per layer (the module path with its trailing primitive
dropped; `cond/branch_1_fun` is the guarded optimiser + EMA update), each with its share of the total. The
shares are of the summed op time, not of the wall time: a collective's time includes waiting for the slower
device, and on a CPU some ops run inside others.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile

# Run as a script from anywhere (step_time.local_devices puts the repository root on the path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the compiled steps and the architecture flags)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]+)\"", re.M)


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reverse", action="store_true", help="profile one reverse step instead of a train step")
  p.add_argument("--profile_steps", type=int, default=5)
  p.add_argument("--top", type=int, default=25, help="how many ops and layers to list")
  p.add_argument("--depth", type=int, default=4, help="module path components that name a layer")
  own, rest = p.parse_known_args(argv)
  args = step_time._args(rest)  # pylint: disable=protected-access
  for k, v in vars(own).items():
    setattr(args, k, v)
  return args


def op_layers(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the `op_name` metadata it was lowered from, in one compiled program's text."""
  return dict(_INSTR.findall(hlo_text))


def layer_of(op_name: str, depth: int) -> str:
  """`jit(f)/shard_map/transpose(jvp(UNet))/down_0_res_0/block1/conv/conv_general_dilated` ->
  `down_0_res_0/block1/conv [bwd]`; an op outside every module is named by its primitive (`psum [fwd]`)."""
  kind = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/")
           if p != "shard_map" and not re.match(r"^(pmap|jit|pjit|jvp|transpose|vmap)\(", p)]
  if not parts:
    return f"? [{kind}]"
  return ("/".join(parts[:-1][:depth]) or parts[-1]) + f" [{kind}]"


def trace_events(log_dir: str) -> list[dict]:
  """The complete ('X') events of the Perfetto trace `jax.profiler.trace` wrote under `log_dir`."""
  for root, _, files in os.walk(log_dir):
    for f in files:
      if f.endswith(".trace.json.gz"):
        with gzip.open(os.path.join(root, f), "rt") as fh:
          data = json.load(fh)
        events = data["traceEvents"] if isinstance(data, dict) else data
        return [e for e in events if e.get("ph") == "X" and "dur" in e]
  raise FileNotFoundError(f"no .trace.json.gz under {log_dir}")


def profile(fn, steps: int) -> list[dict]:
  import jax
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(fn())
    return trace_events(d)


def summarise(events: list[dict], names: dict[str, str], steps: int, top: int, depth: int) -> None:
  by_op, by_layer = collections.Counter(), collections.Counter()
  for e in events:
    op = e["name"]
    if op not in names:  # host-side events (Python, runtime) and the executable's own span
      continue
    by_op[op] += e["dur"] / 1e3 / steps
    by_layer[layer_of(names[op], depth)] += e["dur"] / 1e3 / steps
  total = sum(by_op.values())
  print(f"summed op time per step: {total:.1f} ms over {len(by_op)} ops")
  print(f"\n{'ms/step':>9} {'share':>6}  op  (metadata op_name)")
  for op, ms in by_op.most_common(top):
    print(f"{ms:9.2f} {ms / total:6.1%}  {op}  ({names[op][-110:]})")
  print(f"\n{'ms/step':>9} {'share':>6}  layer")
  for layer, ms in by_layer.most_common(top):
    print(f"{ms:9.2f} {ms / total:6.1%}  {layer}")


def main(argv=None) -> int:
  args = _args(argv)
  steps = step_time.prior_steps(args, step_time.local_devices(args))
  fn = steps["reverse"] if args.reverse else steps["train"]
  events = profile(fn, args.profile_steps)
  names = op_layers(steps["reverse_hlo" if args.reverse else "train_hlo"])
  summarise(events, names, args.profile_steps, args.top, args.depth)
  return 0


if __name__ == "__main__":
  sys.exit(main())
