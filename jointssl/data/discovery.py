"""Discovery: which 2D images and 3D volumes a list of sources holds, before anything is decoded.

A source is a folder (searched recursively), a CSV manifest (:mod:`jointssl.data.manifest`), or, for volumes, one
volume file. Folder searches follow symbolic links to folders but visit each real folder once (a link loop is
noted, never followed twice), skip hidden files and folders, and sort what they find, so that the same sources
always give the same records in the same order.

Images: in an image folder every file is taken to be an image, so that stray files are reported by validation
rather than silently ignored; entries that cannot be images (a folder that cannot be listed, a folder named like an
image such as ``scan.png/``, a broken link, a named pipe) are kept as records for validation to report with a
reason. DICOM media index files (``DICOMDIR``) are left out. Manifest columns: ``path`` (required), ``label`` and
``source`` (optional); a row whose file is missing is a problem of the manifest (line number included).

Volumes: files with a volume suffix, and every folder that directly holds DICOM files (one series); files in 3D
formats jointssl cannot read, folders named like volume files and folders that cannot be listed become records so
that validation reports them; other files (.json sidecars, notes) are ignored and logged. Manifest columns:
``path`` or ``image`` (required), ``modality`` (CT/MR/empty), ``label`` and ``source`` (optional).

The source name of a record is the manifest's ``source`` column, else the folder's or the manifest's name.

A source that yields nothing (an empty folder, a folder of hidden or non-volume files, a header-only manifest) is
a problem naming the source: it is almost always a wrong path or an export that failed, and it would otherwise
only show as fewer samples. A file that several sources list (two manifests, a manifest and a folder, nested
folders; compared by absolute path) is used once, with a note naming both sources.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.misc

from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.file_checks import display_suffix, has_suffix, is_regular_file, not_a_file_reason, walk_tree
from jointssl.data.image_io import DICOM_EXTENSIONS, PIL_FORMAT_BY_EXTENSION
from jointssl.data.manifest import ManifestRow, RowError, read_manifest
from jointssl.data.validation import FileCheck, apply_bad_file_policy
from jointssl.data.volume_io import UNSUPPORTED_VOLUME_FORMATS, VOLUME_FILE_SUFFIXES, VolumeRecord, volume_kind
from jointssl.data.volume_readers import NON_SLICE_DICOM_NAMES, Modality

logger = logging.getLogger("jointssl.data")

#: Why a file in a volume folder was ignored (logged, and printed by check-data).
NOT_A_VOLUME = f"not a volume file ({' '.join(VOLUME_FILE_SUFFIXES)} or a DICOM series)"

# A folder with one of these names is a mistake (e.g. an archive unpacked into "scan.png/"), not a subfolder.
_IMAGE_FILE_SUFFIXES = (*PIL_FORMAT_BY_EXTENSION, *DICOM_EXTENSIONS)
# Data files that a volume header of the same name in the same folder points to (MetaImage .mhd -> .raw / .zraw,
# detached NRRD .nhdr -> .raw / .raw.gz): part of that volume, neither a volume nor an ignored file.
_DETACHED_DATA_SUFFIXES = {".raw.gz": (".nhdr",), ".raw": (".mhd", ".nhdr"), ".zraw": (".mhd",)}


@dataclass(frozen=True)
class ImageRecord:
    """One 2D image file: absolute path, source name (folder basename or manifest column), optional label."""

    path: str
    source: str
    label: str | None = None


@dataclass
class SourceScan:
    """What a scan of sources found, every problem kept rather than raised: ``records`` (ImageRecord or
    VolumeRecord), ``problems`` (manifest rows and source files that cannot be used, each naming the manifest and
    line, or the file, and sources that yield nothing), ``notes`` ((path, text) on links not followed, repeated
    manifest rows, files listed by two sources), ``ignored`` (files in volume folders that are not volumes),
    ``origins`` ("<manifest> line <n>" of each volume a manifest listed, for check-data to trace a volume that fails
    to load back to its row; an image manifest's rows are checked for their files while it is read) and
    ``listed_by`` (the source that listed each record, by absolute path: :meth:`extend` keeps the first of a file
    that several sources list)."""

    records: list = field(default_factory=list)
    problems: list[BadFileError] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    listed_by: dict[str, str] = field(default_factory=dict)

    def extend(self, other: SourceScan) -> None:
        """Add what another scan found (e.g. of one more source); a record this scan holds already (another
        source listed the same file) is left out with a note naming both sources."""
        self.problems += other.problems
        self.notes += other.notes
        records = other.records
        if not self.records and len(other.listed_by) == len(records):
            # The first source (a file listed once each): nothing to compare with, and a 100k-file scan stays fast.
            self.records, self.listed_by, records = list(records), dict(other.listed_by), []
        for record in records:
            key = _identity(record.path)
            if key in self.listed_by:
                first, again = self.listed_by[key], other.listed_by.get(key, "another source")
                self.notes.append((record.path, f"listed by {first} and again by {again}: used once"))
                continue
            self.records.append(record)
            self.listed_by[key] = other.listed_by.get(key, "")
        self.ignored += other.ignored
        self.origins.update(other.origins)

    def log_notes(self) -> None:
        # Warnings, as check-data prints them: a repeated manifest row or a file listed twice changes what trains.
        for path, note in self.notes:
            logger.warning("%s: %s", path, note)
        for path in self.ignored:
            logger.info("%s: %s: ignored", path, NOT_A_VOLUME)


# ----------------------------------------------------------------------------------------------------
# Images


def scan_image_sources(sources: Sequence[str | os.PathLike]) -> SourceScan:
    """The image records of every source, in source order and sorted by path within a folder, with every problem
    kept. A source that is neither an existing folder nor a ``.csv`` file raises ``FileNotFoundError`` /
    ``ValueError``: that is a mistake in the arguments, not in the data. A manifest that cannot be read at all
    (missing column, not UTF-8) raises its :class:`DataValidationError`."""
    scan = SourceScan()
    for source in sources:
        path = Path(source).expanduser()
        found = SourceScan()
        if path.is_dir():
            found.records.extend(_image_folder(path, found.notes))
        elif path.is_file() and path.suffix.lower() == ".csv":
            _image_manifest(path, found)
        elif not path.exists():
            raise FileNotFoundError(f"image source does not exist: {path}")
        else:
            raise ValueError(f"image source must be a folder or a .csv manifest, got the file {path}")
        _add_source(scan, found, path, "2D images")
    return scan


def discover_images(sources: Sequence[str | os.PathLike], on_missing: str = "error") -> list[ImageRecord]:
    """The image records of every source (:func:`scan_image_sources`). Manifest rows that cannot be used (a file
    that does not exist, an empty path) raise one :class:`DataValidationError` naming the manifest and each line,
    or are logged and dropped with ``on_missing="skip"``."""
    scan = scan_image_sources(sources)
    scan.log_notes()
    if scan.problems:
        apply_bad_file_policy([FileCheck.failed(error) for error in scan.problems], on_missing, what="manifest entry")
    return scan.records


def _image_folder(folder: Path, notes: list[tuple[str, str]]) -> list[ImageRecord]:
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
            if name not in NON_SLICE_DICOM_NAMES:
                paths.append(os.path.abspath(os.path.join(directory, name)))
    return [ImageRecord(path=p, source=source_name) for p in sorted(paths)]


def _image_manifest(manifest: Path, scan: SourceScan) -> None:
    table = read_manifest(manifest, required=["path"], path_key="path", what="image manifest")
    scan.notes.extend((f"{manifest} line {line}", text) for line, text in table.notes)

    def parse(row: ManifestRow) -> ImageRecord:
        path = row.path("path")
        if not is_regular_file(path):  # a named pipe would block the first read: say what it is
            raise RowError(f"{row.text('path')!r} {not_a_file_reason(path)} (resolved to {path})")
        return ImageRecord(path=path, source=row.text("source") or manifest.stem, label=row.text("label") or None)

    records, problems = table.parse(parse)
    scan.records.extend(records)
    scan.problems.extend(problems)


# ----------------------------------------------------------------------------------------------------
# Volumes


def scan_volume_sources(sources: Iterable[str | os.PathLike]) -> SourceScan:
    """The volume records of every source (:func:`discover_volumes`), with every problem kept. A source that does
    not exist raises :class:`BadFileError`: that is a mistake in the arguments, not in the data."""
    scan = SourceScan()
    for source in sources:
        path = Path(source).expanduser()
        found = SourceScan()
        if path.is_dir() and not has_suffix(path.name, VOLUME_FILE_SUFFIXES):
            found.records.extend(_volume_folder(path, found.notes, found.ignored))
        elif path.is_file() and path.suffix.lower() == ".csv":
            _volume_manifest(path, found)
        elif path.exists() or path.is_symlink():
            try:
                volume_kind(str(path))  # raises for unsupported files and folders named like volume files
            except BadFileError as error:
                scan.problems.append(error)
                continue
            found.records.append(VolumeRecord(str(path), path.parent.name))
        else:
            raise BadFileError(path, "source does not exist")
        _add_source(scan, found, path, "volumes")
    return scan


def _add_source(scan: SourceScan, found: SourceScan, source: Path, what: str) -> None:
    """Add what one source yielded to ``scan`` (:meth:`SourceScan.extend`: a file an earlier source listed is used
    once); a source that yielded nothing and reported no problem is a problem naming it."""
    if not found.records and not found.problems:
        if source.is_dir():
            ignored = f" ({len(found.ignored)} other file(s) ignored)" if found.ignored else ""
            reason = f"no usable {what}: the folder holds no {_WHAT_A_FOLDER_HOLDS[what]}{ignored}"
        else:
            reason = f"no usable {what}: the manifest lists none (a header row only)"
        found.problems.append(BadFileError(source, reason))
    found.listed_by = {_identity(record.path): str(source) for record in found.records}
    scan.extend(found)


def _identity(path: str) -> str:
    """A record's file as an absolute path (image records are absolute and normalised already: abspath would
    cost more than the rest of a 100k-image scan's bookkeeping)."""
    return path if os.path.isabs(path) else os.path.abspath(path)


# How an empty folder source is described, by what it should hold.
_WHAT_A_FOLDER_HOLDS = {"2D images": "files (hidden files are skipped)", "volumes": "volume files or DICOM series"}


def discover_volumes(sources: Iterable[str | os.PathLike]) -> list[VolumeRecord]:
    """The volume records of every source, in a deterministic order (module docstring).

    Raises one :class:`DataValidationError` listing every manifest row that cannot be used (empty path, unknown
    modality) and every source file that is not a volume, or :class:`BadFileError` for a source that does not
    exist (:func:`scan_volume_sources` keeps them all).
    """
    scan = scan_volume_sources(sources)
    scan.log_notes()
    if scan.problems:
        raise DataValidationError(scan.problems)
    return scan.records


def parse_modality(value: str) -> Modality | None:
    """A manifest's modality cell: "CT"/"MR" (any case) or None for an empty cell or "auto"; :class:`RowError`
    for anything else."""
    lowered = value.strip().lower()
    if lowered in ("", "auto"):
        return None
    if lowered in ("ct", "mr"):
        return lowered  # type: ignore[return-value]
    raise RowError(f"modality must be CT, MR or empty, got {value!r}")


def _volume_folder(root: Path, notes: list[tuple[str, str]], ignored_files: list[str]) -> list[VolumeRecord]:
    records = []

    def unreadable(folder: str, reason: str) -> None:
        # Kept as a record: loading then reports the folder and why, instead of its volumes just missing.
        records.append(VolumeRecord(folder, root.name))

    def note(path: str, text: str) -> None:
        notes.append((path, text))

    for folder, subfolders, names in walk_tree(root, skip_hidden=True, note=note, unreadable=unreadable):
        named_like_volumes = [name for name in subfolders if has_suffix(name, VOLUME_FILE_SUFFIXES)]
        subfolders[:] = [name for name in subfolders if name not in named_like_volumes]
        lower_names = {name.lower() for name in names}
        holds_dicom = False
        ignored, unreadable_files = [], []
        for name in sorted([*names, *named_like_volumes]):
            file = os.path.join(folder, name)
            if has_suffix(name, VOLUME_FILE_SUFFIXES) or display_suffix(name) in UNSUPPORTED_VOLUME_FORMATS:
                records.append(VolumeRecord(file, root.name))
            elif _is_detached_data(name, lower_names):
                continue  # read through its header
            elif name in NON_SLICE_DICOM_NAMES or holds_dicom:
                continue  # a series folder's other files are the series check's business
            elif not is_regular_file(file):
                ignored.append(name)
            else:
                try:
                    holds_dicom = pydicom.misc.is_dicom(file)
                except OSError:
                    unreadable_files.append(file)
                    continue
                if not holds_dicom:
                    ignored.append(name)
        if holds_dicom:
            records.append(VolumeRecord(folder, root.name))
        else:
            # Unreadable files in a folder without readable DICOM might be the series: report them.
            records.extend(VolumeRecord(file, root.name) for file in unreadable_files)
            ignored_files.extend(os.path.join(folder, name) for name in ignored)
    return records


def _is_detached_data(name: str, lower_names: set[str]) -> bool:
    lower = name.lower()
    for suffix, headers in _DETACHED_DATA_SUFFIXES.items():  # ".raw.gz" before ".raw"
        if lower.endswith(suffix):
            stem = lower[: -len(suffix)]
            return any(f"{stem}{header}" in lower_names for header in headers)
    return False


def _volume_manifest(manifest: Path, scan: SourceScan) -> None:
    table = read_manifest(manifest, required=[("path", "image")], path_key=("path", "image"), what="volume manifest")
    scan.notes.extend((f"{manifest} line {line}", text) for line, text in table.notes)
    column = table.column("path", "image")

    def parse(row: ManifestRow) -> VolumeRecord:
        path = row.path(column)
        modality = parse_modality(row.text("modality"))
        scan.origins.setdefault(path, f"{manifest} line {row.line}")
        return VolumeRecord(path, row.text("source") or manifest.stem, modality, row.text("label") or None)

    records, problems = table.parse(parse)
    scan.records.extend(records)
    scan.problems.extend(problems)



def volumes_by_name(
    folders: Sequence[str | os.PathLike], suffixes: Sequence[str] = VOLUME_FILE_SUFFIXES
) -> dict[str, str]:
    """``{name: path}`` of every volume file under the folders (recursively, as folder discovery searches), where
    the name is the file name without its volume suffix: LUNA16-style lists name scans by ``seriesuid``, and the
    scan is ``<seriesuid>.mhd`` / ``.nii.gz`` / ... somewhere under the data folders (e.g. in ``subset3/``).
    Only files with one of ``suffixes`` count (a reader that needs world geometry passes the formats that have
    it). Sorted by name. Raises one :class:`DataValidationError` for folders that do not exist and names found
    twice.
    """
    found: dict[str, str] = {}
    errors: list[BadFileError] = []
    for folder in folders:
        if not Path(folder).is_dir():
            errors.append(BadFileError(folder, "volume folder does not exist"))
            continue
        for record in _volume_folder(Path(folder), notes=[], ignored_files=[]):
            name = os.path.basename(record.path.rstrip(os.sep))
            suffix = next((s for s in sorted(suffixes, key=len, reverse=True) if name.lower().endswith(s)), None)
            if suffix is None:
                continue  # a DICOM series folder, another format: not addressed by name
            stem = name[: -len(suffix)]
            if stem in found:
                errors.append(BadFileError(record.path, f"{stem!r} also found as {found[stem]}"))
            else:
                found[stem] = record.path
    if errors:
        raise DataValidationError(errors)
    return dict(sorted(found.items()))
