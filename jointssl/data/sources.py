"""2D image sources: discovery of files in folders and CSV manifests, and validation before training.

A source is either a folder (searched recursively; every non-hidden file is taken to be an image, so stray files
are reported rather than silently ignored) or a CSV manifest with a header row and the columns ``path``
(required; relative paths are resolved against the CSV's folder), ``label`` and ``source`` (both optional).

Folder searches follow symbolic links to folders but visit each real folder once (a link loop is reported, never
followed twice). Entries that cannot be images are kept as records so that validation reports them with a
reason: a folder that cannot be listed (permission denied), a folder named like an image (``scan.png/``), a
broken or looping symbolic link, a named pipe.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.file_checks import has_suffix, walk_tree
from jointssl.data.image_io import (
    DICOM_EXTENSIONS,
    MIN_IMAGE_SIDE,
    PIL_FORMAT_BY_EXTENSION,
    check_image_size,
    decode_image_2d,
)

logger = logging.getLogger("jointssl.data")

OnBadFile = Literal["error", "skip"]

# Files that live in image folders but are never images: DICOM media index files.
_NON_IMAGE_NAMES = frozenset({"DICOMDIR"})
_MANIFEST_SUFFIXES = frozenset({".csv"})
# A folder with one of these names is a mistake (e.g. an archive unpacked into "scan.png/"), not a subfolder.
_IMAGE_FILE_SUFFIXES = (*PIL_FORMAT_BY_EXTENSION, *DICOM_EXTENSIONS)


@dataclass(frozen=True)
class ImageRecord:
    """One 2D image file: absolute path, source name (folder basename or manifest column), optional label."""

    path: str
    source: str
    label: str | None = None


@dataclass
class ImageSourceScan:
    """What :func:`scan_image_sources` found: the records, the manifest rows whose file is missing, and notes
    (path, text) on things handled during the search that a researcher should know about."""

    records: list[ImageRecord] = field(default_factory=list)
    missing: list[BadFileError] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def extend(self, other: ImageSourceScan) -> None:
        """Add what another scan found (e.g. of one more source)."""
        self.records += other.records
        self.missing += other.missing
        self.notes += other.notes


def scan_image_sources(sources: Sequence[str | Path]) -> ImageSourceScan:
    """List the image files of every source (see :func:`discover_images`), keeping every problem found instead of
    applying a policy. A source that is neither an existing folder nor a ``.csv`` file raises
    ``FileNotFoundError`` / ``ValueError``: that is a mistake in the arguments, not in the data."""
    scan = ImageSourceScan()
    for source in sources:
        source_path = Path(source).expanduser()
        if source_path.is_dir():
            scan.records.extend(_discover_folder(source_path, scan.notes))
        elif source_path.is_file() and source_path.suffix.lower() in _MANIFEST_SUFFIXES:
            found, not_found = _read_manifest(source_path)
            scan.records.extend(found)
            scan.missing.extend(not_found)
        elif not source_path.exists():
            raise FileNotFoundError(f"image source does not exist: {source_path}")
        else:
            raise ValueError(f"image source must be a folder or a .csv manifest, got the file {source_path}")
    return scan


def discover_images(sources: Sequence[str | Path], on_missing: OnBadFile = "error") -> list[ImageRecord]:
    """List the image files of every source, in source order and sorted by path within each source.

    Folders are searched recursively (hidden files and folders are skipped). CSV manifests list one file per row;
    rows whose file does not exist raise one :class:`DataValidationError` naming the CSV and each row, or are
    logged and dropped with ``on_missing="skip"``. A source that is neither an existing folder nor a ``.csv``
    file raises ``FileNotFoundError`` / ``ValueError``.
    """
    scan = scan_image_sources(sources)
    for path, note in scan.notes:
        logger.info("%s: %s", path, note)
    if scan.missing:
        _apply_policy(scan.missing, on_missing, what="missing manifest entry")
    return scan.records


def _discover_folder(folder: Path, notes: list[tuple[str, str]]) -> list[ImageRecord]:
    source_name = folder.resolve().name
    paths: list[str] = []

    def unreadable(path: str, reason: str) -> None:
        # Kept as a record: validation then reports the folder and why, instead of its images just missing.
        paths.append(os.path.abspath(path))

    def note(path: str, text: str) -> None:
        notes.append((os.path.abspath(path), text))

    for directory, subdirectories, files in walk_tree(folder, skip_hidden=True, note=note, unreadable=unreadable):
        named_like_images = [d for d in subdirectories if has_suffix(d, _IMAGE_FILE_SUFFIXES)]
        subdirectories[:] = [d for d in subdirectories if d not in named_like_images]
        for name in (*files, *named_like_images):
            if name not in _NON_IMAGE_NAMES:
                paths.append(os.path.abspath(os.path.join(directory, name)))
    return [ImageRecord(path=p, source=source_name) for p in sorted(paths)]


def _read_manifest(manifest: Path) -> tuple[list[ImageRecord], list[BadFileError]]:
    default_source = manifest.stem
    records: list[ImageRecord] = []
    missing: list[BadFileError] = []
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise ValueError(f"manifest {manifest}: needs a header row with a 'path' column, found {columns}")
        for row_number, raw_row in enumerate(reader, start=1):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw_row.items() if k is not None}
            where = f"row {row_number} (line {reader.line_num})"
            if not row.get("path"):
                missing.append(BadFileError(manifest, f"{where}: empty path"))
                continue
            path = Path(row["path"]).expanduser()
            if not path.is_absolute():
                path = manifest.parent / path
            if not path.is_file():
                state = "is a folder, not a file" if path.is_dir() else "does not exist"
                missing.append(
                    BadFileError(manifest, f"{where}: {row['path']!r} {state} (resolved to {path})")
                )
                continue
            records.append(
                ImageRecord(
                    path=os.path.abspath(path),
                    source=row.get("source") or default_source,
                    label=row.get("label") or None,
                )
            )
    return records, missing


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of decoding one image: its error (None when usable), its shape and the conversion notes."""

    path: str
    error: BadFileError | None
    shape: tuple[int, int] | None = None  # (H, W) when decoded
    notes: tuple[str, ...] = ()


def check_images(
    records: Sequence[ImageRecord], num_threads: int = 8, min_side: int = MIN_IMAGE_SIDE
) -> list[ImageCheck]:
    """Decode every record once (in a thread pool: PIL and pydicom decoders release the GIL) and return, in
    record order, each one's error or notes. This is the validation of :class:`~jointssl.data.JointDataModule`
    and of ``jointssl check-data``."""

    def check(record: ImageRecord) -> ImageCheck:
        try:
            decoded = decode_image_2d(record.path)
            check_image_size(record.path, decoded.array, min_side)
        except BadFileError as error:
            return ImageCheck(record.path, error)
        return ImageCheck(record.path, None, tuple(decoded.array.shape), decoded.notes)

    with ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="jointssl-validate") as pool:
        return list(pool.map(check, records))


def find_bad_files(
    records: Sequence[ImageRecord], num_threads: int = 8, min_side: int = MIN_IMAGE_SIDE
) -> list[BadFileError]:
    """Decode every record once and return the problems, in record order (see :func:`check_images`)."""
    checks = check_images(records, num_threads=num_threads, min_side=min_side)
    return [check.error for check in checks if check.error is not None]


def validate_images(
    records: Sequence[ImageRecord],
    on_bad_file: OnBadFile = "error",
    num_threads: int = 8,
    min_side: int = MIN_IMAGE_SIDE,
) -> list[ImageRecord]:
    """Decode every image once and return the usable records.

    ``on_bad_file="error"`` raises one :class:`DataValidationError` listing every bad file and its reason;
    ``"skip"`` logs each bad file on the ``jointssl.data`` logger and drops it.
    """
    started = time.perf_counter()
    bad = find_bad_files(records, num_threads=num_threads, min_side=min_side)
    logger.info(
        "validated %d images in %.1f s: %d bad", len(records), time.perf_counter() - started, len(bad)
    )
    return drop_bad_files(records, bad, on_bad_file)


def drop_bad_files(
    records: Sequence[ImageRecord], bad: Sequence[BadFileError], on_bad_file: OnBadFile, log: bool = True
) -> list[ImageRecord]:
    """Apply the bad-file policy to already-found problems: raise for ``"error"``, else drop (and log, when
    ``log``; under DDP only rank 0 logs so that each file is reported once)."""
    if not bad:
        return list(records)
    _apply_policy(bad, on_bad_file, what="bad image file", log=log)
    bad_paths = {error.path for error in bad}
    return [record for record in records if record.path not in bad_paths]


def _apply_policy(
    errors: Sequence[BadFileError], on_bad_file: OnBadFile, what: str, log: bool = True
) -> None:
    if on_bad_file == "error":
        raise DataValidationError(errors)
    if on_bad_file != "skip":
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    if log:
        for error in errors:
            logger.warning("skipping %s %s: %s", what, error.path, error.reason)
        logger.warning("skipped %d %s(s) (on_bad_file=skip)", len(errors), what)
