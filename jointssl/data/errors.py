"""Errors for bad input files. Every message names the file and the reason, so a researcher can fix the data
before a multi-day run starts instead of finding out hours into it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class BadFileError(ValueError):
    """One input file that cannot be used, and why."""

    def __init__(self, path: str | Path, reason: str = ""):
        # `reason` has a default because a DataLoader worker re-raises an exception in the main process as
        # `type(exc)(message)`: with one argument the original type survives, message intact.
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)


class DataValidationError(ValueError):
    """Every bad file found in one pass over the sources, reported together."""

    def __init__(self, errors: Sequence[BadFileError]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e.path}: {e.reason}" for e in self.errors)
        super().__init__(
            f"{len(self.errors)} bad input file(s); fix or remove them, or set on_bad_file: skip to skip them:\n"
            f"{lines}"
        )
