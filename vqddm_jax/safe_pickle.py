"""The one restricted unpickler: every pickle this project reads (weights files) goes through `load`.

A pickle is a small program: its GLOBAL / STACK_GLOBAL / INST / EXT opcodes fetch any attribute of any module
and REDUCE calls it, so a plain `pickle.load` of a downloaded weights file can run any code. `load` resolves
only the globals in its caller's table (tensor-rebuild functions, numpy's array reconstruction, plain
containers) and refuses persistent ids unless the caller handles them, so nothing but those callables can run.
Whatever goes wrong while reading (a refused global, a truncated or corrupt pickle, arguments that the
caller's callables reject) ends in one `WeightsFileError` whose one-line message names the file and the problem.

For callers: BUILD can set attributes on any object a pickle has on its stack, after the callable that made it
returned, so what the allowed callables return should be immutable (named tuples), or checked only once the
whole pickle is read.

JAX-free leaf module: the standard library and `vqddm_jax.errors` only.
"""
from __future__ import annotations

import pickle
from typing import Any, BinaryIO, Callable, Mapping, Optional

from vqddm_jax.errors import UserError

# Longest piece of a foreign exception's text (or of a persistent id) quoted in a message.
_QUOTE_CHARS = 200


class WeightsFileError(UserError, pickle.UnpicklingError, ValueError):
  """A weights file this project will not read; the one-line message names the file and what is wrong.

  None of ConfigError (a config field), MissingInputError (something absent) or MismatchError (work directory
  results that do not fit) describes a file whose contents are refused, hence its own UserError subclass:
  `main`s print it as one line and exit 2. It is also a `pickle.UnpicklingError` and a `ValueError`, what the
  readers raised before, so callers that catch those keep working.
  """


class RefusedGlobalError(WeightsFileError):
  """The pickle refers to a global outside the allowed table: reading it could run code."""


class Malformed(ValueError):
  """Raised by an allowed callable or a persistent-id handler to refuse what the file describes.

  `load` turns it into a `WeightsFileError` that adds the file's name.
  """


class RefusedCall(Malformed):
  """Raised by a stand-in for a global outside the table (see `load`'s `unknown`) when the pickle calls it;
  `args[0]` names the global. `load` turns it into a `RefusedGlobalError` that adds the file's name."""


def _quote(text: str) -> str:
  """`text` on one line, cut to `_QUOTE_CHARS` characters."""
  text = " ".join(str(text).split())
  return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…"


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals from a fixed table only; hands persistent ids to a handler or refuses them."""

  def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any],
               persistent_load: Optional[Callable[[Any], Any]],
               unknown: Optional[Callable[[str, str], Any]] = None):
    super().__init__(file)
    self._allowed = allowed
    self._persistent_load = persistent_load
    self._unknown = unknown

  def find_class(self, module: str, name: str) -> Any:
    # Every opcode that names a global (GLOBAL, STACK_GLOBAL, INST, EXT1/2/4) comes through here; nothing is
    # imported, so not even a module's import-time code runs.
    try:
      return self._allowed[(module, name)]
    except KeyError:
      if self._unknown is not None:
        return self._unknown(module, name)
      raise _Refused(f"{module}.{name}") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent_load is None:
      raise Malformed(f"it holds a persistent id ({_quote(repr(pid))}), which this pickle never has")
    return self._persistent_load(pid)


class _Refused(Exception):
  """Internal: the global `args[0]` is not in the table (becomes a RefusedGlobalError with the file's name)."""


def load(file: BinaryIO, *, path: str, what: str, allowed: Optional[Mapping[tuple[str, str], Any]] = None,
         persistent_load: Optional[Callable[[Any], Any]] = None,
         unknown: Optional[Callable[[str, str], Any]] = None) -> Any:
  """Reads one pickle from `file`, resolving only the globals in `allowed`.

  Args:
    file: a binary file positioned at the pickle; left just after it (several pickles can follow each other).
    path: the file's name, for messages.
    what: which pickle this is, for messages (e.g. "legacy torch.save magic number").
    allowed: {(module, name): the object to use for it}; None or empty: the pickle may refer to no global
      (plain ints, strings, lists, tuples and dicts only).
    persistent_load: called with each persistent id and returns its object; it raises `Malformed` to refuse
      one. None: a persistent id is refused.
    unknown: called with (module, name) of each global outside `allowed` and returns an inert stand-in for
      it, which must import and run nothing and raise `RefusedCall` when the pickle calls it (e.g.
      `convert.lightning_ckpt`'s classes for callback objects). None: such a global is refused at once.

  Returns:
    The unpickled object.

  Raises:
    RefusedGlobalError: the pickle refers to a global outside `allowed` (with `unknown`: calls one).
    WeightsFileError: anything else went wrong (not a pickle, truncated, an allowed callable or the handler
      refused its arguments); the message names `path`, `what` and the cause.
  """
  allowed = allowed or {}
  try:
    return _RestrictedUnpickler(file, allowed, persistent_load, unknown).load()
  except RefusedCall as e:
    raise RefusedGlobalError(
        f"{path}: refusing to load the {what}: it calls global {e.args[0]}, which could run code; this "
        "reader never imports or calls a global outside its table") from None
  except _Refused as e:
    names = ", ".join(sorted(f"{m}.{n}" for m, n in allowed)) or "none"
    raise RefusedGlobalError(
        f"{path}: refusing to load the {what}: it refers to global {e.args[0]}, which could run code "
        f"(globals allowed here: {names})") from None
  except WeightsFileError:
    raise
  except Malformed as e:
    raise WeightsFileError(f"{path}: cannot read the {what}: {_quote(e)}") from e
  except Exception as e:  # pylint: disable=broad-except
    # Only allowed callables and the unpickler's own parsing ran, on bytes the file chose: whatever they
    # raised (EOFError, UnpicklingError, TypeError for wrong arguments, RecursionError, ...) is the file's fault.
    raise WeightsFileError(
        f"{path}: cannot read the {what}: not a readable pickle ({type(e).__name__}: {_quote(e)})") from e
