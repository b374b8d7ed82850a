"""The config a work directory was made with (`W/config.json`), and which fields a rerun may change.

The first run in a work directory writes `W/config.json`: the resolved config, the code version and the date.
Every later run compares its config with it, field by field (dotted names such as `prior_train.optim.lr`):
- a field that **defines the run** (data, models, diffusion, losses, optimisers, seeds, codebook sizes: every
  field not in `MAY_CHANGE`) and differs stops the run before any work, naming each field with its stored and
  its new value; resuming a run on other data or with another learning rate would silently mix two runs;
- a field in `MAY_CHANGE` (step counts, intervals, sampling, evaluation, inpainting, where the data lives,
  devices and processes) is accepted: the change is logged, the stored config takes the new value and the
  file's `history` lists it.
`MAY_CHANGE` is the one table of that classification. `--mode=sample|inpaint|evaluate` without `--config`
runs on the stored config (`stored_config`). Like `config_schema`, this module imports no JAX.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
from typing import Any, Iterable, Mapping

import ml_collections

from vqddm_jax import files as files_lib

# Dotted-name patterns (fnmatch) of the fields a rerun may change, with why; every other field defines the run.
MAY_CHANGE: dict[str, str] = {
    "vqvae_train.num_steps": "train stage 1 further",
    "refit.num_steps": "fine-tune further",
    "prior_train.num_steps": "train the prior further",
    "ar_train.num_steps": "train the autoregressive prior further",
    "ar_train.enabled": "add the autoregressive prior to a run (its own stage and folder, W/ar/)",
    "*.log_every": "logging interval",
    "*.checkpoint_every": "checkpoint interval",
    "*.image_every": "reconstruction-image interval",
    "*.eval_every": "held-out evaluation interval",
    "*.eval_examples": "held-out evaluation size (measures, does not train)",
    "prior_train.eval_t_samples": "held-out −ELBO estimate size (measures, does not train)",
    "*.keep_checkpoints": "how many checkpoints are kept",
    "encode.*": "encoding batch size (the same code maps)",
    "sample.*": "sampling settings (outputs are named by them)",
    "ar_sample.*": "the AR prior's sampling settings (outputs are named or record them)",
    "inpaint.*": "inpainting settings (outputs are named by them)",
    "edit.*": "editing settings (the edit record records them)",
    "eval.*": "evaluation settings (the report records them)",
    "data.data_dir": "where the prepared TFDS data set is stored",
    "data.manual_dir": "where TFDS finds manually downloaded files",
    "data.prefetch": "input prefetch depth",
    "distributed.*": "which processes and coordinator run the job",
    "cpu_devices": "how many XLA CPU devices one host uses",
    "ordered_reductions": "the order of cross-device sums (reproducibility checks)",
    "train_watchdog_minutes": "the stalled-step watchdog",
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` → `{"a.b": 1}`, values as JSON would store them (tuples become lists)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{name}."))
    else:
      out[name] = json.loads(json.dumps(value, default=_json_default))
  return out


def may_change(field: str) -> bool:
  """Whether a rerun may give `field` (a dotted name) another value than the stored config."""
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in MAY_CHANGE)


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The resolved config as plain JSON values (what `W/config.json` stores)."""
  return json.loads(json.dumps(config.to_dict(), default=_json_default))


def compare(stored: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list, list]:
  """Differences between two configs given as nested dicts: (refused, accepted), each a sorted list of
  `(field, stored value, new value)`. A field the stored config lacks (added by newer code) is accepted with
  its value; one the current config lacks (removed from the code) is ignored."""
  old, new = flatten(stored), flatten(current)
  refused, accepted = [], []
  for field in sorted(new):
    if field in old and old[field] == new[field]:
      continue
    entry = (field, old.get(field, "(not stored)"), new[field])
    (accepted if field not in old or may_change(field) else refused).append(entry)
  return refused, accepted


def new_record(config: ml_collections.ConfigDict, code_version: str) -> dict:
  """The content of a new `W/config.json`."""
  return {"config": config_dict(config), "code_version": code_version, "created": _now(), "history": []}


def updated_record(record: Mapping[str, Any], config: ml_collections.ConfigDict, accepted: Iterable,
                   code_version: str) -> dict:
  """`record` with the accepted changes applied and listed in its history."""
  changes = {field: [old, new] for field, old, new in accepted}
  history = list(record.get("history", [])) + [
      {"date": _now(), "code_version": code_version, "changed": changes}]
  return dict(record, config=config_dict(config), history=history)


def refusal_message(path: Any, refused: list) -> str:
  """The one-paragraph error for fields that define the run and differ from the stored config."""
  lines = [f"  {field}: stored {old!r}, now {new!r}" for field, old, new in refused[:20]]
  more = f"\n  (and {len(refused) - 20} more)" if len(refused) > 20 else ""
  return (f"this work directory was made with another config ({path}); these fields define the run and "
          "differ:\n" + "\n".join(lines) + more + "\nuse a new --workdir for a new run, or the config "
          "(and --config overrides) it was made with; `--mode=sample|inpaint|evaluate` without --config "
          "uses the stored one")


def as_config(stored: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from the `config` entry of `W/config.json` (JSON lists back to the tuples configs use).

  A field the stored config lacks (added by newer code, such as `sample.guidance_scale`) takes its default from
  `config_schema.base_config`, as `compare` accepts it: every added field's default keeps what older code did."""
  from vqddm_jax import config_schema  # JAX-free, like this module.
  return ml_collections.ConfigDict(_with_defaults(config_schema.base_config().to_dict(), _tuples(dict(stored))))


def _with_defaults(defaults: Mapping[str, Any], stored: Mapping[str, Any]) -> dict:
  """`stored` with the fields only `defaults` has added (recursively into sections both have)."""
  out = dict(stored)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
      out[key] = _with_defaults(value, out[key])
  return out


def _tuples(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _json_default(value: Any) -> Any:
  if isinstance(value, tuple):
    return list(value)
  if hasattr(value, "item"):  # NumPy scalars.
    return value.item()
  raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-able")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_or_record(config: ml_collections.ConfigDict, workdir: Any, *, code_version: str,
                    write: bool) -> list:
  """Compares `config` with `W/config.json` (writing it on the first run); returns the accepted changes.

  Args:
    config: the validated config of this run.
    workdir: the run's `Workdir`.
    code_version: `code_version.code_version()` of the running code.
    write: whether this process writes the file (process 0 of a job; every process compares).

  Raises:
    MismatchError: a field that defines the run differs (each named, with both values), or the file is not
      a config record.
  """
  from vqddm_jax.errors import MismatchError
  path = workdir.config_json
  try:
    record = files_lib.read_json(path)
  except ValueError as e:
    raise MismatchError(f"{path} is not valid JSON ({e}): it should hold the config this work directory was "
                        "made with; restore it, or use a new --workdir") from None
  if record is None:
    if write:
      files_lib.write_json(path, new_record(config, code_version))
    return []
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise MismatchError(f"{path} does not hold a config record (no 'config' object): restore it, or use a "
                        "new --workdir")
  refused, accepted = compare(record["config"], config_dict(config))
  if refused:
    raise MismatchError(refusal_message(path, refused))
  if accepted and write:
    files_lib.write_json(path, updated_record(record, config, accepted, code_version))
  return accepted


def stored_config(workdir: Any) -> ml_collections.ConfigDict:
  """The config in `W/config.json` (for runs given no --config).

  Raises:
    MissingInputError: the work directory has no stored config.
  """
  from vqddm_jax.errors import MismatchError, MissingInputError
  path = workdir.config_json
  try:
    record = files_lib.read_json(path)
  except ValueError as e:
    raise MismatchError(f"{path} is not valid JSON ({e}): pass --config") from None
  if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
    raise MissingInputError(f"no stored config in {workdir.root} ({path} is missing): pass --config=FILE "
                            "(a work directory stores its config on its first run)")
  return as_config(record["config"])
