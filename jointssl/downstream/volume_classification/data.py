"""Data of volume classification (:class:`VolumeClassificationData`): whole-volume labels, or LUNA16-style
candidate slabs.

Data comes in two kinds:

* a whole-volume manifest (``path,label[,modality]``): each volume, resized in-plane, with all its slices (or
  resampled along the slice axis down to ``max_slices``); ragged batches carry a padding mask.
* a candidates CSV, the LUNA16 false-positive-reduction protocol (``seriesuid`` or ``path``, ``coordX``,
  ``coordY``, ``coordZ`` in world millimetres, ``class``): around every candidate a slab of ``num_slices`` slices
  x ``patch_size`` x ``patch_size`` voxels is cut.

World -> voxel (candidates): a world position (x, y, z) in mm is taken in the frame ``world_frame`` (default
"lps": DICOM and ITK physical space, which LUNA16's .mhd files and its CSVs use; "ras": NIfTI / nibabel scanner
space). :func:`jointssl.data.geometry.world_to_layout_index` maps it through the volume's voxel -> RAS affine (read
from its header by its reader) and the same axis permutation and flips that :func:`~jointssl.data.load_volume`
applies to the array, giving the candidate's (slice, row, column) index in the loaded volume. Candidate volumes
must therefore be files with world geometry: NIfTI, MGH/MGZ, NRRD or MetaImage (LUNA16's ``<seriesuid>.mhd`` +
``.raw`` as they are, with ``jointssl[formats]``), not .npy. The slab is sampled on a grid of
``voxel_spacing`` mm (None: the volume's own voxels) with trilinear interpolation; the candidate falls on output
voxel (num_slices // 2, patch_size // 2, patch_size // 2), and the parts of the slab outside the volume are 0 in
[0, 1] intensities (air for CT).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from jointssl.data.discovery import parse_modality, volumes_by_name
from jointssl.data.errors import BadFileError
from jointssl.data.geometry import WorldFrame, parse_world_frame, world_to_layout_index
from jointssl.data.intensity import to_encoder_input
from jointssl.data.manifest import ManifestRow, RowError, read_manifest
from jointssl.data.validation import FileCheck, OnBadFile, apply_bad_file_policy, check_files
from jointssl.data.volume_io import (
    WORLD_GEOMETRY_SUFFIXES,
    ModalityChoice,
    SliceAxis,
    load_volume,
    read_volume_header,
)
from jointssl.downstream.base import check_on_bad_file, split_by_volume

log = logging.getLogger("jointssl.downstream")


def cut_slab(
    volume: Tensor,
    centre: Sequence[float],
    num_slices: int,
    patch_size: int,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    voxel_spacing: Sequence[float] | None = None,
) -> Tensor:
    """A ``[num_slices, patch_size, patch_size]`` slab of ``volume`` ``[N, H, W]`` around ``centre`` (a fractional
    (slice, row, column) index), trilinearly sampled on a grid of ``voxel_spacing`` mm (None: the volume's own
    ``spacing``); the centre falls on output voxel ``(num_slices // 2, patch_size // 2, patch_size // 2)`` and
    positions outside the volume are 0."""
    steps = np.ones(3) if voxel_spacing is None else np.asarray(voxel_spacing, float) / np.asarray(spacing, float)
    axes = []
    for axis, (size, count) in enumerate(zip(volume.shape, (num_slices, patch_size, patch_size))):
        positions = float(centre[axis]) + (torch.arange(count, dtype=torch.float64) - count // 2) * steps[axis]
        # grid_sample with align_corners=True: -1 and 1 are the centres of the first and last voxel.
        axes.append((2.0 * positions / max(size - 1, 1) - 1.0).to(torch.float32))
    grid_slice, grid_row, grid_column = torch.meshgrid(*axes, indexing="ij")
    # grid_sample's last grid dimension is (x, y, z) = (column, row, slice).
    grid = torch.stack([grid_column, grid_row, grid_slice], dim=-1)[None].to(volume.device)
    sampled = F.grid_sample(
        volume[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return sampled[0, 0]


# ----------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class LabelledVolume:
    """One row of a whole-volume manifest."""

    path: str
    label: int
    modality: Literal["ct", "mr"] | None = None


@dataclass(frozen=True)
class Candidate:
    """One row of a candidates CSV: a world position (mm, in the CSV's frame) in a volume, with its class."""

    path: str
    world: tuple[float, float, float]
    label: int
    modality: Literal["ct", "mr"] | None = None


def read_volume_labels(manifest: str | os.PathLike) -> list[LabelledVolume]:
    """A whole-volume manifest (:mod:`jointssl.data.manifest`): ``path`` (or ``image``) and ``label`` columns,
    optional ``modality``; relative paths are relative to the manifest. Every bad row is reported in one
    DataValidationError."""
    table = read_manifest(manifest, required=[("path", "image"), "label"], path_key=("path", "image"),
                          what="volume label manifest")
    column = table.column("path", "image")
    return table.parse_all(
        lambda row: LabelledVolume(row.path(column), row.class_index("label"), parse_modality(row.text("modality")))
    )


def read_candidates(candidates: str | os.PathLike, volume_dir: str | os.PathLike | None = None) -> list[Candidate]:
    """A LUNA16-style candidates CSV (:mod:`jointssl.data.manifest`): ``coordX``, ``coordY``, ``coordZ`` (mm),
    ``class`` (or ``label``), and the volume as ``path`` (relative to the CSV) or ``seriesuid`` (a file
    ``<seriesuid>`` + a suffix of ``WORLD_GEOMETRY_SUFFIXES`` anywhere under ``volume_dir``, which defaults to the
    CSV's folder); optional ``modality``. Every bad row is reported in one DataValidationError."""
    table = read_manifest(
        candidates, required=["coordx", "coordy", "coordz", ("class", "label"), ("path", "seriesuid")],
        what="candidates CSV",
    )
    label_column = table.column("class", "label")
    folder = Path(volume_dir) if volume_dir is not None else table.path.parent
    by_uid: dict[str, str] | None = None

    def volume_of(row: ManifestRow) -> str:
        nonlocal by_uid
        if row.text("path"):
            return row.path("path")
        uid = row.text("seriesuid")
        if not uid:
            raise RowError("neither path nor seriesuid")
        if by_uid is None:  # searched once, and only when some row names its volume by seriesuid
            by_uid = volumes_by_name([folder], suffixes=WORLD_GEOMETRY_SUFFIXES)
        if uid not in by_uid:
            raise RowError(f"no volume {uid!r} ({' / '.join(WORLD_GEOMETRY_SUFFIXES)}) under {folder}")
        return by_uid[uid]

    def parse(row: ManifestRow) -> Candidate:
        world = tuple(row.number(c) for c in ("coordx", "coordy", "coordz"))
        return Candidate(volume_of(row), world, row.class_index(label_column),  # type: ignore[arg-type]
                         parse_modality(row.text("modality")))

    return table.parse_all(parse)


def resample_slices(volume: Tensor, max_slices: int | None) -> Tensor:
    """``[N, H, W]`` with at most ``max_slices`` slices, linearly resampled along the slice axis when longer (the
    whole extent is kept)."""
    if max_slices is None or volume.shape[0] <= max_slices:
        return volume
    resized = F.interpolate(
        volume[None, None], size=(max_slices, *volume.shape[1:]), mode="trilinear", align_corners=True
    )
    return resized[0, 0]


class ClassificationSamples(Dataset):
    """Samples ``[N, S, S]`` in [0, 1] (slabs or whole volumes) and labels.

    Items: ``volume`` ``[N, 1, S, S]`` (normalised), ``label`` (int), ``index`` (position, to count each sample
    once in distributed evaluation), ``path`` (the volume file) and, for candidate slabs, ``world`` (the
    candidate's coordinates as its CSV gives them: several candidates share a path, and the prediction CSV needs
    them to tell the rows apart). With ``augment``: random flips of rows and columns.
    """

    def __init__(
        self, samples: Sequence[Tensor], labels: Sequence[int], paths: Sequence[str], augment: bool = False,
        worlds: Sequence[tuple[float, float, float]] | None = None,
    ) -> None:
        if not len(samples) == len(labels) == len(paths):
            raise ValueError(f"{len(samples)} samples, {len(labels)} labels and {len(paths)} paths")
        if worlds is not None and len(worlds) != len(samples):
            raise ValueError(f"{len(samples)} samples and {len(worlds)} candidate positions")
        self.samples = list(samples)
        self.labels = list(labels)
        self.paths = list(paths)
        self.worlds = list(worlds) if worlds is not None else None
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.samples[index]
        if self.augment:
            for axis in (1, 2):
                if torch.rand(()) < 0.5:
                    volume = volume.flip(axis)
        item = {
            "volume": to_encoder_input(volume)[:, None].contiguous(),
            "label": self.labels[index],
            "index": index,
            "path": self.paths[index],
        }
        if self.worlds is not None:
            item["world"] = self.worlds[index]
        return item


def collate_padded(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, zero-padding the slice axis to the longest; ``padding_mask`` [B, N] is True where padded;
    candidates' ``world`` as ``[B, 3]`` float64 (the CSV's numbers exactly)."""
    longest = max(item["volume"].shape[0] for item in items)
    volumes, masks = [], []
    for item in items:
        volume = item["volume"]
        pad = longest - volume.shape[0]
        volumes.append(F.pad(volume, (0, 0, 0, 0, 0, 0, 0, pad)))
        masks.append(torch.arange(longest) >= volume.shape[0])
    batch = {
        "volume": torch.stack(volumes),
        "padding_mask": torch.stack(masks),
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "path": [item["path"] for item in items],
    }
    if "world" in items[0]:
        batch["world"] = torch.tensor([item["world"] for item in items], dtype=torch.float64)
    return batch


class VolumeClassificationData(LightningDataModule):
    """Whole-volume labels (``manifest``) or LUNA16-style candidates (``candidates``) for :class:`VolumeClassifier`.

    Validation comes from ``val_manifest`` (a second CSV of the same kind) or a fixed random split by volume
    (``val_fraction``, ``split_seed``; all candidates of one volume stay on one side). Every volume is loaded in
    ``setup`` (bad files reported together, or skipped with ``on_bad_file="skip"``); slabs and resized volumes are
    kept in memory (a candidate slab takes ``num_slices * patch_size**2 * 4`` bytes: subsample LUNA16's negatives).

    Args:
        world_frame: frame of the candidates' coordinates, "lps" (LUNA16, DICOM/ITK) or "ras" (NIfTI).
        num_slices, patch_size, voxel_spacing: candidate slab size in voxels and its voxel size in mm
            (slice, row, column); None = the volume's own voxels.
        in_plane_size, max_slices: whole volumes are resized in-plane to this size and resampled along the slice
            axis to at most ``max_slices`` slices (None: keep all).
        modality, slice_axis: as for :func:`~jointssl.data.load_volume` (a CSV's modality column wins).
        augment: random in-plane flips of training samples.
    """

    def __init__(
        self,
        manifest: str | None = None,
        candidates: str | None = None,
        volume_dir: str | None = None,
        val_manifest: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        world_frame: WorldFrame = "lps",
        num_slices: int = 16,
        patch_size: int = 32,
        voxel_spacing: tuple[float, float, float] | None = None,
        in_plane_size: int = 128,
        max_slices: int | None = 64,
        modality: ModalityChoice = "auto",
        slice_axis: SliceAxis = "axial",
        augment: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        on_bad_file: OnBadFile = "error",
    ) -> None:
        super().__init__()
        if (manifest is None) == (candidates is None):
            raise ValueError("give either manifest (whole-volume labels) or candidates (LUNA16-style CSV)")
        parse_world_frame(world_frame)  # ValueError for anything but lps / ras
        check_on_bad_file(on_bad_file)
        if voxel_spacing is not None and (len(voxel_spacing) != 3 or min(voxel_spacing) <= 0):
            raise ValueError(f"voxel_spacing must be 3 positive numbers (slice, row, column) in mm, got {voxel_spacing}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: ClassificationSamples | None = None
        self.val_set: ClassificationSamples | None = None
        self.max_class_index: int | None = None

    # -- reading the CSVs ---------------------------------------------------------------------------------

    def _read(self, path: str) -> list[LabelledVolume] | list[Candidate]:
        if self.hparams.candidates is not None:
            return read_candidates(path, self.hparams.volume_dir)
        return read_volume_labels(path)

    def _split(self) -> tuple[list[Any], list[Any]]:
        items = self._read(self.hparams.candidates or self.hparams.manifest)
        if not items:
            raise BadFileError(self.hparams.candidates or self.hparams.manifest, "no rows")
        if self.hparams.val_manifest is not None:
            return items, self._read(self.hparams.val_manifest)
        volumes = sorted({item.path for item in items})
        train_volumes, _ = split_by_volume(volumes, self.hparams.val_fraction, self.hparams.split_seed)
        train_set = set(train_volumes)
        return [i for i in items if i.path in train_set], [i for i in items if i.path not in train_set]

    # -- loading ----------------------------------------------------------------------------------------

    def _load_volume(self, path: str, modality: str | None, in_plane_size: int | None):
        return load_volume(
            path,
            modality=modality or self.hparams.modality,
            slice_axis=self.hparams.slice_axis,
            in_plane_size=in_plane_size,
        )

    def _build(self, items: Sequence[Any], augment: bool) -> ClassificationSamples:
        """Load every volume once (one at a time: each is decoded whole), cut its samples, apply ``on_bad_file``."""
        samples: list[Tensor] = []
        labels: list[int] = []
        paths: list[str] = []
        worlds: list[tuple[float, float, float]] | None = None
        if self.hparams.candidates is not None:
            worlds = []
            by_volume: dict[str, list[Candidate]] = {}
            for candidate in items:
                by_volume.setdefault(candidate.path, []).append(candidate)
            groups = list(by_volume.items())
            checks = check_files(
                groups,
                lambda group: FileCheck(group[0], loaded=self._candidate_slabs(*group)),
                progress="loading volumes",
                path_of=lambda group: group[0],
            )
            for position in apply_bad_file_policy(checks, self.hparams.on_bad_file, what="volume"):
                samples.extend(checks[position].loaded)
                labels.extend(c.label for c in groups[position][1])
                paths.extend(c.path for c in groups[position][1])
                worlds.extend(c.world for c in groups[position][1])
        else:

            def load(item: Any) -> FileCheck:
                volume = self._load_volume(item.path, item.modality, self.hparams.in_plane_size)
                sample = resample_slices(torch.from_numpy(volume.array), self.hparams.max_slices)
                return FileCheck(item.path, loaded=sample)

            checks = check_files(items, load, progress="loading volumes")
            for position in apply_bad_file_policy(checks, self.hparams.on_bad_file, what="volume"):
                samples.append(checks[position].loaded)
                labels.append(items[position].label)
                paths.append(items[position].path)
        return ClassificationSamples(samples, labels, paths, augment=augment, worlds=worlds)

    def _candidate_slabs(self, path: str, group: Sequence[Candidate]) -> list[Tensor]:
        """Load one volume with world geometry and cut the slab of each of its candidates."""
        header = read_volume_header(path)
        if header.affine is None:
            raise BadFileError(
                path, "candidate volumes need world geometry in their header (NIfTI, MGH, NRRD, MetaImage)"
            )
        volume = self._load_volume(path, group[0].modality, None)
        array = torch.from_numpy(volume.array)
        slabs = []
        for candidate in group:
            centre = world_to_layout_index(
                candidate.world, header.affine, header.shape, self.hparams.slice_axis,
                world_frame=self.hparams.world_frame,
            )
            if np.any(centre < -0.5) or np.any(centre > np.array(array.shape) - 0.5):
                raise BadFileError(
                    path,
                    f"candidate at {candidate.world} mm ({self.hparams.world_frame.upper()}) lies outside the "
                    f"volume (voxel {np.round(centre, 1).tolist()} of {tuple(array.shape)}); wrong world_frame?",
                )
            slabs.append(
                cut_slab(
                    array, centre, self.hparams.num_slices, self.hparams.patch_size,
                    volume.spacing, self.hparams.voxel_spacing,
                )
            )
        return slabs

    def setup(self, stage: str) -> None:
        # Built once: fit followed by validate reuses the samples.
        if self.val_set is not None and (stage != "fit" or self.train_set is not None):
            return
        train_items, val_items = self._split()
        if stage == "fit" and self.train_set is None:
            self.train_set = self._build(train_items, augment=self.hparams.augment)
            if len(self.train_set) == 0:
                raise ValueError("no usable training sample")
        if self.val_set is None:
            self.val_set = self._build(val_items, augment=False)
        labels = (self.train_set.labels if self.train_set else []) + self.val_set.labels
        self.max_class_index = max(labels) if labels else None
        log.info(
            "volume classification data: %d training and %d validation samples",
            len(self.train_set) if self.train_set else 0, len(self.val_set),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_padded,
            drop_last=len(self.train_set) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_padded
        )

    def predict_dataloader(self) -> DataLoader:
        """The validation samples (``jointssl predict`` writes their class probabilities)."""
        return self.val_dataloader()

