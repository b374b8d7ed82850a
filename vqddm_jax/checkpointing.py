"""The only module that calls Orbax.

A checkpoint holds one Orbax item per field of a train-state dataclass (`step`, `params`, `ema_params`,
`opt_state`, and stage extras such as the importance-sampling history), plus a JSON item `meta` (the input
iterator's position, the number of skipped non-finite steps, the config it was written with). Storing fields
as separate items lets sampling and later stages restore `ema_params` alone, read-only.

Directories are `etils.epath.Path`s (local or `gs://`); on multi-host jobs every process calls `save` and
Orbax writes each array from the process that holds it.

A step that cannot be read whatever the model (a truncated or garbled file, an empty `_METADATA`, a missing
item) is *corrupt*, told apart from a config mismatch (arrays of other shapes) by reading its items as stored.
A corrupt step is named (step, item, file) and moved to `<stage>/corrupt_checkpoints/`: resuming
(`restore_resumable`) then goes on from the previous kept step with a warning, and a stage that only reads
the step stops, telling the user that rerunning retrains from the previous one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vqddm_jax.errors import MismatchError, MissingInputError, UserError

META = "meta"
_MISMATCH_HINT = ("the work directory was made with another config: use a new --workdir, or the config "
                  "(and --config overrides) it was made with")


class CorruptCheckpointError(UserError):
  """A checkpoint step whose files cannot be read (not a config mismatch)."""

  def __init__(self, directory: epath.Path, step: int, why: str):
    where = f"checkpoint step {step} under {directory} is corrupt" if step >= 0 else f"{directory}: "
    super().__init__(f"{where}: {why}" if step >= 0 else f"{where}{why}")
    self.directory, self.step, self.why = directory, step, why


def _field_names(state: Any) -> list[str]:
  return [f.name for f in dataclasses.fields(state)]


class Checkpointer:
  """Saves and restores a stage's train state under `directory` (one sub-folder per step)."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, read_only: bool = False):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Writes `state` (host arrays, not replicated) and the JSON-able `meta` as checkpoint `step`."""
    # Each field is wrapped in a one-key dict: Orbax's standard handler refuses a bare scalar (`step`).
    items = {n: ocp.args.StandardSave({n: getattr(state, n)}) for n in _field_names(state)}
    items[META] = ocp.args.JsonSave(dict(meta or {}))
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()
    logging.info("saved checkpoint %d under %s", step, self.directory)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores every field of `abstract_state` (a state of `jax.ShapeDtypeStruct`s or arrays) and `meta`.

    Raises:
      MissingInputError: no checkpoint under the directory.
      MismatchError: the stored arrays do not match the shapes of `abstract_state` (config mismatch).
    """
    step = self._require_step(step)
    names = _field_names(abstract_state)
    items = {n: ocp.args.StandardRestore({n: _as_abstract(getattr(abstract_state, n))}) for n in names}
    items[META] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, OSError) as e:
      self._raise_if_corrupt(step, [*names, META])
      raise MismatchError(f"checkpoint {self.directory}/{step} does not match the model of the current "
                          f"config ({type(e).__name__}: {_first_line(e)}); {_MISMATCH_HINT}") from e
    state = abstract_state.replace(**{n: restored[n][n] for n in names})
    _check_shapes(state, abstract_state, f"{self.directory}/{step}")
    return state, dict(restored[META] or {})

  def restore_item(self, name: str, abstract: Any, step: int | None = None) -> Any:
    """Restores one named item (e.g. `ema_params`) of checkpoint `step` (default: latest)."""
    step = self._require_step(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(
              **{name: ocp.args.StandardRestore({name: _as_abstract(abstract)})}))[name][name]
    except (ValueError, KeyError, TypeError, OSError) as e:
      self._raise_if_corrupt(step, [name])
      raise MismatchError(f"item '{name}' of checkpoint {self.directory}/{step} does not match the current "
                          f"config ({type(e).__name__}: {_first_line(e)}); {_MISMATCH_HINT}") from e
    _check_shapes(restored, abstract, f"{self.directory}/{step}/{name}")
    return restored

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._require_step(step)
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META] or {})

  def restore_resumable(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """`restore` of the newest readable step, or None when no step is left. Newer corrupt steps are moved
    to `corrupt_checkpoints/` with a warning naming the step and the file (every process of a job sees the
    same files, so every process falls back to the same step)."""
    moved = []
    while (step := self.latest_step()) is not None:
      try:
        return self.restore(abstract_state, step)
      except CorruptCheckpointError as e:
        moved.append(set_aside(self.directory, step))
        logging.warning("%s; moved it to %s and resuming from the previous kept step %s", e, moved[-1],
                        self._previous_step(step))
        self._manager.reload()
    if moved:  # Starting afresh here could skip work a stage did before its first step (ReFiT's k-means).
      raise CorruptCheckpointError(self.directory, -1, f"every kept step was corrupt and is moved away "
                                   f"({', '.join(map(str, moved))}): rerun the same command to start the "
                                   "stage again")
    return None

  def _previous_step(self, step: int) -> int | None:
    older = [s for s in self.all_steps() if s < step]
    return max(older) if older else None

  def _raise_if_corrupt(self, step: int, names: list[str]) -> None:
    why = corruption(self.directory, step, names)
    if why is not None:
      raise CorruptCheckpointError(self.directory, step, why)

  def close(self) -> None:
    self._manager.close()

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise MissingInputError(f"no checkpoint found under {self.directory}")
    return step


def corruption(directory: str | os.PathLike, step: int, names: list[str]) -> str | None:
  """Why items `names` of checkpoint `step` cannot be read whatever the model (naming the item and file), or
  None when they read as stored (a failed restore is then a config mismatch)."""
  step_dir = epath.Path(directory) / str(step)
  for name in names:
    item = step_dir / name
    if not item.exists():
      return f"its item '{name}' is missing ({item})"
    bad = _unreadable_files(item)
    if bad:
      return f"{bad} (item '{name}')"
    if name == META:  # A JSON item: `_unreadable_files` parsed it.
      continue
    try:
      with ocp.StandardCheckpointer() as reader:
        reader.restore(item)
    except Exception as e:  # noqa: BLE001  Any failure to read the stored bytes is corruption.
      return f"item '{name}' cannot be read ({type(e).__name__}: {_first_line(e)[:300]})"
  return None


def _unreadable_files(item: epath.Path) -> str | None:
  """The first empty file, or metadata file that is not JSON, under an item folder (cheap checks first)."""
  for path in _files_under(item):
    if path.stat().length == 0 and path.name != "commit_success.txt":
      return f"{path} is empty"
    if path.name in ("_METADATA", "_sharding", "metadata") or path.suffix == ".json":
      try:
        json.loads(path.read_text())
      except ValueError:
        return f"{path} is not valid JSON"
  return None


def _files_under(folder: epath.Path) -> list[epath.Path]:
  """Every file below `folder`, in sorted order (epath's `rglob` is refused on object stores)."""
  files = []
  for path in sorted(folder.iterdir()):
    files.extend(_files_under(path) if path.is_dir() else [path])
  return files


def set_aside(directory: str | os.PathLike, step: int) -> epath.Path:
  """Moves corrupt step `step` out of `directory` to `<directory>/../corrupt_checkpoints/<step>[.n]` (process
  0 moves it, every process waits), so that Orbax lists the previous step as the latest; returns the target."""
  directory = epath.Path(directory)
  target_dir = directory.parent / "corrupt_checkpoints"
  target, n = target_dir / str(step), 1
  while target.exists():
    target, n = target_dir / f"{step}.{n}", n + 1
  _sync(f"set aside {directory}/{step}")
  if jax.process_index() == 0:
    target_dir.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(target)
  _sync(f"set aside {directory}/{step}: done")
  return target


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest checkpoint step under `directory`, or None (read-only; nothing is created)."""
  if not epath.Path(directory).exists():
    return None
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def restore_latest_ema(directory: str | os.PathLike, abstract: Any, *,
                       missing_hint: str) -> tuple[Any, int]:
  """Read-only restore of `ema_params` from the latest checkpoint under `directory`: (params, step).

  Raises:
    MissingInputError: no checkpoint there (the message ends with `missing_hint`, e.g. which mode makes it).
    MismatchError: the stored arrays do not fit `abstract`.
  """
  step = latest_step(directory)
  if step is None:
    raise MissingInputError(f"no checkpoint under {directory}: {missing_hint}")
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.restore_item("ema_params", abstract, step), int(step)
  except CorruptCheckpointError as e:
    moved = set_aside(directory, step)
    raise CorruptCheckpointError(e.directory, step, f"{e.why}. It is moved to {moved}: rerun the same "
                                 "command, and the stage that wrote it trains again from its previous "
                                 "kept step") from None
  finally:
    ckpt.close()


def has_item(directory: str | os.PathLike, name: str, step: int) -> bool:
  """Whether checkpoint `step` under `directory` holds an item `name` (e.g. a stage-extra field)."""
  return (epath.Path(directory) / str(step) / name).exists()


def read_item(directory: str | os.PathLike, name: str, step: int | None = None) -> Any:
  """One item (e.g. `ema_params`) of checkpoint `step` (default: latest) as stored, as host arrays; for
  inspecting and comparing checkpoints without building the model."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise MissingInputError(f"no checkpoint under {directory}")
  item = epath.Path(directory) / str(step) / name
  with ocp.StandardCheckpointer() as reader:
    return jax.device_get(reader.restore(item))[name]


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _as_abstract(tree: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _check_shapes(restored: Any, abstract: Any, where: str) -> None:
  got = jax.tree_util.tree_map(np.shape, restored)
  want = jax.tree_util.tree_map(np.shape, abstract)
  if got != want:
    raise MismatchError(f"checkpoint {where} does not match the current config (its array shapes differ); "
                        f"{_MISMATCH_HINT}")
