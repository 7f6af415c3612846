"""Datasets over 3D volumes: the volume stream (two augmented views per volume) and the slice stream
(single 2D slices of the same volumes), both reading decoded volumes from a cache.

Only the deterministic part (decode, validate, reorient, resample, normalise: :func:`load_volume`) is cached;
augmentation runs on every access. Cache modes:

* ``"memory"``: MONAI ``CacheDataset``; every volume is decoded once when the dataset is built and kept in RAM
  (DataLoader workers share it copy-on-write).
* ``"disk"``: MONAI ``PersistentDataset``; each volume is decoded on first access and written under
  ``cache_dir/volumes-<hash of the loading parameters>/``, so later epochs *and later runs* read the decoded
  tensor instead of the .nii.gz. The key of a volume includes its path, size and modification time, so an
  edited file is decoded again. Files are read back with ``torch.load(weights_only=True)``.
* ``"none"``: decode on every access.
* ``"auto"`` (default): "disk" when ``cache_dir`` is given, else "memory".
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import Transform
from torch.utils.data import Dataset

from jointssl.data.volume_io import VolumeRecord, load_volume
from jointssl.data.volume_transforms import VolumeViews

logger = logging.getLogger("jointssl.data")

CacheMode = Literal["auto", "none", "memory", "disk"]
# Bump when the cached content or load_volume's output changes, so that old disk caches are not reused.
CACHE_FORMAT_VERSION = 1
_LOAD_PARAMETERS = set(inspect.signature(load_volume).parameters) - {"path"}


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


class CachedVolumes(Dataset):
    """Decoded, normalised volumes of a list of records, cached (see the module docstring for ``cache``).

    Items are dicts: ``volume`` (float32 ``[N, H, W]`` in [0, 1]), ``spacing`` (``[3]``, mm), ``modality``,
    ``path`` and ``source``. Treat ``volume`` as read-only: with a memory cache it is the cached tensor.
    """

    def __init__(
        self,
        records: Sequence[VolumeRecord],
        load_kwargs: Mapping[str, Any] | None = None,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
    ):
        load_kwargs = dict(load_kwargs or {})
        unknown = set(load_kwargs) - _LOAD_PARAMETERS
        if unknown:
            raise ValueError(
                f"unknown load_volume arguments {sorted(unknown)}; allowed: {sorted(_LOAD_PARAMETERS)}"
            )
        if cache == "auto":
            cache = "disk" if cache_dir is not None else "memory"
        self.records = list(records)
        self.load_kwargs = load_kwargs
        self.cache: CacheMode = cache
        items = [_record_item(record) for record in self.records]
        transform = _LoadVolume(load_kwargs)
        if cache == "none":
            self._dataset: Dataset = MonaiDataset(items, transform)
        elif cache == "memory":
            # copy_cache=False: nothing modifies the volume in place, so a deep copy per access is waste.
            self._dataset = CacheDataset(
                items, transform, num_workers=min(4, os.cpu_count() or 1), progress=False, copy_cache=False
            )
        elif cache == "disk":
            if cache_dir is None:
                raise ValueError('cache="disk" needs a cache_dir')
            self.cache_dir = Path(cache_dir) / f"volumes-{_parameters_hash(load_kwargs)}"
            self._dataset = PersistentDataset(items, transform, cache_dir=self.cache_dir, weights_only=True)
        else:
            raise ValueError(f"cache must be 'auto', 'none', 'memory' or 'disk', got {cache!r}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self._dataset[position]


class VolumeDataset(Dataset):
    """The volume stream: each item is one volume as two augmented views.

    Items: ``views`` ``Tensor[2, N, 1, S, S]`` (normalised like the 2D images), ``padding_mask``
    ``BoolTensor[N]`` (True = padded slice; shared by both views, which cover the same slab), ``index``
    (``index_offset`` + position: a global sample index, e.g. for DeepCluster's memory bank) and ``source``.

    Args:
        records: the volumes (e.g. from :func:`~jointssl.data.volume_io.discover_volumes`), validated
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
    """The slice stream: every 2D slice of every volume, as samples like the 2D image stream.

    Items: ``image`` ``Tensor[1, H, W]`` in [0, 1] (not normalised: the 2D pipeline augments and normalises
    it), ``index`` (``index_offset`` + the position of the slice in a flat enumeration of all (volume, slice)
    pairs, volume by volume, so indices are dense) and ``source``.

    Building it reads every volume once to count its slices (from the cache when there is one). With
    ``cache="none"`` each slice decodes its whole volume: use a cache.

    Args:
        volumes: a :class:`CachedVolumes` (e.g. ``VolumeDataset.volumes``, sharing its cache) or records.
        load_kwargs, cache, cache_dir: as for :class:`CachedVolumes` when ``volumes`` is a list of records.
        index_offset: added to every index.
    """

    def __init__(
        self,
        volumes: CachedVolumes | Sequence[VolumeRecord],
        load_kwargs: Mapping[str, Any] | None = None,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
        index_offset: int = 0,
    ):
        if not isinstance(volumes, CachedVolumes):
            volumes = CachedVolumes(volumes, load_kwargs, cache, cache_dir)
        if volumes.cache == "none":
            logger.warning("SliceDataset without a cache decodes a whole volume for every slice")
        self.volumes = volumes
        self.index_offset = index_offset
        slice_counts = np.array([volumes[i]["volume"].shape[0] for i in range(len(volumes))], dtype=np.int64)
        # starts[v] = flat index of the first slice of volume v; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum(slice_counts)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < len(self):
            raise IndexError(f"slice index {position} out of range for {len(self)} slices")
        volume_position = int(np.searchsorted(self._starts, position, side="right")) - 1
        item = self.volumes[volume_position]
        slice_index = position - int(self._starts[volume_position])
        # clone: a view would keep the whole cached volume alive in the consumer, and must not be written to.
        image = item["volume"][slice_index].clone()[None]
        return {"image": image, "index": self.index_offset + position, "source": item["source"]}


def collate_volumes(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch VolumeDataset items.

    Returns ``views`` ``[B, 2, N, 1, S, S]``, ``padding_mask`` ``[B, N]``, ``index`` ``[B]`` and ``source`` (a
    list). Items with fewer slices than the longest are padded with zero slices marked as padding.
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
        "source": [sample["source"] for sample in samples],
    }


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
    if target.is_dir():
        entries = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in target.iterdir() if p.is_file()
        )
    elif target.exists():
        stat = target.stat()
        entries = [(target.name, stat.st_size, stat.st_mtime_ns)]
    else:
        entries = []  # loading will report the missing file
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
    text = json.dumps(effective, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
