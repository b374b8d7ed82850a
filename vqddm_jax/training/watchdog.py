"""The training watchdog: ends a process whose training loop stopped making progress.

A process can hang while alive: a read from GCS or NFS that never returns, a collective waiting for a host that
hangs. JAX's heartbeat never fires then (the process still answers), and the job would wait forever. The
watchdog is a thread beside the training loop. The loop marks each phase as it starts: a step (reading its
batch and running it), the logging and periodic work after it (held-out evaluation, image grids), a checkpoint
save. When one phase has lasted longer than `config.train_watchdog_minutes`, the watchdog prints what was
running and every thread's Python stack (where it hangs), ends every process of a multi-host job
(`job_end.end_every_process`) and exits with EXIT_STALLED. `launch/tpu.py watch` reruns a job that exited so;
the rerun resumes from the last checkpoint.

What it does not time: the first step of each run (it compiles the step, which can take many minutes on a pod),
and the stages without a training loop (encode, ReFiT's k-means, sample, inpaint, evaluate). Set the limit
above the longest phase: a held-out evaluation (whose first run also compiles the evaluation program) or a
checkpoint save. 0 turns the watchdog off.
"""
from __future__ import annotations

import faulthandler
import sys
import threading
import time

# EX_TEMPFAIL of sysexits.h ("try again later"); launch/tpu_vm.py's RESUMABLE_EXIT_CODES holds it too.
EXIT_STALLED = 75

_limit_minutes = 0.0  # Set at start-up from config.train_watchdog_minutes (`set_limit`).


def set_limit(minutes: float) -> None:
  """Sets the longest phase, in minutes, of every training loop that follows (0 = no watchdog)."""
  global _limit_minutes
  _limit_minutes = float(minutes)


class Watchdog:
  """Use as a context manager around a training loop; `mark(phase)` as each phase starts.

  Nothing is timed before the first `mark`; the thread runs only inside the `with` block.
  """

  def __init__(self, stage: str, minutes: float | None = None):
    self.stage = stage
    self.limit = 60.0 * (_limit_minutes if minutes is None else minutes)
    self._phase: tuple[str, float] | None = None  # (what, when it started): replaced whole, read whole
    self._halt = threading.Event()
    self._thread = threading.Thread(target=self._run, name=f"vqddm_jax.watchdog.{stage}", daemon=True)

  def __enter__(self) -> "Watchdog":
    if self.limit > 0:
      self._thread.start()
    return self

  def mark(self, phase: str) -> None:
    """Starts timing `phase` (e.g. "step 120"); the previous phase has ended."""
    self._phase = (phase, time.monotonic())

  def __exit__(self, *exc) -> None:
    self._halt.set()
    if self._thread.is_alive():
      self._thread.join()

  def _run(self) -> None:
    while not self._halt.wait(min(self.limit / 10, 10.0)):
      current = self._phase
      if current is not None and time.monotonic() - current[1] > self.limit:
        self._fire(*current)

  def _fire(self, phase: str, since: float) -> None:
    from vqddm_jax import job_end
    seconds = time.monotonic() - since
    message = (f"watchdog: {self.stage}: {phase} has not finished after {seconds / 60:.1f} min "
               f"({seconds:.0f} s; limit "
               f"config.train_watchdog_minutes = {self.limit / 60:g}); a hung read or collective? Exit "
               f"{EXIT_STALLED}: rerun the same command to resume from the last checkpoint")
    print(f"vqddm_jax: {message}\nvqddm_jax: the Python stacks of this process:", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    job_end.end_every_process(EXIT_STALLED, message)  # Returns on one process only.
    job_end.leave(EXIT_STALLED)
