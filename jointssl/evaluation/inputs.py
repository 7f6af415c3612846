"""What the encoder sees at evaluation: labelled items found in the sources, and their preprocessing.

- Labels: a CSV manifest's ``label`` column, or for a folder source the name of the sub-folder directly under it
  that holds the item (``root/<class>/.../image.png``, ImageFolder layout). Items without either have no label.
- 2D images: decoded with :func:`jointssl.data.image_io.load_image_2d`, the whole image resized to a square
  (antialiased bilinear, no crop), normalised as in training (:func:`normalise`).
- Volumes: :func:`jointssl.data.volume_io.load_volume` with :class:`jointssl.data.JointDataModule`'s defaults
  (modality auto unless a manifest says CT/MR, axial slices, HU window (-1000, 1000), MR percentiles
  (0.5, 99.5)); slices resized in-plane with :func:`jointssl.data.volume_io.resize_slices`, every
  ``slice_stride``-th slice kept, normalised like the 2D images.

Shared by ``jointssl embed`` (:mod:`jointssl.evaluation.features`) and the online callback
(:class:`jointssl.callbacks.online_eval.OnlineKNNEvaluation`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from jointssl.data.discovery import ImageRecord, discover_images, discover_volumes
from jointssl.data.prediction_inputs import normalise
from jointssl.data.volume_io import VolumeRecord, load_volume, resize_slices

#: Volume loading defaults, as in JointDataModule.
VOLUME_SLICE_AXIS = "axial"
VOLUME_HU_WINDOW = (-1000.0, 1000.0)
VOLUME_MR_PERCENTILES = (0.5, 99.5)


def _folder_label(path: str, root: Path) -> str | None:
    """The first sub-folder under ``root`` on the way to ``path``; None for a file directly in ``root``."""
    for base in (Path(os.path.abspath(root.expanduser())), root.expanduser().resolve()):
        try:
            parts = Path(path).relative_to(base).parts
        except ValueError:
            continue
        return parts[0] if len(parts) > 1 else None
    return None


def images_with_labels(sources: Sequence[str]) -> list[tuple[ImageRecord, str | None]]:
    """Every image of the sources (:func:`jointssl.data.discovery.discover_images` order) with its label, or None
    when it has none (module docstring)."""
    found = []
    for source in sources:
        root = Path(source)
        for record in discover_images([source]):
            label = record.label or None
            if label is None and root.is_dir():
                label = _folder_label(record.path, root)
            found.append((record, label))
    return found


def labelled_records(sources: list[str]) -> list[tuple[ImageRecord, str]]:
    """Images with their class: a CSV manifest's ``label`` column, or for a folder the name of the sub-folder
    directly under it that holds the image (``root/<class>/.../image.png``). Unlabelled images are left out."""
    return [(record, str(label)) for record, label in images_with_labels(sources) if label not in (None, "")]


def volumes_with_labels(sources: Sequence[str]) -> list[tuple[VolumeRecord, str | None]]:
    """Every volume of the sources (:func:`jointssl.data.discovery.discover_volumes` order) with its label: a
    manifest's ``label`` column, or the first sub-folder under a folder source; None otherwise."""
    found = []
    for source in sources:
        root = Path(source)
        for record in discover_volumes([source]):
            label = record.label
            if label is None and root.is_dir():
                label = _folder_label(os.path.abspath(record.path), root)
            found.append((record, label or None))
    return found


def preprocess_volume(record: VolumeRecord, volume_size: int, slice_stride: int = 1) -> Tensor:
    """One volume's slices as the encoder takes them: ``[N, 1, volume_size, volume_size]`` float32, loaded and
    normalised per volume by :func:`jointssl.data.volume_io.load_volume` (module docstring), every
    ``slice_stride``-th slice from the first, resized in-plane and normalised like the 2D images."""
    if slice_stride < 1:
        raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
    loaded = load_volume(
        record.path,
        modality=record.modality or "auto",
        slice_axis=VOLUME_SLICE_AXIS,
        hu_window=VOLUME_HU_WINDOW,
        mr_percentiles=VOLUME_MR_PERCENTILES,
    )
    slices = torch.from_numpy(loaded.array[::slice_stride].copy())
    return normalise(resize_slices(slices, volume_size).float())[:, None]
