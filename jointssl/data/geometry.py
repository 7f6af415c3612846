"""Geometry of volumes: the RAS frame, the slice layout of ``load_volume``, and world <-> voxel coordinates.

Every reader (:mod:`jointssl.data.volume_readers`) gives a volume's voxel -> world affine in MONAI's and nibabel's
convention: file voxel index (i, j, k) -> RAS millimetres (x grows to the patient's left-to-right, y posterior to
anterior, z inferior to superior). DICOM, ITK (MetaImage) and LUNA16's CSVs use LPS millimetres instead, which is
RAS with x and y negated.

:func:`~jointssl.data.volume_io.load_volume` reorients the array to RAS with MONAI ``Orientation`` and then lays it
out as ``[slice, row, column]`` (``RAS_AXES_FOR_LAYOUT``, rows and columns reversed: the radiological layout of
:mod:`jointssl.data.volume_io`). :func:`world_to_layout_index` follows a world position through the same steps, so
a candidate or annotation given in world mm lands on the voxel of the loaded array where it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import nibabel as nib
import numpy as np

#: Frame of world coordinates in millimetres: "lps" (DICOM, ITK / MetaImage, LUNA16's CSVs) or "ras" (NIfTI,
#: nibabel). No default: each use documents its own (LUNA16-style CSVs are LPS). Configs may spell it in capitals
#: (``LPS``); :func:`parse_world_frame` reads either.
WorldFrame = Literal["lps", "ras"]
SliceAxis = Literal["axial", "coronal", "sagittal"]

# MONAI's historical axis labels; passing them explicitly keeps Orientation's meaning fixed across versions.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# For each slice axis: which RAS array axes become (slice, row, column). Rows and columns are then both
# reversed, which gives the radiological layout of volume_io's docstring (RAS index 0 is the patient's left /
# posterior / inferior end, so reversing puts anterior or superior on top and the patient's right on the left).
RAS_AXES_FOR_LAYOUT: dict[str, tuple[int, int, int]] = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
# LPS <-> RAS: x and y change sign (the map is its own inverse).
_LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def parse_world_frame(value: str) -> WorldFrame:
    """The frame named by ``value`` ("lps"/"ras" in any case); ValueError for anything else."""
    frame = str(value).lower()
    if frame not in ("lps", "ras"):
        raise ValueError(f"world frame must be 'lps' or 'ras' (any case), got {value!r}")
    return frame  # type: ignore[return-value]


def voxel_to_world(ras_affine: np.ndarray, world_frame: str) -> np.ndarray:
    """The voxel -> world affine in ``world_frame``, from a voxel -> RAS mm affine (LPS negates x and y)."""
    affine = np.asarray(ras_affine, dtype=np.float64)
    return _LPS_RAS_FLIP @ affine if parse_world_frame(world_frame) == "lps" else affine


def world_to_voxel(ras_affine: np.ndarray, points: np.ndarray, world_frame: str) -> np.ndarray:
    """Fractional voxel indices ``[N, 3]`` (of the array as stored in the file) of world points ``[N, 3]`` in mm
    given in ``world_frame``, from the volume's voxel -> RAS mm affine."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (np.linalg.inv(voxel_to_world(ras_affine, world_frame)) @ homogeneous.T).T[:, :3]


def layout_shape(ras_affine: np.ndarray, shape: Sequence[int], slice_axis: SliceAxis = "axial") -> tuple[int, ...]:
    """The (slices, rows, columns) shape that ``load_volume`` gives a file array of ``shape`` (before any
    resampling or in-plane resizing)."""
    ras_shape = [0, 0, 0]
    for file_axis, (ras_axis, _) in enumerate(_ras_orientation(ras_affine)):
        ras_shape[int(ras_axis)] = int(shape[file_axis])
    return tuple(ras_shape[axis] for axis in RAS_AXES_FOR_LAYOUT[slice_axis])


def world_to_layout_index(
    world: Sequence[float],
    ras_affine: np.ndarray,
    shape: Sequence[int],
    slice_axis: SliceAxis = "axial",
    *,
    world_frame: str,
) -> np.ndarray:
    """Fractional (slice, row, column) index, in the layout of ``load_volume`` (native grid, before resampling or
    in-plane resizing), of a world position in mm.

    Args:
        world: (x, y, z) in mm, in ``world_frame`` ("ras": NIfTI scanner space; "lps": DICOM / ITK, e.g. LUNA16).
        ras_affine: the volume's voxel -> RAS mm affine (:attr:`VolumeHeader.affine`).
        shape: the file's array shape (three axes).
        slice_axis: the slice axis of the loaded volume.
        world_frame: the frame of ``world`` (:func:`parse_world_frame`); no default, so that every caller says.
    """
    file_index = world_to_voxel(ras_affine, np.asarray(world, dtype=np.float64), world_frame)[0]
    # The reorientation of load_volume (MONAI Orientation, which uses this same nibabel rule): file axis a
    # becomes RAS axis ornt[a, 0], reversed when ornt[a, 1] == -1.
    ras_index, ras_shape = np.zeros(3), np.zeros(3)
    for file_axis, (ras_axis, direction) in enumerate(_ras_orientation(ras_affine)):
        size = shape[file_axis]
        ras_shape[int(ras_axis)] = size
        ras_index[int(ras_axis)] = file_index[file_axis] if direction > 0 else size - 1 - file_index[file_axis]
    slice_ras, row_ras, column_ras = RAS_AXES_FOR_LAYOUT[slice_axis]
    # The layout reverses rows and columns (anterior / superior on top, patient right on the left).
    return np.array(
        [
            ras_index[slice_ras],
            ras_shape[row_ras] - 1 - ras_index[row_ras],
            ras_shape[column_ras] - 1 - ras_index[column_ras],
        ]
    )


def _ras_orientation(ras_affine: np.ndarray) -> np.ndarray:
    """nibabel's ``io_orientation``: for each file axis, the nearest RAS axis and its direction (+1 / -1)."""
    return nib.orientations.io_orientation(np.asarray(ras_affine, dtype=np.float64))
