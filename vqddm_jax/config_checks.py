"""Typed checks of single config fields, each failing with a `ConfigError` that names the field, the value
given and what is allowed (`config.prior.ch = -1 is not allowed: an integer in [1, inf]`).

`config_schema` validates every section with these; like it, this module imports neither JAX nor TensorFlow.
"""
from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from vqddm_jax.errors import ConfigError


def fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def field_value(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value at a dotted path such as `prior_train.optim.lr`; a missing field is a `ConfigError`."""
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config.{field} is missing (the config file must define it)")
    node = node[part]
  return node


def check_choice(config, field: str, choices: Iterable[str]) -> None:
  value, choices = field_value(config, field), tuple(choices)
  if value not in choices:
    fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_int(config, field: str, low: int | None = None, high: int | None = None) -> None:
  value = field_value(config, field)
  if isinstance(value, bool) or not isinstance(value, int):
    fail(field, value, "an integer")
  if (low is not None and value < low) or (high is not None and value > high):
    fail(field, value, f"an integer in [{low if low is not None else '-inf'}, "
          f"{high if high is not None else 'inf'}]")


def check_float(config, field: str, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
  value = field_value(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(field, value, "a number")
  bad_low = value != value or (low is not None and (value <= low if low_open else value < low))  # NaN
  if bad_low or (high is not None and value > high):
    fail(field, value, f"a number in {'(' if low_open else '['}{low}, "
          f"{high if high is not None else 'inf'}]")


def check_int_tuple(config, field: str, low: int = 0, nonempty: bool = True) -> None:
  value = field_value(config, field)
  ok = isinstance(value, (tuple, list)) and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
  if not ok or (nonempty and not value):
    fail(field, value, f"a {'non-empty ' if nonempty else ''}tuple of integers >= {low}")
