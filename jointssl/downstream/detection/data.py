"""Data for lung nodule detection: LUNA16-style annotations + CT volumes -> MONAI detection samples.

Inputs
    * an annotations CSV with the LUNA16 columns ``seriesuid, coordX, coordY, coordZ, diameter_mm``: one row per
      nodule, its centre in world millimetres and its diameter. LUNA16 gives world coordinates in ITK's LPS frame
      (``world_coordinates="LPS"``, the default; any case); use ``"RAS"`` for coordinates in the NIfTI/nibabel frame.
    * folders of volumes named ``<seriesuid>`` + a suffix of a format with world geometry (LUNA16's ``.mhd`` + ``.raw``
      as they are, ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mgz``, ...; searched recursively). Every volume is a scan;
      a scan without annotation rows is a scan without nodules (it still counts in the FROC's FPs per scan).
      Annotation rows of scans that are not in the folders are ignored (the LUNA16 CSV covers all ten subsets).

Pipeline (MONAI's LUNA16 detection tutorial, ``generate_detection_{train,val}_transform``): load (with the volume's
reader, :mod:`jointssl.data.volume_readers`), reorient to RAS,
optionally resample to ``target_spacing``, clip the HU window to [0, 1]; nodules become ``cccwhd`` boxes (centre,
diameter in every axis) converted to corner boxes and into image (voxel index) coordinates through the volume's
affine (``AffineBoxToImageCoordinated``). Training: random crops of ``patch_size`` centred on nodules or background
(``RandCropBoxByPosNegLabeld``, pos = neg = 1) with box-aware zoom, flips, 90-degree rotations, small rotations and
intensity augmentations. Validation: whole volumes (the detector switches to sliding windows for large ones).
Intensities are finally normalised as the pretraining normalised slices: ``(x - 0.5) / 0.25``.

Boxes are ``[x1, y1, z1, x2, y2, z2]`` in continuous voxel coordinates of the RAS-oriented array (voxel centres at
integer positions); labels are 0 (the one class, "nodule").

:func:`write_synthetic_nodule_ct` writes small synthetic chest CTs with spherical nodules at known positions (for
tests and demos).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from monai.apps.detection.transforms.dictionary import (
    AffineBoxToImageCoordinated,
    BoxToMaskd,
    ClipBoxToImaged,
    ConvertBoxToStandardModed,
    MaskToBoxd,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    RandRotateBox90d,
    RandZoomBoxd,
    StandardizeEmptyBoxd,
)
from monai.data import DataLoader, MetaTensor
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)
from torch import Tensor
from torch.utils.data import Dataset

from jointssl.data.discovery import volumes_by_name
from jointssl.data.errors import BadFileError
from jointssl.data.manifest import ManifestRow, RowError, read_manifest
from jointssl.data.validation import FileCheck, OnBadFile, apply_bad_file_policy, check_files, check_volume_header
from jointssl.data.geometry import RAS_LABELS, parse_world_frame, voxel_to_world, world_to_voxel
from jointssl.data.volume_io import WORLD_GEOMETRY_SUFFIXES, read_volume_header, volume_reader
from jointssl.data.intensity import NORMALIZE_MEAN, NORMALIZE_STD
from jointssl.downstream.base import check_on_bad_file, split_by_volume

log = logging.getLogger("jointssl.downstream")


ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
NODULE_LABEL = 0
# A nodule centre this far (in voxels) outside the volume is an annotation/coordinate-frame error, not rounding.
_OUTSIDE_TOLERANCE_VOXELS = 0.5


@dataclass(frozen=True)
class Nodule:
    """One annotated nodule: centre in world millimetres (in the CSV's frame) and diameter in millimetres."""

    center: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Scan:
    """One CT volume and its nodules."""

    seriesuid: str
    path: str
    nodules: tuple[Nodule, ...] = ()


# ----------------------------------------------------------------------------------------------------
# Reading and validating inputs


def read_annotations(path: str | os.PathLike) -> dict[str, list[Nodule]]:
    """Parse a LUNA16 annotations CSV (:mod:`jointssl.data.manifest`) into ``{seriesuid: [Nodule, ...]}``.

    Raises DataValidationError listing every bad row (missing columns, non-numeric or non-finite values,
    non-positive diameters), each naming the CSV file and its line.
    """
    table = read_manifest(path, required=[c.lower() for c in ANNOTATION_COLUMNS], what="annotations CSV")

    def parse(row: ManifestRow) -> tuple[str, Nodule]:
        uid = row.text("seriesuid")
        if not uid:
            raise RowError("empty seriesuid")
        x, y, z, diameter = (row.number(c.lower()) for c in ANNOTATION_COLUMNS[1:])
        if diameter <= 0:
            raise RowError(f"diameter_mm must be positive, got {diameter}")
        return uid, Nodule((x, y, z), diameter)

    nodules: dict[str, list[Nodule]] = {}
    for uid, nodule in table.parse_all(parse):
        nodules.setdefault(uid, []).append(nodule)
    return nodules


def find_scans(folders: Sequence[str | os.PathLike]) -> dict[str, str]:
    """``{seriesuid: path}`` of every ``<seriesuid>`` volume file in a format with world geometry
    (``WORLD_GEOMETRY_SUFFIXES``) under the folders (recursively), sorted by uid.

    Raises DataValidationError for a missing folder or a seriesuid found twice.
    """
    return volumes_by_name(folders, suffixes=WORLD_GEOMETRY_SUFFIXES)


def boxes_to_world(boxes: np.ndarray, voxel_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``[n, 3]`` (world mm) and diameters ``[n]`` (mm: the mean box extent over the axes) of image-space
    boxes ``[n, 6]`` (x1, y1, z1, x2, y2, z2 in voxels) given the voxel -> world affine of their image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    homogeneous = np.concatenate([centres, np.ones((len(centres), 1))], axis=1)
    world = (np.asarray(voxel_to_world, dtype=np.float64) @ homogeneous.T).T[:, :3]
    voxel_size = np.linalg.norm(np.asarray(voxel_to_world)[:3, :3], axis=0)
    diameters = ((boxes[:, 3:] - boxes[:, :3]) * voxel_size).mean(axis=1)
    return world, diameters


def check_scan(scan: Scan, world_coordinates: str) -> None:
    """Header-level check of one scan by its reader: a readable 3D volume with world geometry, every nodule centre
    inside it.

    Raises BadFileError naming the volume.
    """
    header = read_volume_header(scan.path)
    shape = header.shape
    if header.affine is None:
        raise BadFileError(scan.path, "no world geometry in the header: nodule centres in mm cannot be placed")
    affine = header.affine
    if not scan.nodules:
        return
    voxels = world_to_voxel(affine, np.array([n.center for n in scan.nodules]), world_coordinates)
    low, high = -_OUTSIDE_TOLERANCE_VOXELS, np.array(shape) - 1 + _OUTSIDE_TOLERANCE_VOXELS
    outside = [i for i, v in enumerate(voxels) if np.any(v < low) or np.any(v > high)]
    if outside:
        first = scan.nodules[outside[0]]
        raise BadFileError(
            scan.path,
            f"{len(outside)} nodule centre(s) of seriesuid {scan.seriesuid} lie outside the volume (e.g. world "
            f"{first.center} -> voxel {np.round(voxels[outside[0]], 1).tolist()}, shape {shape}); check "
            f"world_coordinates={world_coordinates!r} (LUNA16 CSVs are LPS)",
        )


def collect_scans(
    folders: Sequence[str | os.PathLike],
    annotations: dict[str, list[Nodule]],
    world_coordinates: str,
    on_bad_file: OnBadFile = "error",
) -> list[Scan]:
    """The scans of the folders with their nodules, checked with the volume reader's header check
    (:func:`~jointssl.data.validation.check_volume_header`) and :func:`check_scan`, without decoding them.

    ``on_bad_file="error"`` raises one DataValidationError listing every bad volume; ``"skip"`` logs and drops them
    (:func:`~jointssl.data.validation.apply_bad_file_policy`).
    """
    check_on_bad_file(on_bad_file)
    scans = [Scan(uid, path, tuple(annotations.get(uid, ()))) for uid, path in find_scans(folders).items()]

    def check(scan: Scan) -> FileCheck:
        header = check_volume_header(scan.path)
        check_scan(scan, world_coordinates)
        return header

    checks = check_files(scans, check, progress="checking volumes")
    return [scans[position] for position in apply_bad_file_policy(checks, on_bad_file, what="volume")]


# ----------------------------------------------------------------------------------------------------
# Transforms


def scan_item(scan: Scan, index: int) -> dict[str, Any]:
    """The dict a detection transform starts from: image path, ``cccwhd`` world boxes, labels, bookkeeping."""
    boxes = np.array([[*n.center, n.diameter_mm, n.diameter_mm, n.diameter_mm] for n in scan.nodules], np.float32)
    return {
        "image": scan.path,
        "box": boxes.reshape(-1, 6),
        "label": np.full(len(scan.nodules), NODULE_LABEL, dtype=np.int64),
        "seriesuid": scan.seriesuid,
        "index": index,
    }


def _load_transforms(
    world_coordinates: str, target_spacing: Sequence[float] | None, hu_window: Sequence[float]
) -> list:
    """Load, orient, resample, window; boxes from world ``cccwhd`` to image corner coordinates."""
    transforms = [
        LoadVolumed(),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys=["image", "box"], dtype=torch.float32),
        EnsureTyped(keys="label", dtype=torch.long),
        StandardizeEmptyBoxd(box_keys="box", box_ref_image_keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=RAS_LABELS),
    ]
    if target_spacing is not None:
        transforms.append(Spacingd(keys="image", pixdim=tuple(target_spacing), mode="bilinear"))
    transforms += [
        ScaleIntensityRanged(
            keys="image", a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True
        ),
        ConvertBoxToStandardModed(box_keys="box", mode="cccwhd"),
        # The affine read here is the one after reorientation/resampling, so the boxes land on the final grid.
        # MONAI's flag name means "the boxes are in LPS world coordinates while the image affine is RAS".
        AffineBoxToImageCoordinated(
            box_keys="box", box_ref_image_keys="image", affine_lps_to_ras=parse_world_frame(world_coordinates) == "lps"
        ),
    ]
    return transforms


class LoadVolumed:
    """Decode ``data["image"]`` (a path) with the reader of its format, as MONAI's LoadImaged does with one fixed
    reader: scans of one folder may mix formats (e.g. LUNA16 .mhd and converted .nii.gz)."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["image"] = volume_reader(data["image"]).decode(data["image"])
        return data


class RecordWorldAffined:
    """Store the image's final voxel -> world affine (in the annotations' frame) under ``"world_affine"``, so that
    detections can be reported in world coordinates (LUNA16 submissions)."""

    def __init__(self, world_coordinates: str) -> None:
        self.world_coordinates = world_coordinates

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        data["world_affine"] = voxel_to_world(np.asarray(data["image"].affine), self.world_coordinates)
        return data


def _finalise_transforms() -> list:
    return [
        NormalizeIntensityd(keys="image", subtrahend=NORMALIZE_MEAN, divisor=NORMALIZE_STD),
        EnsureTyped(keys=["image", "box"], dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False),
    ]


def train_transform(
    patch_size: Sequence[int],
    crops_per_volume: int,
    world_coordinates: str = "LPS",
    target_spacing: Sequence[float] | None = None,
    hu_window: Sequence[float] = (-1000.0, 1000.0),
    augment: bool = True,
) -> Compose:
    """Training transform: a scan item -> a list of ``crops_per_volume`` crops (tutorial's train transform)."""
    transforms = _load_transforms(world_coordinates, target_spacing, hu_window)
    transforms.append(
        RandCropBoxByPosNegLabeld(
            image_keys="image", box_keys="box", label_keys="label", spatial_size=tuple(patch_size),
            whole_box=True, num_samples=crops_per_volume, pos=1, neg=1,
            allow_smaller=True,  # a volume smaller than the patch is taken whole (the detector pads it)
        )
    )
    if augment:
        box_aware = {"image_keys": "image", "box_keys": "box", "box_ref_image_keys": "image"}
        transforms += [
            RandZoomBoxd(**box_aware, prob=0.2, min_zoom=0.7, max_zoom=1.4, padding_mode="constant", keep_size=True),
            ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True),
            RandFlipBoxd(**box_aware, prob=0.5, spatial_axis=0),
            RandFlipBoxd(**box_aware, prob=0.5, spatial_axis=1),
            RandFlipBoxd(**box_aware, prob=0.5, spatial_axis=2),
            RandRotateBox90d(**box_aware, prob=0.75, max_k=3, spatial_axes=(0, 1)),
            # Small rotations move boxes non-rigidly: rotate an ellipsoid mask of each box with the image and take
            # the new boxes from the rotated masks.
            BoxToMaskd(
                box_keys="box", label_keys="label", box_mask_keys="box_mask", box_ref_image_keys="image",
                min_fg_label=0, ellipse_mask=True,
            ),
            RandRotated(
                keys=["image", "box_mask"], mode=["nearest", "nearest"], prob=0.2, range_x=np.pi / 6,
                range_y=np.pi / 6, range_z=np.pi / 6, keep_size=True, padding_mode="zeros",
            ),
            MaskToBoxd(box_keys="box", label_keys="label", box_mask_keys="box_mask", min_fg_label=0),
            DeleteItemsd(keys="box_mask"),
            RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1),
            RandGaussianSmoothd(
                keys="image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)
            ),
            RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
            RandShiftIntensityd(keys="image", prob=0.15, offsets=0.1),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        ]
    else:
        transforms.append(
            ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True)
        )
    return Compose(transforms + _finalise_transforms())


def val_transform(
    world_coordinates: str = "LPS",
    target_spacing: Sequence[float] | None = None,
    hu_window: Sequence[float] = (-1000.0, 1000.0),
) -> Compose:
    """Validation/prediction transform: a scan item -> the whole volume with its boxes in image coordinates and
    its voxel -> world affine (``world_affine``)."""
    return Compose(
        _load_transforms(world_coordinates, target_spacing, hu_window)
        + [RecordWorldAffined(world_coordinates)]
        + _finalise_transforms()
    )


class DetectionDataset(Dataset):
    """Scans through a detection transform; items are dicts (validation) or lists of crop dicts (training)."""

    def __init__(self, scans: Sequence[Scan], transform: Compose) -> None:
        self.scans = list(scans)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        scan = self.scans[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about optional readers and empty crops on every call
            try:
                return self.transform(scan_item(scan, index))
            except BadFileError:
                raise
            except Exception as error:  # a volume that passed the header check but fails to decode
                raise BadFileError(scan.path, f"cannot be read or transformed ({type(error).__name__}: {error})") \
                    from error


def _plain(tensor: Tensor) -> Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def collate_detection(items: Sequence[dict[str, Any] | list[dict[str, Any]]]) -> dict[str, Any]:
    """Flatten items (crop lists or whole volumes) into the detector's batch.

    ``images``: list of ``[1, X, Y, Z]`` tensors (sizes may differ); ``targets``: list of ``{"boxes": [n, 6],
    "labels": [n]}``; ``seriesuids``: list of str; ``indices``: ``LongTensor`` of dataset positions; for whole
    volumes also ``world_affines``: ``[B, 4, 4]`` float64 voxel -> world affines.
    """
    flat = [crop for item in items for crop in (item if isinstance(item, list) else [item])]
    batch = {
        "images": [_plain(crop["image"]) for crop in flat],
        "targets": [
            {"boxes": _plain(crop["box"]).reshape(-1, 6), "labels": _plain(crop["label"]).reshape(-1)}
            for crop in flat
        ],
        "seriesuids": [crop["seriesuid"] for crop in flat],
        "indices": torch.tensor([int(crop["index"]) for crop in flat], dtype=torch.long),
    }
    if all("world_affine" in crop for crop in flat):
        batch["world_affines"] = torch.from_numpy(np.stack([crop["world_affine"] for crop in flat]))
    return batch


# ----------------------------------------------------------------------------------------------------
# Data module


class NoduleDetectionDataModule(LightningDataModule):
    """LUNA16-style nodule detection data (see the module docstring).

    Args:
        annotations: the annotations CSV (``seriesuid, coordX, coordY, coordZ, diameter_mm``).
        volumes: training volume folders (e.g. LUNA16 ``subset0`` .. ``subset8`` converted to NIfTI).
        val_volumes: validation volume folders; None splits ``val_fraction`` of ``volumes`` off (by ``split_seed``).
        predict_volumes: volume folders for ``predict`` (e.g. a test subset; annotations are not needed); None
            predicts the validation scans.
        world_coordinates: frame of the CSV's coordinates (:data:`jointssl.data.geometry.WorldFrame`, any case):
            "LPS" (LUNA16/ITK, the default) or "RAS" (NIfTI/nibabel); messages repeat the spelling given.
        target_spacing: resample to these voxel sizes in mm (RAS x, y, z); None keeps the native grid. The
            tutorial resamples LUNA16 to (0.703125, 0.703125, 1.25).
        hu_window: Hounsfield range clipped and scaled to [0, 1] (jointssl pretraining uses (-1000, 1000)).
        patch_size: training crop size in voxels (x, y, z).
        crops_per_volume: crops drawn from each training volume per step (the tutorial's batch_size).
        batch_size: training volumes per step; a step sees ``batch_size * crops_per_volume`` crops.
        val_batch_size: whole validation volumes per step.
        augment: box-aware spatial and intensity augmentation of the training crops.
        on_bad_file: "error" raises one DataValidationError listing every bad volume; "skip" drops them.
    """

    def __init__(
        self,
        annotations: str = "data/luna16/annotations.csv",
        volumes: Sequence[str] = ("data/luna16/train",),
        val_volumes: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        predict_volumes: Sequence[str] | None = None,
        world_coordinates: str = "LPS",
        target_spacing: tuple[float, float, float] | None = (0.703125, 0.703125, 1.25),
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        patch_size: tuple[int, int, int] = (192, 192, 80),
        crops_per_volume: int = 4,
        batch_size: int = 1,
        val_batch_size: int = 1,
        augment: bool = True,
        num_workers: int = 4,
        on_bad_file: OnBadFile = "error",
    ) -> None:
        super().__init__()
        parse_world_frame(world_coordinates)  # ValueError for anything but lps / ras
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive voxel counts, got {patch_size}")
        if target_spacing is not None and (len(target_spacing) != 3 or min(target_spacing) <= 0):
            raise ValueError(f"target_spacing must be 3 positive sizes in mm, got {target_spacing}")
        if val_volumes is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when val_volumes is not given, got {val_fraction}")
        if hu_window[1] <= hu_window[0]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window}")
        self.annotations = annotations
        self.volumes = list(volumes)
        self.val_volumes = list(val_volumes) if val_volumes is not None else None
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.predict_volumes = list(predict_volumes) if predict_volumes is not None else None
        self.world_coordinates = world_coordinates
        self.target_spacing = tuple(target_spacing) if target_spacing is not None else None
        self.hu_window = tuple(hu_window)
        self.patch_size = tuple(patch_size)
        self.crops_per_volume = crops_per_volume
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.augment = augment
        self.num_workers = num_workers
        self.on_bad_file = on_bad_file
        self.train_scans: list[Scan] = []
        self.val_scans: list[Scan] = []
        self.predict_scans: list[Scan] = []

    def setup(self, stage: str | None = None) -> None:
        """Read the annotations, find and check every volume (before any training step), split."""
        if stage == "predict" and self.predict_volumes is not None:
            annotations = read_annotations(self.annotations) if Path(self.annotations).is_file() else {}
            self.predict_scans = collect_scans(self.predict_volumes, annotations, self.world_coordinates,
                                               self.on_bad_file)
            if not self.predict_scans:
                raise ValueError(f"no volumes (<seriesuid>.mhd, .nii.gz, ...) found in {self.predict_volumes}")
            return
        if self.train_scans or self.val_scans:
            return
        annotations = read_annotations(self.annotations)
        train = collect_scans(self.volumes, annotations, self.world_coordinates, self.on_bad_file)
        if self.val_volumes is not None:
            val = collect_scans(self.val_volumes, annotations, self.world_coordinates, self.on_bad_file)
        else:
            train, val = split_by_volume(train, self.val_fraction, self.split_seed)
        overlap = {s.seriesuid for s in train} & {s.seriesuid for s in val}
        if overlap:
            raise ValueError(f"{len(overlap)} seriesuid(s) are in both the training and validation volumes, "
                             f"e.g. {min(overlap)}")
        if not train:
            raise ValueError(f"no training volumes (<seriesuid>.mhd, .nii.gz, ...) found in {self.volumes}")
        if not val:
            raise ValueError(f"no validation volumes found in {self.val_volumes or self.volumes}")
        self.train_scans, self.val_scans = train, val
        used = {s.seriesuid for s in train + val}
        log.info(
            "nodule detection: %d training scans (%d nodules), %d validation scans (%d nodules); %d annotated "
            "series not among the volumes are unused",
            len(train), sum(len(s.nodules) for s in train), len(val), sum(len(s.nodules) for s in val),
            len(set(annotations) - used),
        )

    def train_dataset(self) -> DetectionDataset:
        transform = train_transform(
            self.patch_size, self.crops_per_volume, self.world_coordinates, self.target_spacing, self.hu_window,
            self.augment,
        )
        return DetectionDataset(self.train_scans, transform)

    def val_dataset(self) -> DetectionDataset:
        return DetectionDataset(self.val_scans, val_transform(self.world_coordinates, self.target_spacing,
                                                              self.hu_window))

    def train_dataloader(self) -> DataLoader:
        # MONAI's DataLoader seeds the random transforms of every worker from torch's seed (seed_everything).
        return DataLoader(
            self.train_dataset(), batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
            collate_fn=collate_detection, persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset(), batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_detection, persistent_workers=self.num_workers > 0,
        )


    def predict_dataloader(self) -> DataLoader:
        scans = self.predict_scans if self.predict_volumes is not None else self.val_scans
        dataset = DetectionDataset(scans, val_transform(self.world_coordinates, self.target_spacing, self.hu_window))
        return DataLoader(
            dataset, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_detection,
        )


# ----------------------------------------------------------------------------------------------------
# Synthetic chest CT


@dataclass(frozen=True)
class SyntheticNoduleCT:
    """What :func:`write_synthetic_nodule_ct` wrote: the volume folder, the CSV and the ground truth."""

    volumes: Path
    annotations: Path
    #: per seriesuid: the nodules' (voxel centre in the stored array, diameter in mm)
    nodules: dict[str, list[tuple[tuple[float, float, float], float]]]
    affines: dict[str, np.ndarray]


# Hounsfield values of the synthetic tissues.
_AIR_HU, _LUNG_HU, _SOFT_TISSUE_HU, _NODULE_HU = -1000.0, -850.0, 40.0, 60.0


def write_synthetic_nodule_ct(
    root: str | os.PathLike,
    num_scans: int = 4,
    shape: tuple[int, int, int] = (48, 48, 32),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    nodules_per_scan: tuple[int, int] = (1, 2),
    diameter_mm: tuple[float, float] = (8.0, 14.0),
    world_coordinates: str = "LPS",
    num_empty_scans: int = 0,
    seed: int = 0,
) -> SyntheticNoduleCT:
    """Write small synthetic chest CTs with spherical nodules, as NIfTI + a LUNA16-style annotations CSV.

    Each scan: air outside an elliptic soft-tissue body (40 HU) holding two elliptic lungs (-850 HU); nodules are
    60 HU spheres inside the lungs; Gaussian noise (20 HU). The affine stores the array in LPS-like order (x and y
    decreasing: ``diag(-sx, -sy, sz)``) with a scan-specific, non-zero origin, so world -> voxel goes through a
    flip and an offset. The last ``num_empty_scans`` scans have no nodule. Coordinates in the CSV are in the
    ``world_coordinates`` frame.
    """
    root = Path(root)
    volumes = root / "volumes"
    volumes.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    grid_mm = grid * np.asarray(spacing)
    lungs = _lung_mask(shape)
    rows, truth, affines = [], {}, {}
    for scan_index in range(num_scans):
        uid = f"1.3.6.1.4.1.14519.5.2.1.{seed}.{scan_index:04d}"
        origin = np.array([120.0 + 7.0 * scan_index, 95.0 - 3.0 * scan_index, -310.0 + 11.0 * scan_index])
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        affine[:3, 3] = origin
        volume = np.where(_body_mask(shape), _SOFT_TISSUE_HU, _AIR_HU)
        volume[lungs] = _LUNG_HU
        count = 0 if scan_index >= num_scans - num_empty_scans else int(rng.integers(nodules_per_scan[0],
                                                                                        nodules_per_scan[1] + 1))
        placed: list[tuple[np.ndarray, float]] = []
        for _ in range(count):
            center, diameter = _place_nodule(rng, lungs, grid, spacing, diameter_mm, placed)
            inside = np.linalg.norm(grid_mm - center * np.asarray(spacing), axis=-1) <= diameter / 2
            volume[inside] = _NODULE_HU
            placed.append((center, diameter))
        volume = volume + rng.normal(0.0, 20.0, size=shape)
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), volumes / f"{uid}.nii.gz")
        truth[uid] = [(tuple(float(c) for c in center), float(d)) for center, d in placed]
        affines[uid] = affine
        for center, diameter in placed:
            world = (affine @ np.append(center, 1.0))[:3]
            if parse_world_frame(world_coordinates) == "lps":
                world = world * np.array([-1.0, -1.0, 1.0])
            rows.append([uid, *(f"{v:.4f}" for v in world), f"{diameter:.4f}"])
    annotations = root / "annotations.csv"
    with annotations.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(rows)
    return SyntheticNoduleCT(volumes, annotations, truth, affines)


def _body_mask(shape: tuple[int, int, int]) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.95) ** 2 + (y / 0.8) ** 2 <= 1.0
    return np.repeat(body[:, :, None], shape[2], axis=2)


def _lung_mask(shape: tuple[int, int, int]) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    left = ((x - 0.42) / 0.36) ** 2 + (y / 0.6) ** 2 <= 1.0
    right = ((x + 0.42) / 0.36) ** 2 + (y / 0.6) ** 2 <= 1.0
    lungs = np.repeat((left | right)[:, :, None], shape[2], axis=2)
    lungs[:, :, [0, -1]] = False  # soft tissue caps above and below
    return lungs


def _place_nodule(
    rng: np.random.Generator,
    lungs: np.ndarray,
    grid: np.ndarray,
    spacing: tuple[float, float, float],
    diameter_mm: tuple[float, float],
    placed: list[tuple[np.ndarray, float]],
) -> tuple[np.ndarray, float]:
    """A random sphere well inside the lungs and apart from the nodules already placed (rejection sampling)."""
    spacing_arr = np.asarray(spacing)
    candidates = np.argwhere(lungs)
    for _ in range(1000):
        diameter = float(rng.uniform(*diameter_mm))
        center = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=3)
        # A margin of two voxels of lung around every nodule: its surroundings are dark in every direction.
        sphere = np.linalg.norm((grid - center) * spacing_arr, axis=-1) <= diameter / 2 + 2 * max(spacing)
        apart = all(np.linalg.norm((center - c) * spacing_arr) > (diameter + d) / 2 + 2 * max(spacing)
                    for c, d in placed)
        if apart and lungs[sphere].all():
            return center, diameter
    raise ValueError(f"cannot place a {diameter_mm} mm nodule in lungs of shape {lungs.shape}; use a larger volume")
