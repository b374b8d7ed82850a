"""One job at a time in a work directory: `W/lock.json`, taken by process 0 of a job before any stage runs.

Two jobs in one work directory would interleave their checkpoint saves and overwrite each other's outputs. The
lock file names its holder (host, process id, command, start) and carries a heartbeat that a thread of the
holder renews every `heartbeat_seconds`. A job finding a lock stops with exit 2 naming the holder, unless the
lock is stale: its holder ran on this host and is no longer alive, or its heartbeat is older than
`stale_seconds` (a holder on another host, or a job killed with its machine, as when a TPU VM is preempted).
A stale lock is taken over with a warning. On local disks the lock is created atomically (O_EXCL); on object
stores (gs://) two jobs starting within the same second could both pass, which the re-read after writing
narrows but cannot close.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from vqddm_jax import files as files_lib
from vqddm_jax.errors import MismatchError

HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 300.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


def stale_reason(holder: dict, *, now: float, stale_seconds: float) -> str | None:
  """Why the lock of `holder` may be taken over, or None while its job may still run."""
  age = now - float(holder.get("heartbeat", 0))
  if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
    return f"process {holder.get('pid')} on this host ({holder.get('host')}) is no longer running"
  if age > stale_seconds:
    return f"its last heartbeat was {age:.0f} s ago (stale after {stale_seconds:.0f} s)"
  return None


def describe(holder: dict, now: float) -> str:
  return (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
          f"({holder.get('command', '?')}), last heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago")


class WorkdirLock:
  """The lock of one work directory; `acquire()` before the stages run, `release()` after (or use `with`)."""

  def __init__(self, path: epath.Path, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS):
    self.path = path
    self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> dict:
    return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(sys.argv[:1] + [a for a in sys.argv[1:] if a.startswith("--mode")])[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "heartbeat": time.time()}

  def _read(self) -> dict | None:
    try:
      holder = files_lib.read_json(self.path)
    except ValueError:  # Half-written by a job that died: nobody holds it.
      logging.warning("%s is not valid JSON: taking it over", self.path)
      return None
    return holder if isinstance(holder, dict) else None

  def acquire(self) -> None:
    """Takes the lock, or raises MismatchError naming the job that holds it."""
    holder = self._read()
    if holder is not None:
      now = time.time()
      reason = stale_reason(holder, now=now, stale_seconds=self.stale_seconds)
      if reason is None:
        raise MismatchError(
            f"another job runs in this work directory: {describe(holder, now)} ({self.path}). Wait for it to "
            f"end, or stop it; if it is gone, the lock is taken over once its heartbeat is "
            f"{self.stale_seconds:.0f} s old (or delete {self.path})")
      logging.warning("taking over the stale lock %s of %s: %s", self.path, describe(holder, now), reason)
      self.path.unlink(missing_ok=True)
    self._write_new()
    if (self._read() or {}).get("token") != self.token:
      raise MismatchError(f"another job took {self.path} at the same moment; wait for it to end")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _write_new(self) -> None:
    data = (json.dumps(self._record(), indent=1) + "\n").encode()
    if "://" in str(self.path):
      files_lib.write_bytes(self.path, data)
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    try:  # Atomic on local and network file systems: only one job creates the file.
      fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      raise MismatchError(f"another job took {self.path} at the same moment; wait for it to end") from None
    with os.fdopen(fd, "wb") as f:
      f.write(data)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_seconds):
      holder = self._read()
      if holder is None or holder.get("token") != self.token:
        logging.warning("lost the work-directory lock %s (removed or taken over by another job)", self.path)
        return
      holder["heartbeat"] = time.time()
      files_lib.write_json(self.path, holder)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this job's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    holder = self._read()
    if holder is not None and holder.get("token") == self.token:
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
