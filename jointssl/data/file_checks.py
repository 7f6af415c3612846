"""File-system checks shared by the 2D and 3D loaders: what kind of thing a path is, why it cannot be read, and a
folder walk that follows symbolic links without looping.

Every problem becomes a :class:`~jointssl.data.errors.BadFileError` reason a researcher can act on ("symbolic link
loop", "permission denied ...") instead of a bare ``OSError`` traceback, and nothing here ever opens a path that is
not a regular file: opening a named pipe blocks forever.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from jointssl.data.errors import BadFileError

#: Called with a path and a note for things a walk handled but a researcher should know about.
NoteSink = Callable[[str, str], None]

#: What one file may decode to by default (``max_decoded_bytes`` of the data module and of ``jointssl check-data``;
#: :func:`check_decoded_size`). 1 GiB is a 512 x 512 x 1024 CT as float32, four times a large real scan, and a
#: 16000 x 16000 grey image; a decoder's peak is about 4x what it decodes to, so that validation as a whole, which
#: admits :data:`VALIDATION_BUDGET_FILES` such files at once (:func:`validation_memory_budget`), stays near 16 GB:
#: what a 24 GB machine with 8 validation threads can give it.
DEFAULT_MAX_DECODED_BYTES = 1 << 30
#: How many files of ``max_decoded_bytes`` validation decodes at once at most, whatever its thread count.
VALIDATION_BUDGET_FILES = 4


def describe_os_error(path: str | os.PathLike, error: OSError, missing: str = "file not found") -> str:
    """A one-line reason for an ``OSError`` met while looking at or reading ``path``."""
    code = error.errno
    if code == errno.ELOOP:
        return "symbolic link loop (the link resolves to itself)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: this user (uid {os.getuid()}) cannot read it"
    if code == errno.ENOENT:
        if os.path.islink(path):
            return f"broken symbolic link (points to {os.readlink(path)!r}, which does not exist)"
        return missing
    if code == errno.ENAMETOOLONG:
        return "path too long (a symbolic link cycle?)"
    return f"cannot access it ({type(error).__name__}: {error.strerror or error})"


def special_file_kind(mode: int) -> str:
    """What a non-regular, non-folder file is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def require_regular_file(path: str | os.PathLike, what: str, missing: str = "file not found") -> os.stat_result:
    """``os.stat(path)`` when ``path`` is a readable regular file (after following links); otherwise raise
    :class:`BadFileError` saying what it is instead. ``what`` names the expected content, e.g. "a PNG file"."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise BadFileError(path, describe_os_error(path, error, missing)) from None
    if stat.S_ISDIR(status.st_mode):
        raise BadFileError(path, f"not a regular file: it is a folder, expected {what}")
    if not stat.S_ISREG(status.st_mode):
        raise BadFileError(path, f"not a regular file: it is {special_file_kind(status.st_mode)}, expected {what}")
    if not os.access(path, os.R_OK):
        raise BadFileError(path, describe_os_error(path, PermissionError(errno.EACCES, "Permission denied")))
    return status


def format_bytes(count: float) -> str:
    """A byte count as a researcher reads it: "3.0 GiB", "512 MiB", "12 KiB"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def check_decoded_size(path: str | os.PathLike, decoded_bytes: int, what: str, max_decoded_bytes: int | None) -> None:
    """The one bound on what a file may decode to, checked from its header before anything is decoded: raise
    :class:`BadFileError` when ``decoded_bytes`` (what the header declares, as the widest array the decoder makes
    of it) exceeds ``max_decoded_bytes`` (None: no bound). ``what`` describes the declared content, e.g.
    "12000 x 12000 RGB pixels as float32". A small file can declare gigabytes (a zlib stream of zeros, a sparse
    file): decoding it first would exhaust the memory of a machine that validates 8 files at once."""
    if max_decoded_bytes is not None and decoded_bytes > max_decoded_bytes:
        raise BadFileError(
            path,
            f"decodes to {format_bytes(decoded_bytes)} ({what}), more than max_decoded_bytes "
            f"{format_bytes(max_decoded_bytes)}: a broken header, or a file far larger than training needs "
            "(downsample or crop it; or raise max_decoded_bytes if this machine has the memory)",
        )


def validation_memory_budget(max_decoded_bytes: int | None) -> int | None:
    """The decoded bytes validation may hold at once over all its threads (None: unbounded), so that a machine's
    memory bounds validation as a whole, not only each file."""
    return None if max_decoded_bytes is None else VALIDATION_BUDGET_FILES * max_decoded_bytes


def not_a_file_reason(path: str | os.PathLike, missing: str = "does not exist") -> str:
    """Why ``path``, which is not a regular file, cannot be read as one, in words: "does not exist", "is a folder,
    not a file", "is a named pipe (FIFO), not a regular file", a broken link... Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return describe_os_error(path, error, missing)
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return f"is {special_file_kind(mode)}, not a regular file"


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file or a link to one; False for folders, pipes, devices, broken or looping links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why the files in ``folder`` cannot be listed, or None when they can."""
    try:
        with os.scandir(folder):
            return None
    except OSError as error:
        return describe_os_error(folder, error, missing="folder not found")


def walk_tree(
    root: str | os.PathLike, skip_hidden: bool, note: NoteSink, unreadable: Callable[[str, str], None]
) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` following symbolic links to folders, visiting each real folder once, in sorted order.

    Yields ``(folder, subfolders, files)`` like ``os.walk``; the caller may prune ``subfolders`` in place. A link
    back to a folder already visited (a symbolic link loop, or two links to one folder) is not followed again and
    reported through ``note``; a folder that cannot be listed is reported through ``unreadable(folder, reason)``
    instead of being skipped silently, as ``os.walk`` would. Links are followed because data folders are often
    links into shared storage.
    """
    visited: set[tuple[int, int]] = set()

    def on_error(error: OSError) -> None:
        failed = error.filename if error.filename is not None else str(root)
        unreadable(str(failed), describe_os_error(failed, error, missing="folder not found"))

    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=on_error):
        try:
            status = os.stat(folder)
        except OSError as error:  # vanished or became unreadable between listing and visiting
            unreadable(folder, describe_os_error(folder, error, missing="folder not found"))
            subfolders[:] = []
            continue
        key = (status.st_dev, status.st_ino)
        if key in visited:
            note(folder, f"symbolic link to an already visited folder ({os.path.realpath(folder)}): not followed")
            subfolders[:] = []
            continue
        visited.add(key)
        if skip_hidden:
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            files = [name for name in files if not name.startswith(".")]
        subfolders.sort()
        yield folder, subfolders, sorted(files)


def has_suffix(name: str, suffixes: tuple[str, ...] | frozenset[str]) -> bool:
    """Case-insensitive ``name.endswith(suffix)`` for any of ``suffixes`` (which may be multi-part, ".nii.gz")."""
    lower = name.lower()
    return any(lower.endswith(suffix) for suffix in suffixes)


def display_suffix(path: str | os.PathLike) -> str:
    """The extension of a path as a researcher writes it: ".nii.gz" rather than ".gz"."""
    name = Path(path).name.lower()
    for double in (".nii.gz",):
        if name.endswith(double):
            return double
    return Path(name).suffix
