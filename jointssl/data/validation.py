"""Validation of input files before training: one check result type, one bad-file policy, one runner, and a cache
of check results so that a restart decodes only new or changed files.

Every data module of jointssl (pretraining and downstream) and ``jointssl check-data`` validate the same way:

* a *check* of one file returns a :class:`FileCheck`: its :class:`~jointssl.data.errors.BadFileError` (None when
  the file is usable), the shape it loads to and the notes on repairs made while loading it;
* :func:`check_files` runs a check over many files in a thread pool (the decoders release the GIL), with a
  progress bar on a terminal, and returns the results in item order;
* :func:`apply_bad_file_policy` applies ``on_bad_file``: ``"error"`` raises one
  :class:`~jointssl.data.errors.DataValidationError` listing every bad file, ``"skip"`` logs each bad file on the
  ``jointssl.data`` logger (under DDP on rank 0 only, so that each is reported once) and leaves it out.

:class:`ValidationCache` keeps each file's check result keyed by its absolute path, size, modification and
status-change time (``st_ctime_ns`` changes with a ``chmod``, which decides whether a file can be read at all),
in a JSON file whose name hashes the settings that decide the result. A changed or new file is checked again, a
deleted one drops out of the cache when it is next written; a cache file that cannot be read is ignored with a
warning.

Progress bars (tqdm) go to stderr and are shown only when stderr is a terminal: Slurm logs and pipes stay clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tqdm import tqdm

from jointssl import distributed
from jointssl.checkpointing import write_atomic
from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES, validation_memory_budget
from jointssl.data.image_io import (
    MIN_IMAGE_SIDE,
    check_image_header,
    check_image_size,
    decode_image_2d,
    declared_decoded_size,
)
from jointssl.data.intensity import check_unit_intensities
from jointssl.data.volume_io import ModalityChoice, declared_decoded_bytes, load_volume, read_volume_header

if TYPE_CHECKING:
    from jointssl.data.discovery import ImageRecord
    from jointssl.data.volume_io import VolumeRecord

logger = logging.getLogger("jointssl.data")

OnBadFile = Literal["error", "skip"]
T = TypeVar("T")
#: Bump when a check's result for the same file and settings can change (a decoder or a rule changed), so that
#: results cached by an older jointssl are not reused.
VALIDATION_CACHE_VERSION = 2  # 2: images and volumes are also checked after normalisation (issue 14)
_CACHE_FORMAT = "jointssl-validation-cache"


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one file: its error (None when usable), the shape it loads to (``(H, W)`` for an
    image, ``(slices, rows, columns)`` for a volume) and the notes on repairs made while loading it.

    ``loaded`` is what a loader keeps of a usable file (a downstream data module's decoded volume); it is never
    cached or sent between ranks."""

    path: str
    error: BadFileError | None = None
    shape: tuple[int, ...] | None = None
    notes: tuple[str, ...] = ()
    loaded: Any = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when the file is usable."""
        return self.error is None

    @classmethod
    def failed(cls, error: BadFileError, path: str | os.PathLike | None = None) -> FileCheck:
        """The check of a bad file (``path`` when the check's path differs from the one the error names)."""
        return cls(str(error.path if path is None else path), error)

    def to_plain(self) -> list[Any]:
        """JSON- and pickle-safe form (a BadFileError does not unpickle: its constructor has two arguments)."""
        error = None if self.error is None else [self.error.path, self.error.reason]
        return [self.path, error, None if self.shape is None else list(self.shape), list(self.notes)]

    @classmethod
    def from_plain(cls, plain: Sequence[Any]) -> FileCheck:
        """The inverse of :meth:`to_plain`; raises ValueError / TypeError for anything else."""
        path, error, shape, notes = plain
        if not isinstance(path, str) or not isinstance(notes, list) or not isinstance(shape, (list, type(None))):
            raise TypeError(f"not a plain FileCheck: {plain!r}")
        return cls(
            path,
            None if error is None else BadFileError(str(error[0]), str(error[1])),
            None if shape is None else tuple(map(int, shape)),
            tuple(map(str, notes)),
        )


# ----------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------


def apply_bad_file_policy(checks: Sequence[FileCheck], on_bad_file: OnBadFile, what: str = "file") -> list[int]:
    """Apply ``on_bad_file`` to checked files and return the positions of the usable ones.

    ``"error"``: raise one :class:`DataValidationError` listing every bad file and its reason, if there is any.
    ``"skip"``: log one warning per bad file (``skipping bad <what> <path>: <reason>``) on the ``jointssl.data``
    logger, on rank 0 only under DDP (every rank holds every finding), and leave them out.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    bad = [check.error for check in checks if check.error is not None]
    if bad and on_bad_file == "error":
        raise DataValidationError(bad)
    if bad and distributed.rank() == 0:
        for error in bad:
            logger.warning("skipping bad %s %s: %s", what, error.path, error.reason)
    return [position for position, check in enumerate(checks) if check.error is None]


# ----------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------


def show_progress() -> bool:
    """Whether progress bars are drawn: only when stderr is a terminal (not a Slurm log or a pipe)."""
    return sys.stderr.isatty()


def check_files(
    items: Sequence[T],
    check_one: Callable[[T], FileCheck],
    num_threads: int = 1,
    progress: str | None = None,
    on_result: Callable[[FileCheck], None] | None = None,
    cache: ValidationCache | None = None,
    path_of: Callable[[T], str] | None = None,
    cost_of: Callable[[T], int] | None = None,
    memory_budget: int | None = None,
) -> list[FileCheck]:
    """Check every item with ``check_one`` in ``num_threads`` threads and return the results in item order.

    Args:
        items: what to check (paths, records, positions, ...).
        check_one: the check of one item; a :class:`BadFileError` it raises becomes the item's result.
        num_threads: threads checking at once.
        progress: the label of a progress bar on stderr (shown only on a terminal, see :func:`show_progress`);
            None draws none.
        on_result: called with each result as soon as it and every earlier one are known (in item order), e.g.
            to print findings while the check runs.
        cache: results of earlier runs: an item whose file is unchanged is not checked again, and every result is
            recorded in it (:meth:`ValidationCache.save` writes them).
        path_of: the file of an item, for the cache and for a raised BadFileError (default: the item itself when
            it is a path, else its ``path`` attribute).
        cost_of: the bytes checking an item decodes, from its header (e.g. :func:`declared_decoded_bytes`); with
            ``memory_budget``, the threads check items at once only while their costs add up to at most the
            budget (:class:`MemoryBudget`), so that the memory of validation as a whole is bounded, not only each
            file's.

    A ``MemoryError`` while checking an item is that item's result (:data:`OUT_OF_MEMORY_REASON`), not the end of
    the check: the other files are still checked and reported.
    """
    path_of = path_of or _item_path
    budget = MemoryBudget(memory_budget) if memory_budget is not None and cost_of is not None else None

    def run_one(item: T) -> FileCheck:
        try:
            if budget is None:
                return check_one(item)
            with budget.reserve(_cost(cost_of, item)):
                return check_one(item)
        except BadFileError as error:
            return FileCheck.failed(error, path_of(item))
        except MemoryError:
            return FileCheck.failed(BadFileError(path_of(item), OUT_OF_MEMORY_REASON), path_of(item))

    # The cache is consulted in this thread, before any decoding: a file's stamp is taken before it is read, so
    # that a file changed while it is checked is checked again next time.
    known: list[tuple[FileCheck | None, str | None]] = (
        [cache.lookup(path_of(item)) for item in items] if cache is not None else [(None, None)] * len(items)
    )
    unknown = [item for item, (hit, _) in zip(items, known) if hit is None]
    results: list[FileCheck] = []
    bar = tqdm(total=len(items), desc=progress, unit="file", disable=progress is None or not show_progress(),
               leave=False, dynamic_ncols=True, file=sys.stderr)
    with bar, _map_in_threads(run_one, unknown, num_threads) as checked:
        for item, (hit, stamp) in zip(items, known):
            result = hit
            if result is None:
                result = next(checked)
                if cache is not None:
                    cache.record(path_of(item), stamp, result)
            results.append(result)
            if on_result is not None:
                on_result(result)
            bar.update()
    return results


#: The reason of a file whose check ran out of memory.
OUT_OF_MEMORY_REASON = (
    "ran out of memory while decoding it (MemoryError): lower max_decoded_bytes to refuse files this large, or "
    "validation_threads (--threads) to decode fewer files at once"
)


class MemoryBudget:
    """Admits work by its declared size against a total: :meth:`reserve` waits while other work holds so much
    that this one's would exceed it. Work larger than the whole budget runs alone rather than never."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self._used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        amount = min(max(0, int(amount)), self.total)
        with self._changed:
            while self._used and self._used + amount > self.total:
                self._changed.wait()
            self._used += amount
        try:
            yield
        finally:
            with self._changed:
                self._used -= amount
                self._changed.notify_all()


def _cost(cost_of: Callable[[T], int], item: T) -> int:
    """An item's declared cost; 0 when its header cannot be read (its check then reports why)."""
    try:
        return int(cost_of(item))
    except Exception:  # noqa: BLE001 - the check of the item reports the same failure with its reason
        return 0


@contextlib.contextmanager
def _map_in_threads(function: Callable, items: Sequence, num_threads: int) -> Iterator[Iterator]:
    """``map(function, items)`` computed by a thread pool (in this thread for one thread or item); leaving the
    context early (an exception) cancels what has not started."""
    if num_threads <= 1 or len(items) <= 1:
        yield map(function, items)
        return
    pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="jointssl-validate")
    try:
        yield pool.map(function, items)
    finally:
        pool.shutdown(cancel_futures=True)


def _item_path(item: Any) -> str:
    """A record's ``path``, or the item itself as a path (not isinstance(item, os.PathLike): that ABC check costs
    more than a cached lookup)."""
    path = getattr(item, "path", None)
    return str(item if path is None else path)


# ----------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------


def file_stamp(path: str | os.PathLike) -> str | None:
    """What identifies a file's current content and readability, as text: size, modification and status-change
    times in ns, and for a folder (a DICOM series) those of every file directly in it. None when it cannot be
    looked at (missing, broken link): such a result is not cached, and checking it again is cheap."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    stamp = f"{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}"
    if not stat.S_ISDIR(status.st_mode):
        return stamp
    parts = [stamp]
    try:
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    inner = entry.stat()
                except OSError:
                    return None
                parts.append(f"{entry.name}:{inner.st_size}:{inner.st_mtime_ns}:{inner.st_ctime_ns}")
    except OSError:
        pass  # an unlistable folder: its own stamp changes when its permissions do
    return "/".join(parts)  # "/" cannot occur in a file name


class ValidationCache:
    """Check results of one kind of file (``kind``: "images" or "volumes") under fixed ``settings``, kept in
    ``<folder>/<kind>-<hash of the settings>.json`` (module docstring).

    :func:`check_files` asks :meth:`lookup` before checking a file and :meth:`record` s every new result;
    :meth:`save` then writes the results of exactly the files looked up in this run, atomically, and only when
    something changed. Under DDP each rank looks up its own shard: :meth:`merge` the other ranks'
    :meth:`entries` into one rank's cache and let that one save, so that one process writes the file.

    The file maps each path to ``"<stamp> <index>"`` into a table of the distinct results (most files share one,
    e.g. "a usable 32 x 32 image"): strings parse several times faster than nested lists, which matters at
    100k files.
    """

    def __init__(self, folder: str | os.PathLike, kind: str, settings: Mapping[str, Any]):
        self.settings = {"kind": kind, "version": VALIDATION_CACHE_VERSION, **settings}
        text = json.dumps(self.settings, sort_keys=True, default=list)
        self.path = Path(folder) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
        self._stored, self._results = self._read()
        self._decoded: dict[int, tuple[str, FileCheck] | None] = {}  # result index -> (its JSON, its check)
        # This run's entries: path -> (stamp, the result as JSON text).
        self._entries: dict[str, tuple[str, str]] = {}
        self._changed = False

    def lookup(self, path: str) -> tuple[FileCheck | None, str | None]:
        """The cached result for ``path`` if the file is unchanged since (else None), and its current stamp."""
        key = _cache_key(path)
        stamp = file_stamp(path)
        entry = self._stored.get(key)
        if stamp is None or entry is None:
            return None, stamp
        stored_stamp, _, index = entry.rpartition(" ")
        if stored_stamp != stamp:
            return None, stamp
        result = self._result(index)
        if result is None:
            return None, stamp  # a damaged entry: check the file again
        text, check = result
        self._entries[key] = (stamp, text)
        return FileCheck(str(path), check.error, check.shape, check.notes), stamp

    def record(self, path: str, stamp: str | None, check: FileCheck) -> None:
        """Keep a new result (taken when the file had ``stamp``); files without a stamp are not cached."""
        if stamp is not None:
            self._entries[_cache_key(path)] = (stamp, json.dumps(check.to_plain()[1:]))
            self._changed = True

    def entries(self) -> tuple[dict[str, tuple[str, str]], bool]:
        """The entries of the files looked up in this run, and whether any of them is new (for :meth:`merge`)."""
        return self._entries, self._changed

    def merge(self, entries: Mapping[str, tuple[str, str]], changed: bool) -> None:
        """Add another rank's :meth:`entries`."""
        self._entries.update(entries)
        self._changed = self._changed or changed

    def save(self) -> None:
        """Write the entries of this run when they differ from the file's (new or changed results, deleted files).
        A failure to write is a warning: the cache only saves time."""
        if not self._changed and self._entries.keys() == self._stored.keys():
            return
        indices: dict[str, int] = {}
        entries = {key: f"{stamp} {indices.setdefault(text, len(indices))}" for key, (stamp, text) in self._entries.items()}
        document = {
            "format": _CACHE_FORMAT,
            "settings": self.settings,
            "results": [json.loads(text) for text in indices],
            "entries": entries,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda temporary: temporary.write_text(json.dumps(document)))
        except OSError as error:
            logger.warning("could not write the validation cache %s: %s", self.path, error)
            return
        self._stored, self._results, self._decoded = entries, document["results"], {}
        self._changed = False

    def _result(self, index: str) -> tuple[str, FileCheck] | None:
        """Result ``index`` of the file's table, as (JSON text, check with an empty path); None when damaged."""
        try:
            position = int(index)
        except ValueError:
            return None
        if position not in self._decoded:
            try:
                plain = self._results[position]
                self._decoded[position] = (json.dumps(plain), FileCheck.from_plain(["", *plain]))
            except (IndexError, TypeError, ValueError):
                self._decoded[position] = None
        return self._decoded[position]

    def _read(self) -> tuple[dict[str, str], list[Any]]:
        """The stored entries and result table; an unreadable, truncated or foreign file is ignored with a
        warning."""
        try:
            with open(self.path, encoding="utf-8") as file:
                document = json.load(file)
        except FileNotFoundError:
            return {}, []
        except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8
            logger.warning("ignoring the unreadable validation cache %s (%s): every file is checked", self.path, error)
            return {}, []
        valid = (
            isinstance(document, dict)
            and document.get("format") == _CACHE_FORMAT
            and document.get("settings") == json.loads(json.dumps(self.settings, default=list))
            and isinstance(document.get("entries"), dict)
            and isinstance(document.get("results"), list)
        )
        if not valid:
            logger.warning("ignoring %s: not a validation cache of these settings: every file is checked", self.path)
            return {}, []
        entries = {key: entry for key, entry in document["entries"].items() if isinstance(entry, str)}
        return entries, document["results"]


def _cache_key(path: str) -> str:
    # Image records are absolute already; abspath (which also normalises) costs more than the rest of a lookup.
    return path if os.path.isabs(path) else os.path.abspath(path)


# ----------------------------------------------------------------------------------------------------------
# The checks of 2D images and 3D volumes
# ----------------------------------------------------------------------------------------------------------


def check_image(
    path: str, min_side: int = MIN_IMAGE_SIDE, max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
) -> FileCheck:
    """Decode one 2D image as training will (:func:`~jointssl.data.image_io.decode_image_2d`) and check its size
    and its [0, 1] intensities (non-finite values are refused, a constant image gets a note: the check volumes get
    too, :func:`~jointssl.data.intensity.check_unit_intensities`).
    An image whose header declares more than ``max_decoded_bytes`` is refused before it is decoded."""
    check_image_header(path, max_decoded_bytes)
    decoded = decode_image_2d(path)
    check_image_size(path, decoded.array, min_side)
    blank = check_unit_intensities(str(path), decoded.array, "decoding to [0, 1]")
    notes = decoded.notes if blank is None else (*decoded.notes, blank)
    return FileCheck(str(path), None, tuple(decoded.array.shape), notes)


def check_images(
    records: Sequence[ImageRecord | str],
    num_threads: int = 8,
    min_side: int = MIN_IMAGE_SIDE,
    progress: str | None = None,
    on_result: Callable[[FileCheck], None] | None = None,
    cache: ValidationCache | None = None,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> list[FileCheck]:
    """Decode every image (records or paths) once and return, in order, each one's :class:`FileCheck`. This is
    the validation of :class:`~jointssl.data.JointDataModule`, of the downstream image data and of ``jointssl
    check-data``. No image may decode to more than ``max_decoded_bytes``, and the threads decode at most
    :func:`~jointssl.data.file_checks.validation_memory_budget` bytes at once."""
    return check_files(
        records,
        lambda record: check_image(_item_path(record), min_side, max_decoded_bytes),
        num_threads,
        progress,
        on_result,
        cache,
        cost_of=lambda record: declared_decoded_size(_item_path(record))[0],
        memory_budget=validation_memory_budget(max_decoded_bytes),
    )


def validate_images(
    records: Sequence[ImageRecord],
    on_bad_file: OnBadFile = "error",
    num_threads: int = 8,
    min_side: int = MIN_IMAGE_SIDE,
    progress: str | None = None,
) -> list[ImageRecord]:
    """Decode every image once and return the usable records (:func:`apply_bad_file_policy`)."""
    checks = check_images(records, num_threads=num_threads, min_side=min_side, progress=progress)
    return [records[position] for position in apply_bad_file_policy(checks, on_bad_file, what="image file")]


def check_volume(item: str | os.PathLike | VolumeRecord, modality: ModalityChoice = "auto", **load_kwargs) -> FileCheck:
    """Load one volume as training will (:func:`~jointssl.data.volume_io.load_volume`; a record's own modality
    overrides ``modality``)."""
    path = _item_path(item)
    volume = load_volume(path, modality=getattr(item, "modality", None) or modality, **load_kwargs)
    return FileCheck(path, None, tuple(volume.array.shape), volume.notes)


def check_volume_header(path: str | os.PathLike) -> FileCheck:
    """What a volume's file and header show without decoding the data, with the reader's own checks and reasons
    (missing, special or empty file, unsupported format, broken header, 2D or 4D;
    :func:`~jointssl.data.volume_io.read_volume_header`): for data modules that decode each volume only when
    training reads it (nodule detection). ``shape`` is the array shape as stored."""
    header = read_volume_header(path)
    return FileCheck(str(path), None, tuple(header.shape), tuple(header.notes))


def check_volumes(
    items: Sequence[str | VolumeRecord],
    num_threads: int = 1,
    modality: ModalityChoice = "auto",
    progress: str | None = None,
    on_result: Callable[[FileCheck], None] | None = None,
    **load_kwargs,
) -> list[FileCheck]:
    """Load every volume once and return, in order, each one's :class:`FileCheck` (each thread holds one decoded
    volume at a time, and the threads together at most
    :func:`~jointssl.data.file_checks.validation_memory_budget` of ``max_decoded_bytes``, a load_volume
    argument)."""
    return check_files(
        items,
        lambda item: check_volume(item, modality, **load_kwargs),
        num_threads,
        progress,
        on_result,
        cost_of=lambda item: declared_decoded_bytes(_item_path(item)),
        memory_budget=validation_memory_budget(load_kwargs.get("max_decoded_bytes", DEFAULT_MAX_DECODED_BYTES)),
    )


def validate_volumes(
    items: Sequence[T],
    on_bad_file: OnBadFile = "error",
    modality: ModalityChoice = "auto",
    num_threads: int = 1,
    progress: str | None = None,
    **load_kwargs,
) -> list[T]:
    """Load every volume (paths or records) once and return the usable ones, in order
    (:func:`apply_bad_file_policy`). ``modality`` and ``load_kwargs`` are those of
    :func:`~jointssl.data.volume_io.load_volume`, so that validation checks what training will load: decoding is
    the only way to find truncated data, NaNs or constant volumes."""
    checks = check_volumes(items, num_threads=num_threads, modality=modality, progress=progress, **load_kwargs)
    return [items[position] for position in apply_bad_file_policy(checks, on_bad_file, what="volume")]
