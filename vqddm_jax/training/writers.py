"""Where training's figures go: clu metric writers (TensorBoard event files and log lines) and the parameter
tables logged when a stage builds its model."""
from __future__ import annotations

from typing import Any

from absl import logging
from clu import metric_writers, parameter_overview


def make_writer(logdir: Any, *, is_main: bool) -> metric_writers.MetricWriter:
  """TensorBoard event files under `logdir` (a local or `gs://` path) plus absl log lines on process 0;
  log lines only elsewhere."""
  return metric_writers.create_default_writer(str(logdir), just_logging=not is_main,
                                              asynchronous=False)


def log_parameters(name: str, params: dict) -> int:
  """Logs clu's table of `params` (each array's path, shape, dtype and size) on process 0, then one line with
  the total and each top-level entry's share; returns the total.

  Args:
    name: what the parameters belong to ("VQ-VAE", "denoiser", ...), the log lines' title.
    params: a nested dict of arrays (host or device; only shapes are read).
  """
  parameter_overview.log_parameter_overview(params, include_stats=False, msg=f"{name} parameters:",
                                            jax_logging_process=0)
  total = int(parameter_overview.count_parameters(params))
  parts = ", ".join(f"{k} {int(parameter_overview.count_parameters({k: v})) / 1e6:.3f}M"
                    for k, v in params.items())
  logging.info("%s: %.3fM parameters (%s)", name, total / 1e6, parts)
  return total
