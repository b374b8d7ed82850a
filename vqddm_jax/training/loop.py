"""The training loop every stage shares: resume, step, log, checkpoint, stop on SIGTERM (on any host).

A stage supplies its loop settings (`LoopConfig.from_section`), its initial host state, its pmapped step
`(state, batch, key) -> (state, metrics)`, a function that opens its input iterator at a saved position, its
key stream (`training/keys.py`) and its held-out evaluation (`HeldOut`). Everything the next step depends on —
the state, the iterator position, the step count (keys are `fold_in(base_key, step)` inside the step) — is in
the checkpoint, so a resumed run reaches exactly the parameters of an uninterrupted one. Progress (steps/s,
ETA), the held-out evaluation (whose scalars, log line and `eval.json` the loop writes) and the stage's other
periodic work (image grids) run as clu periodic actions. A watchdog ends the job when one phase (a step, the
periodic work after it, a checkpoint save) hangs (`training/watchdog.py`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from clu import periodic_actions
from etils import epath

from vqddm_jax import checkpointing, parallel
from vqddm_jax import files as files_lib
from vqddm_jax.training import guard, watchdog

# (every, fn): `fn(step, replicated_state)` after every `every` completed steps and after the last one.
Periodic = tuple[int, Callable[[int, Any], None]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Static settings of one stage's loop."""
  stage: str
  directory: epath.Path
  num_steps: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int = 2
  prefetch: int = 2

  @classmethod
  def from_section(cls, stage: str, directory: epath.Path, section: Any) -> "LoopConfig":
    """The loop of a training section (`config.vqvae_train`, `config.refit`, `config.prior_train`): its
    num_steps, log_every, checkpoint_every and keep_checkpoints, with checkpoints under `directory`."""
    return cls(stage, directory, section.num_steps, section.log_every, section.checkpoint_every,
               section.keep_checkpoints)


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """A stage's periodic held-out evaluation; the loop writes what `evaluate` returns.

  After every `every` steps and after the last one, the loop calls `evaluate(step, replicated_state)` on every
  host (the figures are summed over hosts inside it) and writes the results: `<stage>/eval_<key>` scalars
  (all but `step` and the `unplotted` keys), one log line (`describe(results)`) and, on process 0,
  `dict(results, step=step)` to `path` (the stage's `eval.json`; a `step` that `evaluate` placed keeps its
  place in the file).
  """
  every: int
  evaluate: Callable[[int, Any], dict]
  path: epath.Path
  describe: Callable[[dict], str] = str
  unplotted: tuple[str, ...] = ()

  def action(self, stage: str, writer: Any) -> Periodic:
    """The loop's (every, fn) pair: evaluate, then write the scalars, the log line and `path`."""
    def run_eval(step: int, rstate: Any) -> None:
      results = self.evaluate(step, rstate)
      writer.write_scalars(step, {f"{stage}/eval_{k}": v for k, v in results.items()
                                  if k != "step" and k not in self.unplotted})
      logging.info("%s held-out at step %d: %s", stage, step, self.describe(results))
      if parallel.is_main_process():
        files_lib.write_json(self.path, dict(results, step=step))
    return self.every, run_eval


def _device_batches(batches: Any, size: int) -> Iterator[tuple[Any, Any]]:
  """Yields (device batch, iterator position after it), keeping `size` batches in flight."""
  queue = collections.deque()
  for batch in batches:
    queue.append((parallel.to_devices(batch), dict(batches.position)))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def trained_to(directory: epath.Path, num_steps: int) -> bool:
  """Whether the latest checkpoint under `directory` has reached step `num_steps` (a training stage's
  `is_done`)."""
  latest = checkpointing.latest_step(directory)
  return latest is not None and latest >= num_steps


def restore_or_init(ckpt: checkpointing.Checkpointer, init_state: Any) -> tuple[Any, dict]:
  """The latest readable checkpoint (structure of `init_state`), or `init_state` with empty meta. A corrupt
  latest step is named and set aside, and the previous kept step resumes (`Checkpointer.restore_resumable`)."""
  restored = ckpt.restore_resumable(jax.eval_shape(lambda: init_state))
  if restored is None:
    return init_state, {}
  state, meta = restored
  logging.info("resumed %s from step %d", ckpt.directory, int(state.step))
  return state, meta


def run(loop: LoopConfig, *, init_state: Any, p_step: Callable[..., Any],
        open_batches: Callable[[dict | None], Any], key: jax.Array, writer: Any,
        periodic: Sequence[Periodic] = (), heldout: HeldOut | None = None,
        meta: dict | None = None) -> tuple[Any, bool]:
  """Trains until `loop.num_steps`, resuming from the latest checkpoint under `loop.directory`.

  Args:
    loop: static loop settings.
    init_state: host train state (a dataclass with an integer `step` field) used when nothing is saved.
    p_step: pmapped step `(replicated_state, device_batch, key) -> (replicated_state, metrics)`; metrics are
      already averaged over devices and include `finite` (1.0 when the update was applied).
    open_batches: `position -> iterator` of host batches `[local_devices, b, ...]` exposing `.position`.
    key: the stage's key stream (the step folds in the step number).
    writer: a clu metric writer.
    periodic: (every, fn) pairs, e.g. image grids.
    heldout: the held-out evaluation, run after the `periodic` work of its steps.
    meta: extra JSON-able facts stored in every checkpoint.

  Returns:
    (host state, completed): completed is False when SIGTERM stopped the run early.
  """
  ckpt = checkpointing.Checkpointer(loop.directory, max_to_keep=loop.keep_checkpoints)
  state, saved_meta = restore_or_init(ckpt, init_state)
  step = first = int(state.step)
  if step >= loop.num_steps:
    if loop.num_steps == 0 and checkpointing.latest_step(loop.directory) is None:
      # Zero steps (stage 1 imported from a converted tokenizer): the initial state is the stage's result.
      _save(ckpt, loop.stage, 0, state, dict(meta or {}, imported=True))
    ckpt.close()
    return state, True
  log = _Log(loop, writer, saved_meta)
  batches = open_batches(log.position)
  rstate = parallel.replicate(state)
  progress = periodic_actions.ReportProgress(num_train_steps=loop.num_steps, writer=writer,
                                             every_steps=loop.log_every, every_secs=None)
  periodic = list(periodic) + ([heldout.action(loop.stage, writer)] if heldout else [])
  actions = [periodic_actions.PeriodicCallback(
      every_steps=every, on_steps=[loop.num_steps],
      callback_fn=lambda step, t, rstate, fn=fn: fn(step, rstate)) for every, fn in periodic]
  completed = True
  # Each phase of the loop must end within config.train_watchdog_minutes (training/watchdog.py).
  with parallel.StopAgreement() as stop, watchdog.Watchdog(loop.stage) as dog:
    device_batches = _device_batches(batches, loop.prefetch)
    while step < loop.num_steps:
      if step > first:  # The first step of a run compiles it: not timed.
        dog.mark(f"step {step + 1} (its batch, its computation, the logging after it)")
      batch, log.position = next(device_batches)
      rstate, step_metrics = p_step(rstate, batch, key)
      step += 1
      last = step == loop.num_steps
      log.add(step, parallel.first_local(step_metrics), write=step % loop.log_every == 0 or last)
      progress(step)
      if last or any(step % every == 0 for every, _ in periodic):
        dog.mark(f"the periodic work after step {step} (held-out evaluation, image grids)")
      for action in actions:
        action(step, rstate=rstate)
      stopping = stop.reached(step)  # The same answer on every host.
      if step % loop.checkpoint_every == 0 or last or stopping:
        dog.mark(f"the checkpoint save at step {step}")
        log.write(step)  # Count skipped steps up to here before they are saved.
        _save(ckpt, loop.stage, step, parallel.unreplicate(rstate),
              dict(meta or {}, position=log.position, nonfinite_steps=log.nonfinite))
      if stopping:
        completed = last
        break
    dog.mark("closing the checkpoints (waiting for the last save)")
    writer.flush()
    ckpt.close()
  return parallel.unreplicate(rstate), completed


def _save(ckpt: checkpointing.Checkpointer, stage: str, step: int, host_state: Any, meta: dict) -> None:
  if not guard.all_finite(host_state.params):  # Never write a poisoned state.
    raise FloatingPointError(f"{stage}: non-finite parameters at step {step}; not saved")
  ckpt.save(step, host_state, meta)


class _Log:
  """What the loop logs and saves besides the state: the step metrics not yet written, the count of skipped
  (non-finite) steps and the input position after the newest step."""

  def __init__(self, loop: LoopConfig, writer: Any, saved_meta: dict):
    self.loop, self.writer = loop, writer
    self.history: list = []
    self.nonfinite = int(saved_meta.get("nonfinite_steps", 0))
    self.position = saved_meta.get("position")

  def add(self, step: int, step_metrics: Any, *, write: bool) -> None:
    self.history.append(step_metrics)
    if write:
      self.write(step)

  def write(self, step: int) -> None:
    """Writes the scalars averaged since the last write and counts the skipped steps among them."""
    if not self.history:
      return
    fetched = [parallel.unreplicate(h) for h in self.history]
    self.history = []
    skipped = int(sum(1 for h in fetched if float(h["finite"]) < 1.0))
    if skipped:
      logging.warning("%s: %d non-finite step(s) skipped before step %d (%d in total)",
                      self.loop.stage, skipped, step, self.nonfinite + skipped)
    self.nonfinite += skipped
    finite = [h for h in fetched if float(h["finite"]) >= 1.0] or fetched
    scalars = {k: _nanmean([h[k] for h in finite]) for k in finite[0] if k != "finite"}
    scalars["nonfinite_steps"] = self.nonfinite
    self.writer.write_scalars(step, {f"{self.loop.stage}/{k}": v for k, v in scalars.items()})


def _nanmean(values: list) -> float:
  """Mean over the finite values (metrics such as per-t-bucket losses are NaN when a bucket was empty)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")
