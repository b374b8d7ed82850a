"""Errors that are the user's to fix.

`main` prints a `UserError` as one line on stderr and exits with code 2, without a traceback: the message must
say what is wrong (which field, file or folder) and what to do. Every other exception is a programming error
and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
  """A mistake the user can fix: bad input, a missing prerequisite, a work directory that does not fit."""


class ConfigError(UserError, ValueError):
  """A config field has a value that is not allowed (the message names the field and what is allowed)."""


class MissingInputError(UserError, FileNotFoundError):
  """Something a stage needs is not there yet: a data set, a checkpoint, code maps, a weights file."""


class MismatchError(UserError, ValueError):
  """The work directory holds results that do not fit the current config or the other stages' results."""
