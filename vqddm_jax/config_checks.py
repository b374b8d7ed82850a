"""The one dialect of config checks: a dotted-path walker and typed checks of single fields, each failing
with a `ConfigError` that names the field, the value given and what is allowed
(`config.prior.ch = -1 is not allowed: an integer in [1, inf]`).

Every section's validator (`config_schema`, `data.config`) is written with these, and `config_variants` sets
fields through the same walker. Types that ml_collections already keeps are not checked again (a str field
takes no int, a command-line value is parsed to the field's type); numbers and booleans are, because a
ConfigDict lets None into any field and True into an int field, and a config rebuilt from `W/config.json` or
from `vqddm_jax.load(...)` overrides has no types to keep. Like `config_schema`, this module imports neither JAX
nor TensorFlow.
"""
from __future__ import annotations

from typing import Any, Iterable, NoReturn

from vqddm_jax.choices import LR_SCHEDULES
from vqddm_jax.errors import ConfigError

# The shapes several sections share (an optimiser, a training loop) are at the end: `check_optim`, `check_loop`.


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def _walk(config: Any, field: str) -> tuple[Any, str]:
  """The section that holds `field` (a dotted path such as `prior_train.optim.lr`) and the field's own name;
  a name missing on the way, or the field itself, is a `ConfigError`."""
  names = field.split(".")
  parent = node = config
  for name in names:
    if name not in node:
      raise ConfigError(f"config.{field} is missing (the config file must define it)")
    parent, node = node, node[name]
  return parent, names[-1]


def field_value(config: Any, field: str) -> Any:
  """The value at a dotted path of a ConfigDict (or of nested dicts)."""
  parent, name = _walk(config, field)
  return parent[name]


def set_field(config: Any, field: str, value: Any) -> None:
  """Sets the field at a dotted path; it must exist (a misspelt name adds no field)."""
  parent, name = _walk(config, field)
  parent[name] = value


def check_bool(config, field: str) -> None:
  value = field_value(config, field)
  if not isinstance(value, bool):
    fail(field, value, "True or False")


def check_str(config, field: str, allowed: str = "a non-empty string") -> None:
  """A string with something in it besides spaces; `allowed` says what it names."""
  value = field_value(config, field)
  if not isinstance(value, str) or not value.strip():
    fail(field, value, allowed)


def check_choice(config, field: str, choices: Iterable[Any]) -> None:
  value, choices = field_value(config, field), tuple(choices)
  # Equal and of the same type: True == 1, yet `data.channels = True` is a typo, not one channel.
  if not any(value == c and type(value) is type(c) for c in choices):
    fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_int(config, field: str, low: int | None = None, high: int | None = None) -> None:
  value = field_value(config, field)
  if isinstance(value, bool) or not isinstance(value, int):
    fail(field, value, "an integer")
  if (low is not None and value < low) or (high is not None and value > high):
    fail(field, value, f"an integer in [{low if low is not None else '-inf'}, "
          f"{high if high is not None else 'inf'}]")


def check_float(config, field: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
  value = field_value(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(field, value, "a number")
  bad_low = value != value or (low is not None and (value <= low if low_open else value < low))  # NaN
  bad_high = high is not None and (value >= high if high_open else value > high)
  if bad_low or bad_high:
    fail(field, value, f"a number in {'(' if low_open else '['}{low}, "
          f"{high if high is not None else 'inf'}{')' if high_open else ']'}")


def check_int_tuple(config, field: str, low: int = 0, nonempty: bool = True) -> None:
  value = field_value(config, field)
  ok = isinstance(value, (tuple, list)) and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
  if not ok or (nonempty and not value):
    fail(field, value, f"a {'non-empty ' if nonempty else ''}tuple of integers >= {low}")


def check_optim(config, prefix: str) -> None:
  """An optimiser sub-section such as `vqvae_train.optim` (Adam, a schedule, optional clipping)."""
  check_float(config, f"{prefix}.lr", 0.0, 10.0, low_open=True)
  check_float(config, f"{prefix}.b1", 0.0, 1.0)
  check_float(config, f"{prefix}.b2", 0.0, 1.0)
  check_choice(config, f"{prefix}.schedule", LR_SCHEDULES)
  check_int(config, f"{prefix}.warmup_steps", 0)
  check_float(config, f"{prefix}.grad_clip", 0.0)
  if "weight_decay" in field_value(config, prefix):  # AdamW's decoupled decay (the AR prior's optimiser).
    check_float(config, f"{prefix}.weight_decay", 0.0, 1.0)


def check_loop(config, prefix: str, min_steps: int = 1) -> None:
  """The loop fields of a training section (`vqvae_train`, `refit`, `prior_train`) and its optimiser;
  `min_steps` 0 where a section may train nothing (stage 1 imported from a converted tokenizer)."""
  check_int(config, f"{prefix}.num_steps", min_steps)
  for name in ("batch_size", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints"):
    check_int(config, f"{prefix}.{name}", 1)
  check_int(config, f"{prefix}.eval_examples", 0)
  check_float(config, f"{prefix}.ema_decay", 0.0, 1.0)
  check_optim(config, f"{prefix}.optim")
