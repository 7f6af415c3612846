"""CSV manifests: the one reader behind every CSV a researcher gives jointssl (image and volume lists for
pretraining, labelled volumes, segmentation pairs, candidate and annotation lists).

What every manifest gets, wherever it is used:

* Encodings: UTF-8 with or without the byte-order mark Excel writes, and UTF-16 with a BOM (Excel's "Unicode
  text"). Anything else is refused with the byte offset, not guessed: a path decoded with the wrong code page names
  a file that does not exist.
* Delimiter: ``,``; a header row without a comma but with ``;`` (Excel in locales with a decimal comma) or a tab is
  read with that delimiter. Quoting is standard CSV (a path with commas or quotes must be quoted).
* Columns: names are compared case-insensitively and without surrounding spaces (``Path``, `` path `` and ``PATH``
  are one column); cell values are stripped. A column named twice is an error.
* Rows: line numbers are those of the file (the header is line 1; a quoted cell spanning lines counts them all),
  rows of empty cells (Excel's trailing ``,,,``) are skipped, a row with more cells than the header (an unquoted
  comma in a path?) is an error. A row repeating an earlier row exactly is dropped with a note; with ``path_key``, so
  is a row naming the same file as an earlier row in another spelling (``./a.png``) with the same other values, and
  one naming it with other values is an error.
* Paths: ``~`` is expanded and relative paths are taken relative to the manifest's folder; spaces and non-ASCII
  characters are kept as they are.
* Errors: every problem of a manifest (missing columns, bad rows: the callers' own checks included, via
  :meth:`Manifest.parse`) comes out together in one :class:`~jointssl.data.errors.DataValidationError`, each
  naming the manifest and the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.file_checks import is_regular_file, not_a_file_reason

T = TypeVar("T")

#: A required column given as several names accepts any one of them (the first present is used).
ColumnSpec = str | tuple[str, ...]


class RowError(ValueError):
    """A problem with one manifest row, raised by a row parser; :meth:`Manifest.parse` adds the manifest and line."""


@dataclass(frozen=True)
class ManifestRow:
    """One data row: its line in the file and its cells by lower-case column name (stripped strings)."""

    manifest: Path
    line: int
    cells: dict[str, str]

    def text(self, *names: str) -> str:
        """The first non-empty cell among the columns ``names`` ("" when all are empty or absent)."""
        for name in names:
            value = self.cells.get(name, "")
            if value:
                return value
        return ""

    def path(self, *names: str) -> str:
        """The absolute path in the first non-empty column among ``names``, relative paths resolved against the
        manifest's folder; :class:`RowError` when every one is empty."""
        value = self.text(*names)
        if not value:
            raise RowError(f"empty {' / '.join(names)}")
        return resolve_path(self.manifest, value)

    def number(self, name: str) -> float:
        """The cell ``name`` as a finite float; :class:`RowError` otherwise."""
        value = self.text(name)
        try:
            number = float(value)
        except ValueError:
            raise RowError(f"{name} must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise RowError(f"{name} must be finite, got {value!r}")
        return number

    def class_index(self, name: str) -> int:
        """The cell ``name`` as a class index (an integer >= 0; "1.0" is 1); :class:`RowError` otherwise."""
        value = self.text(name)
        try:
            number = float(value)
        except ValueError:
            raise RowError(f"{name} {value!r} is not an integer class") from None
        if not number >= 0 or number != int(number):
            raise RowError(f"{name} {value!r} is not a class index >= 0")
        return int(number)


@dataclass
class Manifest:
    """A CSV manifest read by :func:`read_manifest`."""

    path: Path
    #: lower-case column names in file order
    columns: tuple[str, ...]
    rows: list[ManifestRow]
    #: (line, text) of things handled that a researcher should know about (repeated rows dropped)
    notes: list[tuple[int, str]] = field(default_factory=list)
    #: rows that could not be read as rows (too many cells, a conflicting repeat), left out of ``rows``;
    #: :meth:`parse` reports them with the parser's own findings
    problems: list[tuple[int, str]] = field(default_factory=list)

    def column(self, *names: str) -> str | None:
        """The first of ``names`` that is a column of this manifest, or None."""
        return next((name for name in names if name in self.columns), None)

    def parse(self, parse_row: Callable[[ManifestRow], T | None]) -> tuple[list[T], list[BadFileError]]:
        """``parse_row`` applied to every row: the results (a None result is left out: a row the caller skips)
        and the errors, in line order: the rows that could not be read (:attr:`problems`) and each row whose
        parser raised :class:`RowError` or :class:`BadFileError`, naming the manifest and the line. Nothing is
        raised, so that every bad row is reported together."""
        results: list[T] = []
        errors: list[tuple[int, BadFileError]] = [(line, self.error(line, reason)) for line, reason in self.problems]
        for row in self.rows:
            try:
                result = parse_row(row)
            except RowError as error:
                errors.append((row.line, self.error(row.line, str(error))))
                continue
            except BadFileError as error:
                reason = error.reason if error.path == str(self.path) else f"{error.path}: {error.reason}"
                errors.append((row.line, self.error(row.line, reason.removeprefix(f"line {row.line}: "))))
                continue
            if result is not None:
                results.append(result)
        return results, [error for _, error in sorted(errors, key=lambda item: item[0])]

    def parse_all(self, parse_row: Callable[[ManifestRow], T | None]) -> list[T]:
        """:meth:`parse`, raising one :class:`DataValidationError` when any row is bad."""
        results, errors = self.parse(parse_row)
        if errors:
            raise DataValidationError(errors)
        return results

    def error(self, line: int, reason: str) -> BadFileError:
        return BadFileError(self.path, f"line {line}: {reason}")


def resolve_path(manifest: str | os.PathLike, value: str) -> str:
    """``value`` as an absolute path: ``~`` expanded, relative paths taken relative to the manifest's folder."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(manifest).parent / path
    return os.path.abspath(path)


def read_manifest(
    manifest: str | os.PathLike,
    required: Sequence[ColumnSpec] = (),
    path_key: ColumnSpec | None = None,
    what: str = "manifest",
) -> Manifest:
    """Read a CSV manifest (module docstring for the rules).

    Args:
        manifest: the CSV file.
        required: columns that must be present; a tuple of names accepts any one of them (("path", "image")).
        path_key: the column of paths that identify rows (a tuple: the first present of those names): a second
            row naming the same file with other values is an error (with the same values it is dropped, like
            any exact repeat).
        what: what the manifest lists, for messages ("segmentation manifest").

    Raises :class:`DataValidationError` for a manifest that cannot be read at all (a missing file, undecodable
    text, missing or repeated columns), listing every such problem. Rows that cannot be read (too many cells, a
    conflicting repeat) are kept in :attr:`Manifest.problems` and reported by :meth:`Manifest.parse` together with
    the callers' own row checks.
    """
    path = Path(manifest).expanduser()
    if not is_regular_file(path):
        state = "is a folder, not a CSV file" if path.is_dir() else not_a_file_reason(path)
        raise DataValidationError([BadFileError(path, f"{what} {state}")])
    try:
        text = _decode(path.read_bytes())
    except (OSError, UnicodeDecodeError) as error:
        raise DataValidationError([BadFileError(path, f"cannot read {what}: {_describe(error)}")]) from None
    if not text.strip():
        raise DataValidationError([BadFileError(path, f"empty {what}: no header row")])

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    header = next(reader)
    columns = tuple(name.strip().lower() for name in header)
    errors = []
    repeated = sorted({name for name in columns if name and columns.count(name) > 1})
    if repeated:
        errors.append(BadFileError(path, f"line 1: column(s) {repeated} appear more than once"))
    absent = [spec for spec in required if not any(name in columns for name in _names(spec))]
    if absent:
        wanted = ", ".join(" or ".join(repr(n) for n in _names(spec)) for spec in absent)
        errors.append(BadFileError(path, f"{what} needs the column(s) {wanted}; its header has {list(header)}"))
    if errors:
        raise DataValidationError(errors)

    result = Manifest(path, columns, [])
    key = result.column(*_names(path_key)) if path_key is not None else None
    seen: dict[tuple[str, ...], int] = {}
    keys: dict[str, tuple[int, tuple[str, ...]]] = {}
    line = 1  # the line the next record starts on is one after the last line read
    for cells in reader:
        start, line = line + 1, reader.line_num
        values = tuple(cell.strip() for cell in cells)
        if not any(values):
            continue
        if len(values) > len(columns) and any(values[len(columns):]):
            result.problems.append((start, f"{len(values)} cells but the header has {len(columns)} columns "
                                           "(a path with a comma must be quoted)"))
            continue
        values = values[: len(columns)] + ("",) * (len(columns) - len(values))
        if values in seen:
            result.notes.append((start, f"repeats line {seen[values]} exactly: ignored"))
            continue
        seen[values] = start
        row = ManifestRow(path, start, {name: value for name, value in zip(columns, values) if name})
        if key is not None and row.text(key):
            identity = resolve_path(path, row.text(key))
            if identity in keys:
                first_line, first_values = keys[identity]
                position = columns.index(key)
                if values[:position] + values[position + 1:] == first_values[:position] + first_values[position + 1:]:
                    # The same file spelt another way (./a.png, an absolute path) with the same values: a repeat.
                    result.notes.append((start, f"repeats line {first_line} (the same file, {row.text(key)!r}): "
                                                "ignored"))
                else:
                    result.problems.append((start, f"{key} {row.text(key)!r} is listed again with other values "
                                                   f"(first at line {first_line})"))
                continue
            keys[identity] = (start, values)
        result.rows.append(row)
    return result


def _names(spec: ColumnSpec) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _decode(data: bytes) -> str:
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return data.decode(encoding)
    return data.decode("utf-8")


def _describe(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return (f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                "save it as 'CSV UTF-8'")
    return str(error)


def _delimiter(text: str) -> str:
    header = text.lstrip("\ufeff").splitlines()[0]
    if "," in header:
        return ","
    return max((";", "\t"), key=header.count) if (";" in header or "\t" in header) else ","

