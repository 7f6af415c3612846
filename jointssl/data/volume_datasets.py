"""Datasets over 3D volumes: the volume stream (two augmented views per volume) and the slice stream
(single 2D slices of the same volumes), both reading decoded volumes from a cache.

Only the deterministic part (decode, validate, reorient, resample, normalise: :func:`load_volume`) is cached;
augmentation runs on every access. Cache modes:

* ``"memory"``: MONAI ``CacheDataset``; every volume is decoded once, when the dataset is built (or, with
  ``preload=False``, on its first access in this process), and kept in RAM (forked DataLoader workers share it
  copy-on-write; a ``spawn`` start method copies it into each worker).
* ``"disk"``: MONAI ``PersistentDataset``; each volume is decoded on first access and written under
  ``cache_dir/volumes-<hash of the loading parameters>/``, so later epochs *and later runs* read the decoded
  tensor instead of the .nii.gz. The key of a volume includes its path, size and modification time, so an
  edited file is decoded again. Files are read back with ``torch.load(weights_only=True)``. Entries are written
  atomically in the cache folder itself (:func:`jointssl.checkpointing.write_atomic`: a temporary file beside
  the entry, fsynced, then renamed over it), not in ``$TMPDIR`` and moved across file systems as MONAI does, so
  that a full disk or a killed run leaves no truncated entry; an entry that cannot be read all the same (a disk
  error, a file damaged by hand) is reported once, naming the entry and the volume, and rebuilt.
* ``"none"``: decode on every access.
* ``"auto"`` (default): "disk" when ``cache_dir`` is given, else "memory".

Validation reuses the cache: :meth:`CachedVolumes.check` loads volumes (so a volume that loads is cached, and a
bad one raises nothing but is reported; a progress bar shows the cache being built), and
:meth:`CachedVolumes.subset` keeps the good ones without decoding them again.
"""

from __future__ import annotations

import copy
import pickle
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import Transform
from torch.utils.data import Dataset

from jointssl.checkpointing import write_atomic
from jointssl.data.errors import BadFileError
from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES, validation_memory_budget
from jointssl.data.validation import FileCheck, ValidationCache, apply_bad_file_policy, check_files
from jointssl.data.volume_io import VolumeRecord, declared_decoded_bytes, load_volume
from jointssl.data.volume_transforms import VolumeViews

logger = logging.getLogger("jointssl.data")

CacheMode = Literal["auto", "none", "memory", "disk"]
# Bump when the cached content or load_volume's output changes, so that old disk caches are not reused.
CACHE_FORMAT_VERSION = 2  # 2: load_volume normalises in float64 and refuses untrainable results (issue 14)
_LOAD_PARAMETERS = set(inspect.signature(load_volume).parameters) - {"path"}
# load_volume arguments that decide only whether a file is refused, not what a loaded volume holds: changing
# them must not start a new disk cache.
_NOT_IN_CACHE_KEY = frozenset({"max_decoded_bytes"})


class _LoadVolume(Transform):
    """Deterministic MONAI transform: a record dict -> the decoded, normalised volume (what gets cached)."""

    def __init__(self, load_kwargs: Mapping[str, Any]):
        self.load_kwargs = dict(load_kwargs)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = dict(self.load_kwargs)
        if item["modality"]:  # a manifest's modality beats the dataset-wide setting
            kwargs["modality"] = item["modality"]
        volume = load_volume(item["path"], **kwargs)
        # Tensors and plain values only, so that disk caches load with torch.load(weights_only=True).
        return {
            "volume": torch.from_numpy(volume.array),
            "spacing": torch.tensor(volume.spacing, dtype=torch.float64),
            "modality": volume.modality,
            "path": item["path"],
            "source": item["source"],
        }


class _VolumeDiskCache(PersistentDataset):
    """MONAI's PersistentDataset whose entries cannot poison later runs (the module docstring): written
    atomically in the cache folder, and an entry that cannot be read (truncated, damaged: ``torch.load`` then
    raises e.g. ``OSError: [Errno 22]`` naming neither the entry nor the volume) or does not hold a volume is
    reported once with both and rebuilt, instead of failing every later run in ``setup``."""

    def _cachecheck(self, item_transformed):
        entry = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        volume_path = item_transformed["path"]
        if entry.is_file():
            cached = _read_cache_entry(entry, volume_path)
            if cached is not None:
                return cached
        item = self._pre_transform(copy.deepcopy(item_transformed))
        try:
            write_atomic(entry, lambda temporary: torch.save(item, temporary))
        except OSError as error:  # a full disk, a read-only cache: the volume is decoded, only not cached
            logger.warning(
                "could not write the volume cache entry %s for %s (%s): it is decoded again when next read",
                entry, volume_path, error,
            )
        return item


def _read_cache_entry(entry: Path, volume_path: str) -> dict[str, Any] | None:
    """A disk-cache entry's item, or None (with one warning naming the entry and the volume, and the entry
    removed) when it cannot be read or does not hold a volume."""
    try:
        item = torch.load(entry, weights_only=True)
        if not isinstance(item, dict) or not isinstance(item.get("volume"), torch.Tensor) or item["volume"].ndim != 3:
            raise ValueError("it does not hold a decoded volume")
        return item
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.load raises OSError, RuntimeError, EOFError, pickle errors
        if isinstance(error, pickle.UnpicklingError):
            # Not torch's advice to retry with weights_only=False: an entry holds tensors only, never code.
            reason = "it holds pickled Python objects, which are not loaded"
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        logger.warning(
            "volume cache entry %s for %s cannot be read (%s): removed, the volume is decoded again",
            entry, volume_path, reason,
        )
        entry.unlink(missing_ok=True)
        return None


class CachedVolumes(Dataset):
    """Decoded, normalised volumes of a list of records, cached (see the module docstring for ``cache``).

    Items are dicts: ``volume`` (float32 ``[N, H, W]`` in [0, 1]), ``spacing`` (``[3]``, mm), ``modality``,
    ``path`` and ``source``. Treat ``volume`` as read-only: with a memory cache it is the cached tensor. A volume
    that cannot be loaded raises :class:`~jointssl.data.errors.BadFileError` naming the file.

    Args:
        records: the volumes.
        load_kwargs: keyword arguments of :func:`~jointssl.data.volume_io.load_volume` (not ``path``).
        cache: "auto", "none", "memory" or "disk".
        cache_dir: folder of the disk cache.
        preload: with the memory cache, decode every volume now (raising one
            :class:`~jointssl.data.errors.DataValidationError` that lists every bad file); False decodes each
            on first access instead, e.g. to validate with :meth:`check` first.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        load_kwargs: Mapping[str, Any] | None = None,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
        preload: bool = True,
    ):
        load_kwargs = dict(load_kwargs or {})
        unknown = set(load_kwargs) - _LOAD_PARAMETERS
        if unknown:
            raise ValueError(
                f"unknown load_volume arguments {sorted(unknown)}; allowed: {sorted(_LOAD_PARAMETERS)}"
            )
        if cache == "auto":
            cache = "disk" if cache_dir is not None else "memory"
        if cache not in ("none", "memory", "disk"):
            raise ValueError(f"cache must be 'auto', 'none', 'memory' or 'disk', got {cache!r}")
        if cache == "disk" and cache_dir is None:
            raise ValueError('cache="disk" needs a cache_dir')
        self.records = list(records)
        self.load_kwargs = load_kwargs
        self.cache: CacheMode = cache
        self.cache_dir = (
            Path(cache_dir) / f"volumes-{_parameters_hash(load_kwargs)}" if cache == "disk" else None
        )
        # The memory cache: one slot per record, None until decoded. Owned here (MONAI fills it in place), so
        # that subset() can share decoded volumes.
        self._memory_cache: list[dict[str, Any] | None] = [None] * len(self.records)
        self._dataset = self._build_dataset()
        if cache == "memory" and preload:
            checks = self.check(num_threads=min(4, os.cpu_count() or 1), progress="caching volumes")
            apply_bad_file_policy(checks, "error")

    def _build_dataset(self) -> Dataset:
        items = [_record_item(record) for record in self.records]
        transform = _LoadVolume(self.load_kwargs)
        if self.cache == "none":
            return MonaiDataset(items, transform)
        if self.cache == "memory":
            # copy_cache=False: nothing modifies the volume in place, so a deep copy per access is waste.
            return CacheDataset(
                items, transform, progress=False, copy_cache=False, runtime_cache=self._memory_cache
            )
        return _VolumeDiskCache(items, transform, cache_dir=self.cache_dir, weights_only=True)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict[str, Any]:
        try:
            return self._dataset[position]
        except RuntimeError as error:
            # MONAI wraps a transform's exception in RuntimeError("applying transform <object>"), which does not
            # say which file failed: surface the BadFileError itself.
            cause = _bad_file_cause(error)
            if cause is None:
                raise
            raise cause from None

    def check(
        self,
        positions: Iterable[int] | None = None,
        num_threads: int = 1,
        progress: str | None = None,
        cache: ValidationCache | None = None,
    ) -> list[FileCheck]:
        """Load the volumes at ``positions`` (default: all), filling the cache, and return for each one its
        :class:`~jointssl.data.validation.FileCheck` (``shape``: slices, rows, columns as loaded).

        Loading runs in ``num_threads`` threads (decoders release the GIL for much of their work), with a progress
        bar labelled ``progress`` on a terminal. With the disk cache a volume cached earlier is read from the
        cache: it was validated when it was written, and its key changes when the file does. A volume whose
        result is in the validation ``cache`` is not loaded at all.
        """

        def load(position: int) -> FileCheck:
            return FileCheck(self.records[position].path, None, tuple(self[position]["volume"].shape))

        return check_files(
            list(range(len(self)) if positions is None else positions),
            load,
            num_threads=num_threads,
            progress=progress,
            cache=cache,
            path_of=lambda position: self.records[position].path,
            cost_of=lambda position: declared_decoded_bytes(self.records[position].path),
            memory_budget=validation_memory_budget(
                self.load_kwargs.get("max_decoded_bytes", DEFAULT_MAX_DECODED_BYTES)
            ),
        )

    def subset(self, positions: Sequence[int]) -> CachedVolumes:
        """The volumes at ``positions``, in that order, sharing this dataset's cache: volumes it already holds in
        memory are not decoded again (the disk cache is shared through its folder anyway)."""
        chosen = copy.copy(self)
        chosen.records = [self.records[position] for position in positions]
        chosen._memory_cache = [self._memory_cache[position] for position in positions]
        chosen._dataset = chosen._build_dataset()
        return chosen


class VolumeDataset(Dataset):
    """The volume stream: each item is one volume as two augmented views.

    Items: ``views`` ``Tensor[2, N, 1, S, S]`` (normalised like the 2D images), ``padding_mask``
    ``BoolTensor[N]`` (True = padded slice; shared by both views, which cover the same slab), ``index``
    (``index_offset`` + position: a global sample index, e.g. for DeepCluster's memory bank) and ``source``.

    Args:
        records: the volumes (e.g. from :func:`~jointssl.data.discovery.discover_volumes`), validated
            beforehand.
        load_kwargs: keyword arguments of :func:`~jointssl.data.volume_io.load_volume` (not ``path``); a
            record's modality overrides ``modality``.
        views: the augmentation; default ``VolumeViews()``.
        cache_dir: folder of the disk cache.
        index_offset: added to every index, so that several datasets get disjoint global indices.
        cache: "auto", "none", "memory" or "disk".
        volumes: reuse an existing :class:`CachedVolumes` (and its cache) instead of
        ``records``/``load_kwargs``.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord] = (),
        load_kwargs: Mapping[str, Any] | None = None,
        views: VolumeViews | None = None,
        cache_dir: str | os.PathLike | None = None,
        index_offset: int = 0,
        cache: CacheMode = "auto",
        volumes: CachedVolumes | None = None,
    ):
        self.volumes = (
            volumes if volumes is not None else CachedVolumes(records, load_kwargs, cache, cache_dir)
        )
        self.views = views if views is not None else VolumeViews()
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.volumes[position]
        views, padding_mask = self.views(item["volume"])
        return {
            "views": views,
            "padding_mask": padding_mask,
            "index": self.index_offset + position,
            "source": item["source"],
        }


class SliceDataset(Dataset):
    """The slice stream: 2D slices of every volume, as samples like the 2D image stream.

    Items: ``image`` ``Tensor[1, H, W]`` in [0, 1] (not normalised: the 2D pipeline augments and normalises
    it), ``index`` (``index_offset`` + the position of the slice in a flat enumeration of all (volume, slice)
    pairs, volume by volume, so indices are dense) and ``source``.

    With ``stride`` k only every k-th slice of a volume is used: ``ceil(n / k)`` of its ``n`` slices, centred
    (the unused remainder is split between both ends, whose slices are often empty).

    Building it reads every volume once to count its slices (from the cache when there is one), unless
    ``slice_counts`` gives them. With ``cache="none"`` each slice decodes its whole volume: use a cache.

    Args:
        volumes: a :class:`CachedVolumes` (e.g. ``VolumeDataset.volumes``, sharing its cache) or records.
        load_kwargs, cache, cache_dir: as for :class:`CachedVolumes` when ``volumes`` is a list of records.
        index_offset: added to every index.
        stride: use every ``stride``-th slice.
        slice_counts: the number of slices of each volume, if known (e.g. from :meth:`CachedVolumes.check`).
    """

    def __init__(
        self,
        volumes: CachedVolumes | Sequence[VolumeRecord],
        load_kwargs: Mapping[str, Any] | None = None,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
        index_offset: int = 0,
        stride: int = 1,
        slice_counts: Sequence[int] | None = None,
    ):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if not isinstance(volumes, CachedVolumes):
            volumes = CachedVolumes(volumes, load_kwargs, cache, cache_dir)
        if volumes.cache == "none":
            logger.warning("SliceDataset without a cache decodes a whole volume for every slice")
        self.volumes = volumes
        self.index_offset = index_offset
        self.stride = stride
        if slice_counts is None:
            slice_counts = [volumes[i]["volume"].shape[0] for i in range(len(volumes))]
        if len(slice_counts) != len(volumes):
            raise ValueError(f"{len(slice_counts)} slice counts for {len(volumes)} volumes")
        self._slice_counts = np.asarray(slice_counts, dtype=np.int64)
        used = (self._slice_counts + stride - 1) // stride  # ceil(n / stride)
        # starts[v] = flat index of the first used slice of volume v; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum(used)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < len(self):
            raise IndexError(f"slice index {position} out of range for {len(self)} slices")
        volume_position, slice_index = self.locate(position)
        item = self.volumes[volume_position]
        # clone: a view would keep the whole cached volume alive in the consumer, and must not be written to.
        image = item["volume"][slice_index].clone()[None]
        return {"image": image, "index": self.index_offset + position, "source": item["source"]}

    def locate(self, position: int) -> tuple[int, int]:
        """The (volume position, slice index within the volume) of a sample position."""
        volume_position = int(np.searchsorted(self._starts, position, side="right")) - 1
        first = int((self._slice_counts[volume_position] - 1) % self.stride) // 2  # centres the used slices
        return volume_position, first + self.stride * (position - int(self._starts[volume_position]))


def collate_volumes(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch VolumeDataset items.

    Returns ``views`` ``[B, 2, N, 1, S, S]``, ``padding_mask`` ``[B, N]``, ``index`` ``[B]``, ``keys`` (the same
    indices as host ints: per-sample random choices read them without a device sync) and ``source`` (a list).
    Items with fewer slices than the longest are padded with zero slices marked as padding.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    longest = max(sample["views"].shape[1] for sample in samples)
    views, masks = [], []
    for sample in samples:
        missing = longest - sample["views"].shape[1]
        views.append(torch.nn.functional.pad(sample["views"], (0, 0, 0, 0, 0, 0, 0, missing)))
        masks.append(torch.nn.functional.pad(sample["padding_mask"], (0, missing), value=True))
    return {
        "views": torch.stack(views),
        "padding_mask": torch.stack(masks),
        "index": torch.tensor([int(sample["index"]) for sample in samples], dtype=torch.long),
        "keys": [int(sample["index"]) for sample in samples],
        "source": [sample["source"] for sample in samples],
    }


def _bad_file_cause(error: BaseException) -> BadFileError | None:
    """The BadFileError in an exception's chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, BadFileError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _record_item(record: VolumeRecord) -> dict[str, Any]:
    """The MONAI data item of a record; its fingerprint makes the disk-cache key change when the file does."""
    return {
        "path": record.path,
        "source": record.source,
        "modality": record.modality or "",
        "fingerprint": _file_fingerprint(record.path),
    }


def _file_fingerprint(path: str) -> str:
    """Size and modification time of a file, or of every file directly in a (DICOM series) folder."""
    target = Path(path)
    try:
        if target.is_dir():
            entries = sorted(
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in target.iterdir() if p.is_file()
            )
        elif target.exists():
            stat = target.stat()
            entries = [(target.name, stat.st_size, stat.st_mtime_ns)]
        else:
            entries = []  # loading will report the missing file
    except OSError:  # unreadable: loading reports the file or folder and why
        entries = []
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _parameters_hash(load_kwargs: Mapping[str, Any]) -> str:
    """Short hash of the loading parameters (and cache format): one cache folder per distinct
    preprocessing."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(load_volume).parameters.items()
        if name != "path"
    }
    # Hash the full effective parameters, so that passing a default explicitly hits the same cache.
    effective = {**defaults, **load_kwargs, "cache_format_version": CACHE_FORMAT_VERSION}
    for name in _NOT_IN_CACHE_KEY:
        effective.pop(name, None)
    text = json.dumps(effective, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
