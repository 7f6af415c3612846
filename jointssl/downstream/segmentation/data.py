"""Data of 3D segmentation (:class:`SegmentationData`): image/label-map pairs from a CSV manifest or two folders,
loaded in the slice layout of :func:`~jointssl.data.load_volume`; training slabs of K slices (with foreground
oversampling) and whole validation volumes; :func:`to_source_order` maps a prediction back to the source file's
voxel order."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from jointssl.data.discovery import parse_modality
from jointssl.data.errors import BadFileError, DataValidationError

# layout_shape is the slice layout of load_volume; a constant label map must be given the same shape.
from jointssl.data.geometry import RAS_AXES_FOR_LAYOUT, layout_shape
from jointssl.data.intensity import to_encoder_input
from jointssl.data.manifest import ManifestRow, read_manifest
from jointssl.data.validation import FileCheck, OnBadFile, apply_bad_file_policy, check_files
from jointssl.data.volume_io import (
    VOLUME_FILE_SUFFIXES,
    ModalityChoice,
    SliceAxis,
    load_volume,
    read_volume,
    read_volume_header,
    resize_slices,
    volume_reader,
)
from jointssl.downstream.base import check_on_bad_file, split_by_volume

log = logging.getLogger("jointssl.downstream")


@dataclass(frozen=True)
class SegmentationPair:
    """An image volume and its label map (same grid)."""

    image: str
    label: str
    modality: Literal["ct", "mr"] | None = None  # None: the data module's setting


@dataclass(frozen=True)
class SegmentationVolume:
    """A loaded pair: the image resized to the working in-plane size, the label at that size and native."""

    image: Tensor  # float32 [N, S, S] in [0, 1]
    label: Tensor  # int16 [N, S, S] class indices (nearest-neighbour resized)
    native_label: Tensor  # int16 [N, H, W] class indices on the label file's own grid (for evaluation)
    path: str


def read_pairs_manifest(manifest: str | os.PathLike, include: str | None = None) -> list[SegmentationPair]:
    """Pairs from a CSV manifest (:mod:`jointssl.data.manifest`) with ``image`` and ``label`` columns (optional
    ``modality``: CT/MR/empty).

    Relative paths are taken relative to the manifest's folder. Rows with an empty label are not pairs and are
    skipped (a study's manifest often lists its unlabelled volumes too). ``include`` keeps only images whose file
    name matches the glob (e.g. ``"PGBM-*_FLAIR*"``). Every bad row is reported in one DataValidationError.
    """
    table = read_manifest(manifest, required=["image", "label"], path_key="image", what="segmentation manifest")

    def parse(row: ManifestRow) -> SegmentationPair | None:
        image = row.path("image")
        if not row.text("label"):
            log.info("%s line %d: %s has no label; not used for segmentation", table.path, row.line, image)
            return None
        if include is not None and not fnmatch.fnmatch(Path(image).name, include):
            return None
        return SegmentationPair(image, row.path("label"), parse_modality(row.text("modality")))

    return table.parse_all(parse)


def pair_folders(
    image_dir: str | os.PathLike, label_dir: str | os.PathLike, label_suffix: str = "", include: str | None = None
) -> list[SegmentationPair]:
    """Pair every volume file (NIfTI, MGH, NRRD, MetaImage, .npy) in ``image_dir`` with ``label_dir/<image stem><label_suffix><same extension>``.

    Raises one DataValidationError listing every image without its label.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise BadFileError(folder, "folder does not exist")
    pairs, missing = [], []
    for image in sorted(image_dir.iterdir()):
        extension = _volume_extension(image.name)
        if extension is None or (include is not None and not fnmatch.fnmatch(image.name, include)):
            continue
        label = label_dir / f"{image.name[: -len(extension)]}{label_suffix}{extension}"
        if label.is_file():
            pairs.append(SegmentationPair(str(image), str(label)))
        else:
            missing.append(BadFileError(image, f"no label map {label}"))
    if missing:
        raise DataValidationError(missing)
    return pairs


def check_same_grid(image_path: str, label_path: str) -> None:
    """Raise BadFileError (naming both files) unless two volume files share shape and affine (read from their
    headers by their readers, so that any two formats with world geometry compare).

    The tolerance on the affine is 1% of the smallest voxel size (float32 headers round). Files without an affine
    in their header (.npy, DICOM series) are checked by their shapes after loading (:func:`load_pair`).
    """
    try:
        image, label = read_volume_header(image_path), read_volume_header(label_path)
    except BadFileError as error:  # the loaders below report the broken file
        log.debug("grid check skipped for %s / %s: %s", image_path, label_path, error)
        return
    if image.affine is None or label.affine is None:
        return
    if image.shape != label.shape:
        raise BadFileError(
            label_path, f"label grid {label.shape} differs from its image {image_path} grid {image.shape}"
        )
    voxel = float(np.min(np.linalg.norm(image.affine[:3, :3], axis=0)))
    difference = float(np.max(np.abs(image.affine - label.affine)))
    if difference > 0.01 * voxel:
        raise BadFileError(
            label_path,
            f"label affine differs from its image {image_path} by up to {difference:.4g} mm (same shape "
            f"{image.shape}, but not the same voxel positions):\nimage affine\n{np.round(image.affine, 4)}\n"
            f"label affine\n{np.round(label.affine, 4)}",
        )


def map_labels(values: np.ndarray, label_mapping: Mapping[int, int] | None, path: str) -> np.ndarray:
    """Label map values -> class indices (int64). Without a mapping, values are class indices already; with one,
    unmapped values become background (0). Non-integer or negative values are a bad file."""
    rounded = np.rint(values)
    if not np.allclose(values, rounded, atol=1e-3):
        bad = values[np.abs(values - rounded) > 1e-3][0]
        raise BadFileError(path, f"label map holds non-integer values (e.g. {bad:g}); is it an image?")
    classes = rounded.astype(np.int64)
    if classes.min() < 0:
        raise BadFileError(path, f"label map holds negative values (min {classes.min()})")
    if label_mapping is None:
        return classes
    mapped = np.zeros_like(classes)
    for source, target in label_mapping.items():
        mapped[classes == int(source)] = int(target)
    return mapped


def load_pair(
    pair: SegmentationPair,
    in_plane_size: int,
    label_mapping: Mapping[int, int] | None = None,
    modality: ModalityChoice = "auto",
    slice_axis: SliceAxis = "axial",
    min_slices: int = 1,
) -> SegmentationVolume:
    """Load an image (normalised) and its label map (nearest) in the same slice layout; check the grids match."""
    check_same_grid(pair.image, pair.label)
    image = load_volume(pair.image, modality=pair.modality or modality, slice_axis=slice_axis, min_slices=1)
    raw_label = _read_label_map(pair.label, slice_axis)
    if raw_label.shape != image.array.shape:
        raise BadFileError(
            pair.label,
            f"label of {raw_label.shape[0]} slices x {raw_label.shape[1:]} does not match its image {pair.image} "
            f"({image.array.shape[0]} slices x {image.array.shape[1:]})",
        )
    if image.array.shape[0] < min_slices:
        raise BadFileError(
            pair.image, f"{image.array.shape[0]} slices; a slab needs at least {min_slices}"
        )
    classes = torch.from_numpy(map_labels(raw_label, label_mapping, pair.label))
    resized_image = resize_slices(torch.from_numpy(image.array), in_plane_size, "linear")
    resized_label = resize_slices(classes.float(), in_plane_size, "nearest").round()
    return SegmentationVolume(
        image=resized_image.float().contiguous(),
        label=resized_label.to(torch.int16).contiguous(),
        native_label=classes.to(torch.int16),
        path=pair.image,
    )


def _read_label_map(path: str, slice_axis: SliceAxis) -> np.ndarray:
    """A label map in the slice layout, original values. A constant map (a volume without any annotated
    structure) is legitimate here although ``read_volume`` rejects constant volumes: being constant, it needs no
    reorientation, only the layout shape."""
    try:
        return read_volume(path, slice_axis=slice_axis, interpolation="nearest", min_slices=1).array
    except BadFileError as error:
        # volume_io's reason for a constant volume (tests/test_segmentation.py covers this path).
        if not error.reason.startswith("constant volume"):
            raise
    header = read_volume_header(path)
    if header.affine is None:
        raise BadFileError(path, "constant label map; only label maps with an affine in their header may be constant")
    value = float(np.asarray(volume_reader(path).decode(path)).flat[0])
    return np.full(layout_shape(header.affine, header.shape, slice_axis), value, dtype=np.float32)


def _volume_extension(name: str) -> str | None:
    lower = name.lower()
    for extension in sorted(VOLUME_FILE_SUFFIXES, key=len, reverse=True):  # ".nii.gz" before ".nii"
        if lower.endswith(extension):
            return name[-len(extension):]
    return None


class SlabDataset(Dataset):
    """Training slabs: ``slab_slices`` consecutive slices of one volume with their labels.

    Items: ``image`` ``[1, K, S, S]`` (normalised), ``label`` ``[1, K, S, S]`` int64. With ``augment``, random
    flips of rows and columns (same for image and label) and a random intensity scale and shift (+-10%).
    """

    def __init__(self, volumes: Sequence[SegmentationVolume], slab_slices: int, augment: bool = True) -> None:
        self.volumes = list(volumes)
        self.slab_slices = slab_slices
        self.augment = augment
        self.slabs = [
            (v, start)
            for v, volume in enumerate(self.volumes)
            for start in range(volume.image.shape[0] - slab_slices + 1)
        ]
        self.has_foreground = torch.tensor(
            [bool((self.volumes[v].label[s : s + slab_slices] > 0).any()) for v, s in self.slabs], dtype=torch.bool
        )

    def __len__(self) -> int:
        return len(self.slabs)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        v, start = self.slabs[position]
        image = self.volumes[v].image[start : start + self.slab_slices]
        label = self.volumes[v].label[start : start + self.slab_slices].long()
        if self.augment:
            for axis in (1, 2):
                if torch.rand(()) < 0.5:
                    image, label = image.flip(axis), label.flip(axis)
            scale = 1.0 + 0.2 * (torch.rand(()) - 0.5)
            shift = 0.2 * (torch.rand(()) - 0.5)
            image = image * scale + shift
        return {"image": to_encoder_input(image)[None].contiguous(), "label": label[None].contiguous()}

    def sampling_weights(self, foreground_fraction: float | None) -> Tensor:
        """Per-slab weights so that a draw holds foreground with probability ``foreground_fraction`` (when
        both kinds of slab exist); None = uniform."""
        weights = torch.ones(len(self.slabs), dtype=torch.double)
        num_foreground = int(self.has_foreground.sum())
        if foreground_fraction is None or num_foreground in (0, len(self.slabs)):
            return weights
        weights[self.has_foreground] = foreground_fraction / num_foreground
        weights[~self.has_foreground] = (1.0 - foreground_fraction) / (len(self.slabs) - num_foreground)
        return weights


class WholeVolumeDataset(Dataset):
    """Validation volumes: ``image`` ``[1, N, S, S]`` (normalised), ``label`` ``[1, N, H, W]`` int64 (native
    grid, or the working grid), ``native_grid`` (the native in-plane size, on which predictions are written),
    ``path`` (the image file), ``slice_axis`` and ``index`` (the volume's position, to count each volume once)."""

    def __init__(
        self, volumes: Sequence[SegmentationVolume], native_labels: bool = True, slice_axis: SliceAxis = "axial"
    ) -> None:
        self.volumes = list(volumes)
        self.native_labels = native_labels
        self.slice_axis = slice_axis

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.volumes[index]
        label = volume.native_label if self.native_labels else volume.label
        return {
            "image": to_encoder_input(volume.image)[None],
            "label": label.long()[None],
            "native_grid": torch.tensor(volume.native_label.shape[-2:]),
            "path": volume.path,
            "slice_axis": self.slice_axis,
            "index": index,
        }


def to_source_order(layout: np.ndarray, path: str, slice_axis: SliceAxis) -> np.ndarray:
    """Undo :func:`~jointssl.data.load_volume`'s slice layout (native grid): an array ``[slices, rows, columns]``
    back in the voxel order of the file ``path``, the array whose voxel -> world affine its reader gives
    (``read_volume_header(path).affine``).

    The layout of a file with world geometry is RAS reoriented (MONAI ``Orientation``, nibabel's
    ``io_orientation`` rule), transposed to ``RAS_AXES_FOR_LAYOUT[slice_axis]`` and flipped in rows and columns;
    a ``.npy`` volume (no geometry) is its ``H x W x D`` array with the last axis first.
    """
    header = read_volume_header(path)
    if header.affine is None:
        return np.moveaxis(layout, 0, 2)
    ras = np.transpose(np.flip(layout, axis=(1, 2)), np.argsort(RAS_AXES_FOR_LAYOUT[slice_axis]))
    file_orientation = nib.orientations.io_orientation(np.asarray(header.affine, dtype=np.float64))
    to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), file_orientation)
    source = np.ascontiguousarray(nib.orientations.apply_orientation(ras, to_file))
    if source.shape != tuple(header.shape[:3]):
        raise ValueError(f"{path}: layout {layout.shape} maps to {source.shape}, not the file's {header.shape}")
    return source


class SegmentationData(LightningDataModule):
    """Image/label-map pairs for :class:`SliceSegmenter`: training slabs and whole validation volumes.

    Sources: a CSV ``manifest`` (``image``, ``label`` columns, optional ``modality``; see
    :func:`read_pairs_manifest`) or ``image_dir`` + ``label_dir`` (see :func:`pair_folders`). Validation volumes
    come from ``val_manifest`` or a fixed random split by volume (``val_fraction``, ``split_seed``).

    Every pair is loaded and checked in ``setup`` (grids must match, labels must be integer maps); bad pairs are
    reported together (``on_bad_file="error"``) or logged and left out ("skip").

    Args:
        label_mapping: label value -> class index (unmapped values -> background 0); None uses the values as
            class indices. E.g. TotalSegmentator liver/spleen/kidneys: ``{5: 1, 1: 2, 2: 3, 3: 3}``.
        include: keep only images whose file name matches this glob.
        modality: "ct", "mr" or "auto" intensity normalisation (a manifest's modality column wins).
        slice_axis: the axis the slices are taken along.
        in_plane_size: every slice is resized to this square size for the network.
        slab_slices: K consecutive slices per training sample (1 = 2D); must equal the model's.
        foreground_fraction: probability that a training slab holds foreground (oversampling); None = uniform.
        samples_per_epoch: slabs drawn per epoch (with replacement); None = the number of slabs.
        augment: random flips and intensity jitter for training slabs.
        evaluate_at_native_resolution: validation labels on their own grid (predictions are resized to it);
            False compares at the working in-plane size.
    """

    def __init__(
        self,
        manifest: str | None = None,
        image_dir: str | None = None,
        label_dir: str | None = None,
        label_suffix: str = "",
        include: str | None = None,
        val_manifest: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        label_mapping: dict[int, int] | None = None,
        modality: ModalityChoice = "auto",
        slice_axis: SliceAxis = "axial",
        in_plane_size: int = 128,
        slab_slices: int = 1,
        foreground_fraction: float | None = 0.5,
        samples_per_epoch: int | None = None,
        augment: bool = True,
        evaluate_at_native_resolution: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        on_bad_file: OnBadFile = "error",
    ) -> None:
        super().__init__()
        if (manifest is None) == (image_dir is None):
            raise ValueError("give either manifest or image_dir (+ label_dir)")
        if image_dir is not None and label_dir is None:
            raise ValueError("image_dir needs label_dir")
        if foreground_fraction is not None and not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1] or None, got {foreground_fraction}")
        check_on_bad_file(on_bad_file)
        if label_mapping is not None:
            negative = {k: v for k, v in label_mapping.items() if int(k) < 0 or int(v) < 0}
            if negative:
                raise ValueError(f"label_mapping values and classes must be >= 0, got {negative}")
        self.save_hyperparameters()
        self.slab_slices = slab_slices
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.label_mapping = {int(k): int(v) for k, v in label_mapping.items()} if label_mapping else None
        self.train_volumes: list[SegmentationVolume] = []
        self.val_volumes: list[SegmentationVolume] = []
        self.max_class_index: int | None = None
        self._split: tuple[list[SegmentationPair], list[SegmentationPair]] | None = None

    def _pairs(self) -> tuple[list[SegmentationPair], list[SegmentationPair]]:
        hp = self.hparams
        if hp.manifest is not None:
            pairs = read_pairs_manifest(hp.manifest, hp.include)
        else:
            pairs = pair_folders(hp.image_dir, hp.label_dir, hp.label_suffix, hp.include)
        if not pairs:
            raise BadFileError(hp.manifest or hp.image_dir, "no image/label pairs found")
        if hp.val_manifest is not None:
            return pairs, read_pairs_manifest(hp.val_manifest, hp.include)
        return split_by_volume(pairs, hp.val_fraction, hp.split_seed)

    def _load(self, pairs: Sequence[SegmentationPair]) -> list[SegmentationVolume]:
        """Load every pair (one at a time: each holds a whole volume) and apply ``on_bad_file``."""
        hp = self.hparams

        def load(pair: SegmentationPair) -> FileCheck:
            volume = load_pair(pair, hp.in_plane_size, self.label_mapping, hp.modality, hp.slice_axis, hp.slab_slices)
            return FileCheck(pair.image, loaded=volume)

        checks = check_files(pairs, load, progress="loading volumes", path_of=lambda pair: pair.image)
        usable = apply_bad_file_policy(checks, hp.on_bad_file, what="segmentation pair")
        return [checks[position].loaded for position in usable]

    def setup(self, stage: str) -> None:
        # Loaded once: fit followed by validate (or a second fit) reuses the volumes.
        if self._split is None:
            self._split = self._pairs()
        train_pairs, val_pairs = self._split
        if stage == "fit" and not self.train_volumes:
            self.train_volumes = self._load(train_pairs)
            if not self.train_volumes:
                raise ValueError("no usable training volume")
        if val_pairs and not self.val_volumes:
            self.val_volumes = self._load(val_pairs)
        all_volumes = self.train_volumes + self.val_volumes
        self.max_class_index = max(int(v.native_label.max()) for v in all_volumes) if all_volumes else None
        log.info(
            "segmentation data: %d training volumes, %d validation volumes, classes 0..%s",
            len(self.train_volumes), len(self.val_volumes), self.max_class_index,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = SlabDataset(self.train_volumes, self.slab_slices, augment=self.hparams.augment)
        sampler = WeightedRandomSampler(
            dataset.sampling_weights(self.hparams.foreground_fraction),
            num_samples=self.hparams.samples_per_epoch or len(dataset),
            replacement=True,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=len(dataset) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # One whole volume per batch: volumes differ in size.
        dataset = WholeVolumeDataset(
            self.val_volumes, self.hparams.evaluate_at_native_resolution, self.hparams.slice_axis
        )
        return DataLoader(dataset, batch_size=1, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        """The validation volumes (``jointssl predict`` writes their predicted label maps)."""
        return self.val_dataloader()

