"""What every process of a multi-host job must agree on, checked by gathering each process's view.

The code and config the processes run (`main`), the files each lists in an image folder (`data.folder`),
whether a stage is done (`stages.run_stage`), and decisions one process makes for the job (taking the
work-directory lock). A disagreement raises MismatchError on every process, naming which process has which
value, so that every host stops with one message instead of hanging in a collective. On one process every
check passes at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from vqddm_jax.errors import MismatchError
from vqddm_jax.parallel import gather_processes, gather_rows


def _texts_of_all_processes(text: str) -> list[str]:
  data = np.frombuffer(text.encode(), np.uint8)
  rows = gather_rows(np.pad(data, (0, 1)))  # a NUL ends each process's text
  return [part.decode() for part in rows.tobytes().split(b"\0")[:-1]]


def _differing(entries: Mapping[str, Any]) -> list[str]:
  """One line per entry (JSON-able values by name, the same names on every process) whose value differs
  between processes: each value with the processes that have it, e.g. `train: '5 files' on processes 0, 2-3;
  '4 files' on process 1`."""
  mine = json.dumps(dict(entries), sort_keys=True, default=str)
  everyone = [json.loads(t) for t in _texts_of_all_processes(mine)]
  lines = []
  for k in sorted(set().union(*everyone)):
    holders: dict[str, list[int]] = {}
    for i, e in enumerate(everyone):
      holders.setdefault(json.dumps(e.get(k)), []).append(i)
    if len(holders) > 1:
      lines.append(f"  {k}: " + "; ".join(f"{json.loads(v)!r} on {_processes(ix)}" for v, ix in holders.items()))
  return lines[:10]


def _processes(indices: list[int]) -> str:
  """`[0, 1, 2, 5]` -> 'processes 0-2, 5'."""
  runs: list[list[int]] = []
  for i in indices:
    if runs and i == runs[-1][1] + 1:
      runs[-1][1] = i
    else:
      runs.append([i, i])
  text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
  return f"process{'es' if len(indices) > 1 else ''} {text}"


def check_same_on_every_process(what: str, entries: Mapping[str, Any]) -> None:
  """Raises MismatchError naming every entry whose value differs between processes (and which process has
  which value).

  Args:
    what: what is compared, for the message (e.g. "code", "config").
    entries: JSON-able values by name; every process passes the same names.
  """
  if jax.process_count() == 1:
    return
  if lines := _differing(entries):
    raise MismatchError(f"the processes of this job do not run the same {what}:\n" + "\n".join(lines) +
                        "\nstart every host from the same code and command line")


def check_same_files(what: str, groups: Mapping[str, Sequence[str]], root: str) -> None:
  """Raises MismatchError unless every process has the same files in each group: the count and a SHA-256 of
  the sorted paths relative to `root`. Hosts that list a folder differently (a transient NFS or gcsfuse
  error) would cut different batches, or hang when they make different numbers of steps."""
  def summary(paths: Sequence[str]) -> str:
    rel = "\0".join(sorted(os.path.relpath(p, root) for p in paths)).encode()
    return f"{len(paths)} files, sha256 {hashlib.sha256(rel).hexdigest()[:12]}"
  # Without jax.distributed there is one process (asked first: process_count() would start the backend).
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  if lines := _differing({g: summary(paths) for g, paths in groups.items()}):
    raise MismatchError(f"the processes of this job do not see the same files in {what}:\n" + "\n".join(lines)
                        + "\na folder that differs between hosts, or a file system error while listing (NFS, "
                        "gcsfuse): make every host see the same files, then rerun")


def raise_if_any_process_failed(error: str) -> None:
  """Raises MismatchError on every process when any process passes a non-empty `error` (a decision one
  process makes for the job, such as taking the work-directory lock): the first such message, with its
  process when there are several."""
  if jax.process_count() == 1:
    texts = [error]
  else:
    texts = _texts_of_all_processes(error)
  failed = [(i, t) for i, t in enumerate(texts) if t]
  if failed:
    index, text = failed[0]
    raise MismatchError(text if jax.process_count() == 1 else f"(process {index}) {text}")


def same_on_every_process(flag: bool, what: str) -> bool:
  """`flag`, after checking that every process has the same value (a decision all hosts must share)."""
  flags = gather_processes(np.array(bool(flag)))
  if len(set(flags.tolist())) > 1:
    raise MismatchError(f"the hosts disagree on {what} ({flags.tolist()} by process): they do not see the "
                        "same work directory; on several hosts it must be shared (gs://... or a shared "
                        "file system)")
  return bool(flag)
