"""The only module that calls Orbax.

A checkpoint holds one Orbax item per field of a train-state dataclass (`step`, `params`, `ema_params`,
`opt_state`, and stage extras such as the importance-sampling history), plus a JSON item `meta` (the input
iterator's position, the number of skipped non-finite steps, the config it was written with). Storing fields
as separate items lets sampling and later stages restore `ema_params` alone, read-only.

Directories are `etils.epath.Path`s (local or `gs://`); on multi-host jobs every process calls `save` and
Orbax writes each array from the process that holds it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vqddm_jax.errors import MismatchError, MissingInputError

META = "meta"
_MISMATCH_HINT = ("the work directory was made with another config: use a new --workdir, or the config "
                  "(and --config overrides) it was made with")


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
    except (ValueError, KeyError, TypeError) as e:
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
    except (ValueError, KeyError, TypeError) as e:
      raise MismatchError(f"item '{name}' of checkpoint {self.directory}/{step} does not match the current "
                          f"config ({type(e).__name__}: {_first_line(e)}); {_MISMATCH_HINT}") from e
    _check_shapes(restored, abstract, f"{self.directory}/{step}/{name}")
    return restored

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._require_step(step)
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META] or {})

  def close(self) -> None:
    self._manager.close()

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise MissingInputError(f"no checkpoint found under {self.directory}")
    return step


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
