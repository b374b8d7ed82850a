"""The step-time and profile benchmarks run end to end at a tiny architecture and print what their docs promise.

They are scripts (not part of the package), so they are loaded from `benchmarks/` by path; both map over
2 of the 8 test devices. The figures themselves are not checked: timings belong to benchmarks, not tests.
"""
import importlib.util
import re
import sys

from conftest import ROOT

TINY = ["--ch=8", "--mults=1", "--res_blocks=1", "--k=8", "--hw=2", "--batch=4", "--T=20", "--devices=2"]


def _script(name: str):
  if str(ROOT / "benchmarks") not in sys.path:  # profile_step imports step_time by name
    sys.path.insert(0, str(ROOT / "benchmarks"))
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _value(out: str, name: str) -> float:
  match = re.search(rf"^{re.escape(name)}=([0-9.e+-]+)$", out, re.M)
  assert match, f"no line {name}=... in:\n{out}"
  return float(match.group(1))


def test_step_time_prints_step_times_flops_and_sampling_throughput(capsys):
  step_time = _script("step_time")
  assert step_time.main(TINY + ["--warmup=1", "--repeats=2", "--sampling", "--chunk_steps=10",
                                "--sample_time_steps=10"]) == 0
  out = capsys.readouterr().out
  assert "2 device(s)" in out
  for name in ("prior_train_step_s", "prior_sample_step_s"):
    assert _value(out, name) > 0
    assert re.search(rf"^  {name}_gflop_per_device=[0-9.]+  achieved_gflop_per_s_per_device=[0-9.]+$", out,
                     re.M), out
  # T = 20 steps (2 chunks of 10, the first timed and the second extrapolated) and T/10 = 2 (timed whole).
  assert re.search(r"^sampling_20_steps: 4 samples in [0-9.]+ s \(timed 10 of 20 steps, extrapolated\)", out,
                   re.M), out
  assert re.search(r"^sampling_2_steps: 4 samples in [0-9.]+ s \(timed whole\) = [0-9.]+ samples/s", out,
                   re.M), out


def test_profile_step_attributes_op_time_to_layers(capsys):
  profile_step = _script("profile_step")
  assert profile_step.main(TINY + ["--profile_steps=1", "--top=1000", "--depth=1"]) == 0
  out = capsys.readouterr().out
  match = re.search(r"^summed op time per step: ([0-9.]+) ms over (\d+) ops$", out, re.M)
  assert match and float(match.group(1)) > 0 and int(match.group(2)) > 10, out
  layers = out.split("layer\n", 1)[1]
  # Every layer is listed (--top=1000): the guarded optimiser update and the network's blocks, found by the
  # op_name metadata of the compiled program, forward and backward apart.
  names = re.findall(r"^\s+[0-9.]+\s+[0-9.]+%\s+(.+)$", layers, re.M)
  assert "cond [fwd]" in names, names
  assert "down_0_res_0 [fwd]" in names and "down_0_res_0 [bwd]" in names, names
