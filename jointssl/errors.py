"""User errors: one policy for every mistake in what a user gave jointssl (a config value, a file, a path, a disk
that is full), as opposed to bugs.

- Every such error is a :class:`UserError`. The project's own error types derive from it (``BadFileError``,
  ``DataValidationError``, ``PretrainedLoadError``, ``ExportError``, ``EmbedError``, ``InflationError``,
  check-data's ``UsageError``, the checkpoint errors of :mod:`jointssl.checkpointing`, :class:`ConfigError`), and
  its message names the file or option, the reason and, when known, the fix.
- :func:`user_errors_reported` (around everything ``jointssl`` runs, in :func:`jointssl.cli.main`) prints such an
  error as ``jointssl <command>: error: <message>`` on stderr and exits with status 2, without a traceback:
  raised directly, at instantiate time by a constructor (jsonargparse wraps that in its "Does not validate against
  any of the Union subtypes" error: the user error it was raised from is found and reported instead), or inside
  ``Trainer.fit`` (data-module set-up, checkpoint save and load).
- With ``JOINTSSL_DEBUG=1`` in the environment, or ``--debug`` on the command line, the error propagates with its
  full traceback instead.
- Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

#: Environment variable that turns user-error messages back into tracebacks (docs/errors.md).
DEBUG_ENV = "JOINTSSL_DEBUG"
#: Command-line flag with the same effect; removed from the arguments before they are parsed.
DEBUG_FLAG = "--debug"
#: Exit status of a user error (argparse's, and check-data's, for usage errors).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input or environment, reported as one message without a traceback. Subclasses keep
    their historical builtin base as a second base (``class PretrainedLoadError(UserError, ValueError)``), so that
    callers catching that builtin still catch them."""


class ConfigError(UserError, ValueError):
    """A configuration value outside its range (or settings that contradict each other), found when the object is
    constructed, before any file is decoded. The message names the option."""


def require(ok: bool, owner: str, option: str, requirement: str, value: Any) -> None:
    """Raise ``ConfigError("<owner>: <option> must be <requirement>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{owner}: {option} must be {requirement}, got {value!r}")


def check_ranges(
    owner: str,
    values: Mapping[str, Any],
    *,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    unit_interval: Iterable[str] = (),
) -> None:
    """Range checks of constructor arguments by name (``values``: e.g. the hyper-parameters): ``positive`` > 0,
    ``non_negative`` >= 0, ``unit_interval`` in [0, 1]. A list value (e.g. ``num_prototypes: [3000]``) must be
    non-empty and each element must satisfy the rule; None (an optional option left unset) passes. Raises
    :class:`ConfigError` naming the first bad option."""
    rules = (
        (positive, lambda x: x > 0, "> 0"),
        (non_negative, lambda x: x >= 0, ">= 0"),
        (unit_interval, lambda x: 0 <= x <= 1, "in [0, 1]"),
    )
    for names, ok, requirement in rules:
        for name in names:
            value = values[name]
            if value is None:  # an optional option left unset (its type, checked by jsonargparse, allows None)
                continue
            if isinstance(value, (list, tuple)):
                require(len(value) > 0 and all(ok(v) for v in value), owner, name,
                        f"a non-empty list of values {requirement}", value)
            else:
                require(ok(value), owner, name, requirement, value)


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether tracebacks were asked for: ``JOINTSSL_DEBUG`` set to anything but ``""``/``0``, or ``--debug`` in
    ``argv``."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower()
    return flag not in ("", "0", "false", "no") or (argv is not None and DEBUG_FLAG in argv)


def _raised_by_jsonargparse(error: BaseException) -> bool:
    traceback: TracebackType | None = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and str(traceback.tb_frame.f_globals.get("__name__", "")).startswith("jsonargparse")


def find_user_error(error: BaseException) -> UserError | None:
    """The user error behind ``error``: ``error`` itself, or the one a jsonargparse error was raised from (it
    wraps whatever a constructor raises at instantiate time into a ValueError listing every Union subtype; the
    wrapper is followed through ``__cause__`` only, and only while jsonargparse raised it, so that a bug raised
    while handling a user error is still reported as a bug)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        if not _raised_by_jsonargparse(current):
            return None
        current = current.__cause__
    return None


def one_line(error: BaseException) -> str:
    """A message on as few lines as it needs: surrounding whitespace and blank lines removed."""
    lines = [line.rstrip() for line in str(error).strip().splitlines() if line.strip()]
    return "\n".join(lines) or type(error).__name__


@contextmanager
def user_errors_reported(prog: str, debug: bool = False) -> Iterator[None]:
    """Run the block; a user error (see :func:`find_user_error`) ends the process with ``<prog>: error:
    <message>`` on stderr and exit status 2, unless ``debug``, when it propagates with its traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - only user errors are handled, everything else is re-raised
        user_error = None if debug else find_user_error(error)
        if user_error is None:
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(user_error)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
