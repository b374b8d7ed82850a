"""`--mode=reference_stats`: the FID reference statistics of the whole training split, computed once.

The feature mean and covariance (float64, one streamed pass) of every training image, in the feature space
evaluate uses for this config (Inception with `eval.inception_weights`, else the MNIST classifier or VGG16),
written to `workdir/eval/reference_stats_<network>.npz`. Evaluate computes the same file on first use when it
is missing, so this mode is not part of `all`: it is for computing the statistics once, before or apart from
training, and reusing them in other runs with `--config.eval.reference_stats=PATH`. It needs no trained
model.
"""
from __future__ import annotations

from typing import Any

from absl import logging

from vqddm_jax.evaluation import protocol, reference_stats
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def _path(config: Any, workdir: Workdir) -> Any:
  return reference_stats.stats_path(config.eval.reference_stats,
                                    workdir.reference_stats(protocol.feature_network_key(config)))


def is_done(config: Any, workdir: Workdir) -> bool:
  """True when the statistics file exists and fits the config (the network's weights and the split's size
  are checked where it is used).

  Raises:
    ConfigError / MismatchError: the file was computed for another data set, split, size or network.
  """
  path = _path(config, workdir)
  if not path.exists():
    return False
  stored = reference_stats.load(path).record
  wanted = reference_stats.data_record(config.data, protocol.feature_network_key(config))
  # Entries that need the network or the data (weights, split size) are taken as stored here.
  reference_stats.check_record(stored, {**stored, **wanted}, path=path, given=bool(config.eval.reference_stats))
  return True


def run(config: Any, workdir: Workdir) -> StageResult:
  """Computes the statistics (or checks the given or cached file) and reports where they are."""
  net, _ = protocol.feature_network(config, workdir)
  stats = protocol.reference_statistics(config, workdir, net)
  path = _path(config, workdir)
  logging.info("reference statistics: %d images of %s (%s), %s features; reuse them in other runs with "
               "--config.eval.reference_stats=%s", stats.count, stats.record["dataset"], stats.record["split"],
               net.key, path)
  return StageResult("reference_stats", True, (str(path),))
