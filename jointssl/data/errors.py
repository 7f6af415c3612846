"""Errors for bad input files. Every message names the file and the reason, so a researcher can fix the data
before a multi-day run starts instead of finding out hours into it.

Names are printed through :func:`printable` (in :class:`BadFileError`'s message, :class:`DataValidationError`'s
lines and ``jointssl check-data``'s finding lines), so that a file name cannot break or forge a report line: a
newline in a name would start a line of its own, and a name that is not UTF-8 (``os.fsdecode`` keeps its bytes as
lone surrogates) would stop printing with a UnicodeEncodeError under a UTF-8 locale.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path

from jointssl.errors import UserError

# Control, format and separator characters (Cc, Cf, Zl, Zp) and the lone surrogates of undecodable bytes (Cs).
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str | Path) -> str:
    """``text`` with every control character escaped as ``repr`` would (``\\n``, ``\\t``, ``\\x1b``, ``\\u2028``)
    and every byte ``os.fsdecode`` could not decode shown as ``\\xNN``; other characters (spaces, accents, other
    scripts) are kept. The one policy for file names in messages."""
    text = str(text)
    if text.isprintable():  # the common case, in C
        return text
    out = []
    for char in text:
        if unicodedata.category(char) not in _UNPRINTABLE_CATEGORIES or char == " ":
            out.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:  # surrogateescape of the byte ord(char) - 0xDC00
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


class BadFileError(UserError, ValueError):
    """One input file that cannot be used, and why. ``path`` is the file as given (for comparisons and file
    operations); the message shows it, and the reason, through :func:`printable`."""

    def __init__(self, path: str | Path, reason: str = ""):
        # `reason` has a default because a DataLoader worker re-raises an exception in the main process as
        # `type(exc)(message)`: with one argument the original type survives, message intact.
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{printable(self.path)}: {printable(reason)}" if reason else printable(self.path))


class DataValidationError(UserError, ValueError):
    """Every bad file found in one pass over the sources, reported together."""

    def __init__(self, errors: Sequence[BadFileError]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {printable(e.path)}: {printable(e.reason)}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} bad input file(s); fix or remove them, or set on_bad_file: skip to skip them:\n"
            f"{lines}"
        )
