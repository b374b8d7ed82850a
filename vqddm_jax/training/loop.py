"""The training loop every stage shares: resume, step, log, checkpoint, stop on SIGTERM (on any host).

A stage supplies its initial host state, its pmapped step `(state, batch, key) -> (state, metrics)`, and a
function that opens its input iterator at a saved position. Everything the next step depends on — the state,
the iterator position, the step count (keys are `fold_in(base_key, step)` inside the step) — is in the
checkpoint, so a resumed run reaches exactly the parameters of an uninterrupted one. Progress (steps/s, ETA)
and the stage's periodic work (image grids, held-out evaluation) run as clu periodic actions. A watchdog ends
the job when one phase (a step, the periodic work after it, a checkpoint save) hangs (`training/watchdog.py`).
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

from vqddm_jax import checkpointing, metrics, parallel
from vqddm_jax.training import watchdog

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


def _device_batches(batches: Any, size: int) -> Iterator[tuple[Any, Any]]:
  """Yields (device batch, iterator position after it), keeping `size` batches in flight."""
  queue = collections.deque()
  for batch in batches:
    queue.append((parallel.to_devices(batch), dict(batches.position)))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


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
        periodic: Sequence[Periodic] = (), meta: dict | None = None) -> tuple[Any, bool]:
  """Trains until `loop.num_steps`, resuming from the latest checkpoint under `loop.directory`.

  Args:
    loop: static loop settings.
    init_state: host train state (a dataclass with an integer `step` field) used when nothing is saved.
    p_step: pmapped step `(replicated_state, device_batch, key) -> (replicated_state, metrics)`; metrics are
      already averaged over devices and include `finite` (1.0 when the update was applied).
    open_batches: `position -> iterator` of host batches `[local_devices, b, ...]` exposing `.position`.
    key: the run's base key (the step folds in the step number).
    writer: a clu metric writer.
    periodic: (every, fn) pairs, e.g. image grids and held-out evaluation.
    meta: extra JSON-able facts stored in every checkpoint.

  Returns:
    (host state, completed): completed is False when SIGTERM stopped the run early.
  """
  ckpt = checkpointing.Checkpointer(loop.directory, max_to_keep=loop.keep_checkpoints)
  state, saved_meta = restore_or_init(ckpt, init_state)
  step = int(state.step)
  nonfinite = int(saved_meta.get("nonfinite_steps", 0))
  if step >= loop.num_steps:
    ckpt.close()
    return state, True
  batches = open_batches(saved_meta.get("position"))
  rstate = parallel.replicate(state)
  progress = periodic_actions.ReportProgress(num_train_steps=loop.num_steps, writer=writer,
                                             every_steps=loop.log_every, every_secs=None)
  actions = [periodic_actions.PeriodicCallback(
      every_steps=every, on_steps=[loop.num_steps],
      callback_fn=lambda step, t, rstate, fn=fn: fn(step, rstate)) for every, fn in periodic]
  history, position = [], saved_meta.get("position")

  def save(at_step: int) -> None:
    host = parallel.unreplicate(rstate)
    if not metrics.all_finite(host.params):  # Never write a poisoned state.
      raise FloatingPointError(f"{loop.stage}: non-finite parameters at step {at_step}; not saved")
    ckpt.save(at_step, host, dict(meta or {}, position=position, nonfinite_steps=nonfinite))

  completed, first = True, step
  # Each phase of the loop must end within config.train_watchdog_minutes (training/watchdog.py).
  with parallel.StopAgreement() as stop, watchdog.Watchdog(loop.stage) as dog:
    device_batches = _device_batches(batches, loop.prefetch)
    while step < loop.num_steps:
      if step > first:  # The first step of a run compiles it: not timed.
        dog.mark(f"step {step + 1} (its batch, its computation, the logging after it)")
      batch, position = next(device_batches)
      rstate, step_metrics = p_step(rstate, batch, key)
      step += 1
      history.append(parallel.first_local(step_metrics))
      last = step == loop.num_steps
      if step % loop.log_every == 0 or last:
        nonfinite = _log(loop, writer, step, history, nonfinite)
        history = []
      progress(step)
      if last or any(step % every == 0 for every, _ in periodic):
        dog.mark(f"the periodic work after step {step} (held-out evaluation, image grids)")
      for action in actions:
        action(step, rstate=rstate)
      stopping = stop.reached(step)  # The same answer on every host.
      if step % loop.checkpoint_every == 0 or last or stopping:
        dog.mark(f"the checkpoint save at step {step}")
        if history:  # Count skipped steps up to here before they are saved.
          nonfinite = _log(loop, writer, step, history, nonfinite)
          history = []
        save(step)
      if stopping:
        completed = last
        break
    dog.mark("closing the checkpoints (waiting for the last save)")
    writer.flush()
    ckpt.close()
  return parallel.unreplicate(rstate), completed


def _log(loop: LoopConfig, writer: Any, step: int, history: list, nonfinite: int) -> int:
  """Writes the scalars averaged since the last log; returns the updated count of skipped steps."""
  fetched = [parallel.unreplicate(h) for h in history]
  skipped = int(sum(1 for h in fetched if float(h["finite"]) < 1.0))
  if skipped:
    logging.warning("%s: %d non-finite step(s) skipped before step %d (%d in total)",
                    loop.stage, skipped, step, nonfinite + skipped)
  nonfinite += skipped
  finite = [h for h in fetched if float(h["finite"]) >= 1.0] or fetched
  scalars = {k: _nanmean([h[k] for h in finite]) for k in finite[0] if k != "finite"}
  scalars["nonfinite_steps"] = nonfinite
  writer.write_scalars(step, {f"{loop.stage}/{k}": v for k, v in scalars.items()})
  return nonfinite


def _nanmean(values: list) -> float:
  """Mean over the finite values (metrics such as per-t-bucket losses are NaN when a bucket was empty)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")
