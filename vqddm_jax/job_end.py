"""Every process of a multi-host job ends when one of them cannot go on, within seconds.

Without this, the others wait in their next collective: JAX notices a process that died only after
`config.distributed.heartbeat_timeout` seconds, and one that is alive but leaving (it printed a user error and
waits in JAX's shutdown barrier for the others) only after `config.distributed.shutdown_timeout`; a process that
hangs alive is never noticed (the training watchdog covers that, `training/watchdog.py`).

The protocol runs over the key-value store of JAX's coordination service (served by process 0), under `PREFIX`:
- the process that ends the job (a user error in `main`, an uncaught exception, the training watchdog) writes
  `end/<its index>` = {"code", "message"} (`end_every_process`);
- every other process polls `end/` every POLL_SECONDS in a daemon thread, which runs while the main thread waits
  in a collective; seeing a record it prints which process ended the job and why, writes `ack/<its index>` and
  ends with the same exit code;
- an ending process waits (WAIT_SECONDS at most) until every process wrote `end/` or `ack/`, naming those that
  did not (dead, or hung where no Python runs), writes `done/<its index>` and leaves with `os._exit`: not
  through JAX's shutdown barrier, which would wait for every process. Process 0 leaves last, after every
  `done/`: its exit takes the coordination service down, and JAX aborts any process still connected to it.
A process killed outright (SIGKILL, a lost host) writes nothing: JAX's heartbeat ends the others after
`heartbeat_timeout` ("Terminating process because the JAX distributed service detected fatal errors").

On one process nothing here runs: `end_every_process` returns at once.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from typing import Any

PREFIX = "vqddm_jax/job_end/"
# Each process reads the store once per interval: one small request a second per host.
POLL_SECONDS = 1.0
# How long an ending process waits for the others to answer before it leaves anyway.
WAIT_SECONDS = 10.0
EXIT_CRASH = 1  # an uncaught exception (Python's own exit code for one)

_ending = threading.Lock()  # taken by whichever path ends this process first; never released
_monitor: "_Monitor | None" = None


def _say(message: str) -> None:
  print(f"vqddm_jax: {message}", file=sys.stderr, flush=True)


_before_leaving: list = []


def before_leaving(callback: Any) -> None:
  """Registers `callback()` to run when `leave` ends this process (e.g. releasing the work-directory lock,
  which `os._exit` would otherwise leave behind for the next job to find stale)."""
  _before_leaving.append(callback)


def leave(code: int) -> None:
  """Flushes the logs and ends this process with `code` at once, whatever its other threads are doing."""
  from absl import logging
  for callback in _before_leaving:
    try:
      callback()
    except Exception:  # noqa: BLE001  Leaving must not fail; the lock is then taken over as stale.
      pass
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  # Past a hung collective, nothing else ends a process.


class _Monitor(threading.Thread):
  """Follows the other processes' `end/` records; ends this process like the first one it sees."""

  def __init__(self, client: Any, index: int, count: int):
    super().__init__(name="vqddm_jax.job_end", daemon=True)
    self.client, self.index, self.count = client, index, count
    self._halt = threading.Event()

  def _indices(self, kind: str) -> dict[int, str]:
    return {int(key.rsplit("/", 1)[1]): value
            for key, value in self.client.key_value_dir_get(PREFIX + kind)}

  def run(self) -> None:
    while not self._halt.wait(POLL_SECONDS):
      try:
        records = {i: r for i, r in self._indices("end/").items() if i != self.index}
      except Exception:  # pylint: disable=broad-except  # The service is gone: JAX ends this process itself.
        return
      if records and _ending.acquire(blocking=False):
        first = min(records)
        record = json.loads(records[first])
        _say(f"process {first} of {self.count} ended the job (exit {record['code']}): {record['message']}\n"
             f"vqddm_jax: process {self.index} ends too")
        self.finish(record["code"], "ack/", "")

  def finish(self, code: int, kind: str, value: str) -> None:
    """Writes this process's record, waits for the others' (see the module doc) and exits with `code`."""
    deadline = time.monotonic() + WAIT_SECONDS
    try:
      self.client.key_value_set(f"{PREFIX}{kind}{self.index}", value)
      missing = self._wait(("end/", "ack/"), deadline)
      if missing:
        _say(f"process(es) {', '.join(map(str, missing))} did not answer within {WAIT_SECONDS:.0f} s: dead, or "
             "hung where Python cannot run")
      self.client.key_value_set(f"{PREFIX}done/{self.index}", "")
      if self.index == 0:  # Last: the others must not lose the service before they are done.
        self._wait(("done/",), deadline)
        time.sleep(0.2)
    except Exception as e:  # pylint: disable=broad-except  # Cannot reach the service: leave all the same.
      _say(f"could not reach the other processes ({type(e).__name__}); leaving")
    leave(code)

  def _wait(self, kinds: tuple[str, ...], deadline: float) -> list[int]:
    """Waits until every other process has a record of one of `kinds`; returns those that had none."""
    while True:
      seen = set().union(*(self._indices(k) for k in kinds))
      missing = [i for i in range(self.count) if i != self.index and i not in seen]
      if not missing or time.monotonic() > deadline:
        return missing
      time.sleep(0.1)

  def halt(self) -> None:
    """At a normal exit: stops polling and waits for the thread, as no thread may be inside a request when the
    interpreter finalises (Python would unwind it through C++ frames and abort)."""
    _ending.acquire()  # Nothing ends this process from now on; if something is ending it, this waits for that.
    self._halt.set()
    self.join(timeout=2 * POLL_SECONDS + 5)


def start() -> None:
  """Starts following the other processes (after `jax.distributed.initialize`, on multi-process jobs), and makes
  an uncaught exception end every process."""
  global _monitor
  import jax
  from jax._src import distributed  # JAX has no public key-value API; Orbax uses the same client.
  if _monitor is not None or jax.process_count() == 1:
    return
  _monitor = _Monitor(distributed.global_state.client, jax.process_index(), jax.process_count())
  _monitor.start()
  atexit.register(_monitor.halt)  # Registered after JAX's own exit handler, so it runs before it.
  previous = sys.excepthook

  def excepthook(kind, value, traceback):
    if not _ending.locked():  # Else another process ended the job, and this error (a broken collective) follows.
      previous(kind, value, traceback)
    text = str(value).strip()
    end_every_process(EXIT_CRASH, f"{kind.__name__}: {text.splitlines()[0] if text else ''}")

  sys.excepthook = excepthook


def end_every_process(code: int, message: str) -> None:
  """Ends every process of the job with exit code `code`, `message` saying why; never returns on a multi-process
  job. Returns at once on one process (or before `start`).

  Args:
    code: this process's exit code, which the others take too (2: a user error; 75: the watchdog).
    message: one line for the other processes' logs (this process prints its own message itself).
  """
  if _monitor is None:
    return
  _ending.acquire()  # When the monitor is already ending this process, this waits for its exit.
  _monitor.finish(code, "end/", json.dumps({"code": int(code), "message": message}))
