"""Loading, validation and discovery of 3D volumes: NIfTI (.nii/.nii.gz), NumPy (.npy), DICOM series folders.

Every volume comes out as a float32 stack of 2D slices ``[N, H, W]`` in one documented anatomical layout:

* NIfTI and DICOM volumes are read with MONAI (``LoadImage`` with ``NibabelReader`` / ``PydicomReader``),
  reoriented to the canonical RAS frame with ``Orientation``, optionally resampled (``Spacing``, ``Resize``)
  and then laid out as slices along the chosen axis, in radiological display convention:

  ============  ===========================  ==========================  =========================
  slice_axis    slices (index 0 -> N-1)      rows (top -> bottom)        columns (left -> right)
  ============  ===========================  ==========================  =========================
  axial         inferior -> superior         anterior -> posterior       patient right -> left
  coronal       posterior -> anterior        superior -> inferior        patient right -> left
  sagittal      patient left -> right        superior -> inferior        anterior -> posterior
  ============  ===========================  ==========================  =========================

  i.e. an axial slice shows the patient as seen from the feet, with the patient's right on the viewer's left.
  Oblique acquisitions are not resampled: ``Orientation`` snaps them to the nearest canonical axes.
* ``.npy`` volumes follow the layout of the paper's public code: ``H x W x D`` with no affine. Their axes are
  taken as given (rows = H, columns = W, slices = the last axis) whatever ``slice_axis`` says, their spacing
  is unknown and reported as 1 mm, and ``target_spacing`` does not apply to them.

Intensities are normalised per volume to [0, 1]: CT by clipping a Hounsfield window, MR by clipping
percentiles. ``modality="auto"`` uses the DICOM ``Modality`` tag when there is one (CT -> ct, MR -> mr), and
otherwise the value range: a volume whose 1st percentile is at most -500 holds air in Hounsfield units and is
CT; anything else is MR. A tightly cropped CT without air is therefore taken as MR: give its modality in the
manifest or as an argument.

Bad inputs raise :class:`~jointssl.data.errors.BadFileError` naming the file and the reason;
:func:`validate_volumes` checks many files and reports every bad one at once (or logs and skips them).
What is rejected: unreadable, empty, truncated or non-NIfTI files, broken NIfTI headers (dimension count outside
1-7, non-positive sizes, unknown data type, more than 2**31 voxels, data shorter than the header declares), 2D and
4D images (a 4th axis of length 1 is dropped), non-positive voxel sizes (pixdim), NaN or infinite voxels, constant
volumes, fewer than ``min_slices`` slices, DICOM folders with several series, mixed orientations, missing or
duplicated slices, or slices without pixel data, and resampling to a ``target_spacing`` that would give more than
2**31 voxels. What is accepted with a note (:attr:`RawVolume.notes`, printed by ``jointssl check-data``): a
singleton 4th axis dropped, and strongly anisotropic voxels (largest side more than 20 times the smallest; slices
are used as stored).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import nibabel as nib
import numpy as np
import pydicom
import pydicom.misc
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirst, LoadImage, Orientation, Resize, Spacing
from monai.utils import convert_to_tensor

from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.file_checks import (
    describe_os_error,
    display_suffix,
    has_suffix,
    is_regular_file,
    require_regular_file,
    walk_tree,
)

logger = logging.getLogger("jointssl.data")

Modality = Literal["ct", "mr"]
ModalityChoice = Literal["ct", "mr", "auto"]
SliceAxis = Literal["axial", "coronal", "sagittal"]
Interpolation = Literal["linear", "nearest"]
OnBadFile = Literal["error", "skip"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NUMPY_SUFFIX = ".npy"
VOLUME_FILE_SUFFIXES = (*NIFTI_SUFFIXES, NUMPY_SUFFIX)
# 3D formats researchers hold that jointssl does not read: found in a folder, they are reported, not ignored.
UNSUPPORTED_VOLUME_FORMATS = {
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mgz": "FreeSurfer MGH",
    ".mgh": "FreeSurfer MGH",
    ".hdr": "Analyze",
    ".img": "Analyze",
    ".vtk": "VTK",
}
# DICOM media index files hold no slice.
_NON_SLICE_DICOM_NAMES = frozenset({"DICOMDIR"})

# For each slice axis: which RAS array axes become (slice, row, column). Rows and columns are then both
# reversed, which gives the radiological layout of the module docstring (RAS index 0 is the patient's left /
# posterior / inferior end, so reversing puts anterior or superior on top and the patient's right on the
# left).
RAS_AXES_FOR_LAYOUT: dict[str, tuple[int, int, int]] = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
# MONAI's historical axis labels; passing them explicitly keeps Orientation's meaning fixed across versions.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Air is about -1000 HU; no MR scale puts 1% of a volume this far below zero.
_CT_AIR_THRESHOLD_HU = -500.0
_DICOM_HEADER_TAGS = [
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "Modality",
]
# Two slices closer than this along the normal are the same slice stored twice.
_DUPLICATE_POSITION_MM = 1e-2
# Relative deviation from the median slice gap above which a series has gaps or irregular spacing.
_SLICE_GAP_TOLERANCE = 0.1
# No volume jointssl trains on comes near this; a header that declares more is broken (and decoding it would
# try to allocate that much memory).
MAX_VOXELS = 2**31
# Voxels whose largest side exceeds this many times the smallest get a note (thick slices: a slab of N slices
# then spans far more anatomy than its in-plane size suggests).
ANISOTROPY_NOTE_RATIO = 20.0


@dataclass(frozen=True)
class RawVolume:
    """A volume in the slice layout of this module, with its original intensity values (not normalised)."""

    array: np.ndarray  # float32 [N_slices, H, W]
    spacing: tuple[float, float, float]  # mm between slices, rows, columns
    path: str
    dicom_modality: Modality | None  # from the DICOM Modality tag; None for NIfTI/.npy or other modalities
    notes: tuple[str, ...] = ()  # repairs and oddities a researcher should know about (module docstring)


@dataclass(frozen=True)
class LoadedVolume:
    """A volume ready for augmentation: slices first, intensities normalised to [0, 1]."""

    array: np.ndarray  # float32 [N_slices, H, W] in [0, 1]
    spacing: tuple[float, float, float]  # mm between slices, rows, columns
    path: str
    modality: Modality  # the modality whose normalisation was applied
    notes: tuple[str, ...] = ()  # as RawVolume.notes


@dataclass(frozen=True)
class VolumeRecord:
    """One volume found by :func:`discover_volumes`: a file or a DICOM series folder."""

    path: str
    source: str  # name of the folder or manifest it came from
    modality: Modality | None = None  # None: decided when loading ("auto")


# ----------------------------------------------------------------------------------------------------
# Loading


def load_volume(
    path: str | os.PathLike,
    modality: ModalityChoice = "auto",
    slice_axis: SliceAxis = "axial",
    in_plane_size: int | None = None,
    target_spacing: tuple[float, float, float] | None = None,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
    min_slices: int = 3,
) -> LoadedVolume:
    """Read, validate, reorient, resample and normalise one volume.

    Args:
        path: a .nii/.nii.gz/.npy file or a folder holding one DICOM series.
        modality: "ct" (clip ``hu_window``, scale to [0, 1]), "mr" (clip ``mr_percentiles``, scale), or "auto"
            (see the module docstring for the rule).
        slice_axis: the anatomical axis the slices are taken along (layout in the module docstring).
        in_plane_size: resize every slice to this square size; None keeps the native in-plane size.
        target_spacing: resample to this spacing in mm, in (slice, row, column) order; None keeps it.
        hu_window: the Hounsfield window for CT.
        mr_percentiles: the lower and upper percentiles for MR.
        min_slices: fewer slices than this (before or after resampling) make the volume a bad file.

    Raises:
        BadFileError: the file cannot be read or is not a usable 3D volume.
    """
    if modality not in ("ct", "mr", "auto"):
        raise ValueError(f"modality must be 'ct', 'mr' or 'auto', got {modality!r}")
    raw = read_volume(path, slice_axis, in_plane_size, target_spacing, "linear", min_slices)
    resolved = modality if modality != "auto" else infer_modality(raw)
    if resolved == "ct":
        normalised = _scale_to_unit(raw.array, *hu_window)
    else:
        normalised = _scale_to_unit(raw.array, *_robust_range(raw.array, mr_percentiles))
    return LoadedVolume(
        array=normalised, spacing=raw.spacing, path=raw.path, modality=resolved, notes=raw.notes
    )


def read_volume(
    path: str | os.PathLike,
    slice_axis: SliceAxis = "axial",
    in_plane_size: int | None = None,
    target_spacing: tuple[float, float, float] | None = None,
    interpolation: Interpolation = "linear",
    min_slices: int = 3,
) -> RawVolume:
    """Read and validate one volume and bring it into the slice layout, keeping its original values.

    This is :func:`load_volume` without intensity normalisation; use ``interpolation="nearest"`` for label
    maps so that they land on exactly the grid of their image.
    """
    if slice_axis not in RAS_AXES_FOR_LAYOUT:
        raise ValueError(f"slice_axis must be one of {sorted(RAS_AXES_FOR_LAYOUT)}, got {slice_axis!r}")
    path_str = str(path)
    kind = volume_kind(path_str)
    notes: list[str] = []
    if kind == "npy":
        array = _read_npy(path_str)
        spacing = (1.0, 1.0, 1.0)
        dicom_modality = None
    else:
        if kind == "nifti":
            notes.extend(_check_nifti_header(path_str))
            image = _decode(path_str, _nifti_loader())
            dicom_modality = None
        else:
            dicom_modality = _check_dicom_series(path_str, min_slices)
            image = _decode(path_str, _dicom_loader())
        array, spacing = _to_slice_layout(
            image, path_str, slice_axis, target_spacing, interpolation, min_slices, notes
        )
    _check_voxel_values(array, path_str)
    _check_slice_count(array, path_str, min_slices)
    if in_plane_size is not None:
        rows, cols = array.shape[1:]
        array = _resize_in_plane(array, in_plane_size, interpolation)
        # The field of view is kept, so the pixel size grows by the shrink factor.
        spacing = (spacing[0], spacing[1] * rows / in_plane_size, spacing[2] * cols / in_plane_size)
    return RawVolume(
        np.ascontiguousarray(array, dtype=np.float32), spacing, path_str, dicom_modality, tuple(notes)
    )


def infer_modality(volume: RawVolume) -> Modality:
    """The "auto" rule: the DICOM Modality tag if it says CT or MR, else CT iff the 1st percentile is air in
    HU."""
    if volume.dicom_modality is not None:
        return volume.dicom_modality
    return "ct" if float(np.percentile(volume.array, 1.0)) <= _CT_AIR_THRESHOLD_HU else "mr"


def volume_kind(path: str) -> Literal["nifti", "npy", "dicom"]:
    """Which reader a path needs; raises BadFileError for anything that is not a volume: a missing, unreadable or
    special file, a broken or looping link, a folder named like a volume file, or an unsupported format."""
    if os.path.isdir(path):
        if has_suffix(path.rstrip(os.sep), VOLUME_FILE_SUFFIXES):
            raise BadFileError(
                path,
                f"not a regular file: it is a folder named like a {display_suffix(path.rstrip(os.sep))} file (a "
                "DICOM series folder must not be named like a volume file)",
            )
        return "dicom"
    require_regular_file(
        path, "a volume file (.nii, .nii.gz, .npy) or a DICOM series folder", missing="file does not exist"
    )
    lower = path.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(NUMPY_SUFFIX):
        return "npy"
    if pydicom.misc.is_dicom(path):
        raise BadFileError(
            path, "a single DICOM file is one slice; pass the folder that holds the whole series"
        )
    known = UNSUPPORTED_VOLUME_FORMATS.get(display_suffix(path))
    named = f" ({known} '{display_suffix(path)}': convert it to NIfTI)" if known else ""
    raise BadFileError(
        path, f"unsupported volume format{named}; expected .nii, .nii.gz, .npy or a DICOM series folder"
    )


# ----------------------------------------------------------------------------------------------------
# Readers


class _SliceNormalPydicomReader(PydicomReader):
    """MONAI's PydicomReader, but stacking a series by position along the slice normal.

    MONAI stacks by InstanceNumber, which some scanners assign in acquisition order, and silently drops slices
    without one; the affine then assumes the stack is ordered along the normal. Renumbering the (freshly read,
    private) datasets by their position makes the stack and the affine agree.
    """

    def _combine_dicom_series(self, data, filenames):
        positions = [_position_along_normal(ds) for ds in data]
        for rank, index in enumerate(np.argsort(positions, kind="stable")):
            data[index].InstanceNumber = rank
        return super()._combine_dicom_series(data, filenames)


@functools.cache
def _nifti_loader() -> LoadImage:
    # squeeze_non_spatial_dims turns (X, Y, Z, 1) into (X, Y, Z); true 4D files are rejected from the header.
    return _quiet_load_image(NibabelReader(squeeze_non_spatial_dims=True))


@functools.cache
def _dicom_loader() -> LoadImage:
    # fname_regex=None: only files that are DICOM (preamble + "DICM") belong to the series, not stray files.
    return _quiet_load_image(_SliceNormalPydicomReader(fname_regex=None))


def _quiet_load_image(reader) -> LoadImage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoadImage registers optional GPU readers and warns they are missing
        return LoadImage(reader=reader, image_only=True, dtype=np.float32)


def _decode(path: str, loader: LoadImage) -> MetaTensor:
    """Decode with MONAI; any failure here means unreadable data (truncated gzip, broken codec stream,
    ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about optional GPU codecs on every call
            image = loader(path)
    except BadFileError:
        raise
    except Exception as error:  # readers raise many types; all mean "cannot decode this file"
        # One line: some readers put newlines in their messages, and reports list one problem per line.
        message = " ".join(str(error).split())
        raise BadFileError(path, f"cannot decode the image data ({type(error).__name__}: {message})") from error
    return image


def _read_npy(path: str) -> np.ndarray:
    """An H x W x D array (optionally H x W x D x 1) as [D, H, W] float32."""
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError
        raise BadFileError(path, f"not a readable .npy array ({type(error).__name__}: {error})") from error
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    _check_dimensionality(path, array.shape)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise BadFileError(path, f"array of dtype {array.dtype}; a real-valued numeric volume is expected")
    return np.moveaxis(array.astype(np.float32, copy=False), 2, 0)


def _to_slice_layout(
    image: MetaTensor,
    path: str,
    slice_axis: SliceAxis,
    target_spacing: tuple[float, float, float] | None,
    interpolation: Interpolation,
    min_slices: int,
    notes: list[str],
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient to RAS, optionally resample, and lay the slices out as [slice, row, column]; add a note on
    strongly anisotropic voxels."""
    image = EnsureChannelFirst()(image)
    if image.ndim != 4 or image.shape[0] != 1:
        raise BadFileError(
            path, f"decoded to shape {tuple(image.shape)}; a single-channel 3D volume is expected"
        )
    image = Orientation(axcodes="RAS", labels=RAS_LABELS)(image)
    layout = RAS_AXES_FOR_LAYOUT[slice_axis]
    # Checked before resampling too: a 2-slice volume interpolated to more slices is still a 2-slice volume.
    _check_slice_count_value(image.shape[1 + layout[0]], path, min_slices)
    native_spacing = affine_to_spacing(image.affine, r=3).tolist()
    _note_anisotropy([native_spacing[axis] for axis in layout], notes)
    if target_spacing is not None:
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise ValueError(
                f"target_spacing must be 3 positive numbers (slice, row, col), got {target_spacing}"
            )
        ras_spacing = [0.0, 0.0, 0.0]
        for layout_axis, ras_axis in enumerate(layout):
            ras_spacing[ras_axis] = float(target_spacing[layout_axis])
        _check_resampled_size(path, image.shape[1:], native_spacing, ras_spacing)
        mode = "bilinear" if interpolation == "linear" else "nearest"
        image = Spacing(pixdim=ras_spacing, mode=mode, padding_mode="border")(image)
    ras_spacing_mm = affine_to_spacing(image.affine, r=3).tolist()
    array = image[0].numpy() if isinstance(image, torch.Tensor) else np.asarray(image[0])
    array = np.flip(np.transpose(array, layout), axis=(1, 2))
    # Rounded to 1e-6 mm: affines stored in float32 give 6.4999998 for 6.5.
    spacing = tuple(round(float(ras_spacing_mm[axis]), 6) for axis in layout)
    return array, spacing  # type: ignore[return-value]


def _note_anisotropy(spacing: Sequence[float], notes: list[str]) -> None:
    """Note voxels whose largest side exceeds ANISOTROPY_NOTE_RATIO times the smallest (spacing in layout
    order: slice, row, column)."""
    ratio = max(spacing) / min(spacing)
    if ratio > ANISOTROPY_NOTE_RATIO:
        sides = " x ".join(f"{value:g}" for value in spacing)
        notes.append(
            f"strongly anisotropic voxels: {sides} mm (slice x row x column), {ratio:.0f}:1; used as stored, "
            "slices are not resampled"
        )


def _check_resampled_size(
    path: str, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> None:
    """Refuse a resampling whose result would not fit in memory: with a broken or extreme voxel size (e.g. 500 mm
    slices) a target spacing of 1 mm asks for hundreds of times the voxels."""
    resampled = [max(1, round(n * old / new)) for n, old, new in zip(shape, spacing, target)]
    if int(np.prod(resampled, dtype=np.float64)) > MAX_VOXELS:
        raise BadFileError(
            path,
            f"resampling from voxel sizes {[round(v, 4) for v in spacing]} mm to {list(target)} mm would give "
            f"{' x '.join(map(str, resampled))} voxels (more than 2**31): are the voxel sizes right?",
        )


def _resize_in_plane(array: np.ndarray, size: int, interpolation: Interpolation) -> np.ndarray:
    """Resize every slice to size x size (no interpolation across slices)."""
    if size < 1:
        raise ValueError(f"in_plane_size must be positive, got {size}")
    resized = resize_slices(torch.from_numpy(np.ascontiguousarray(array)), size, interpolation)
    return resized.numpy()


def resize_slices(slices: torch.Tensor, size: int, interpolation: Interpolation = "linear") -> torch.Tensor:
    """Resize a stack ``[N, H, W]`` to ``[N, size, size]``, each slice on its own.

    The slices are MONAI's channels here, so a 2D resize treats them alike and never mixes them. Shrinking
    uses area averaging (anti-aliased and much faster than a Gaussian prefilter), enlarging bilinear.
    """
    if tuple(slices.shape[1:]) == (size, size):
        return slices
    rows, cols = slices.shape[1:]
    if interpolation == "nearest":
        resize = Resize(spatial_size=(size, size), mode="nearest")
    elif min(rows, cols) >= size:
        resize = Resize(spatial_size=(size, size), mode="area")
    else:
        # anti_aliasing only acts on an axis that shrinks (one side larger than size, the other smaller).
        resize = Resize(spatial_size=(size, size), mode="bilinear", anti_aliasing=max(rows, cols) > size)
    return convert_to_tensor(resize(slices), track_meta=False)


def _scale_to_unit(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and map linearly to [0, 1]."""
    if not high > low:
        raise ValueError(f"intensity window must have high > low, got ({low}, {high})")
    scaled = (np.clip(array, low, high) - low) / (high - low)
    return scaled.astype(np.float32, copy=False)


def _robust_range(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The percentile range, or the full range when the percentiles coincide (e.g. a mostly-empty volume)."""
    low, high = (float(v) for v in np.percentile(array, percentiles))
    if high > low:
        return low, high
    return float(array.min()), float(array.max())  # not constant: that was rejected when reading


# ----------------------------------------------------------------------------------------------------
# Validation


def _check_nifti_header(path: str) -> list[str]:
    """Reject from the header alone: empty/corrupt files, non-NIfTI content, broken headers, 2D or 4D images, bad
    voxel sizes, data shorter than the header declares (uncompressed files). Return notes on repairs."""
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    try:
        image = nib.load(path)
        header = image.header
        shape = tuple(int(d) for d in header.get_data_shape())
    except Exception as error:  # gzip, zlib, nibabel and OS errors all mean "not readable NIfTI"
        raise BadFileError(path, _unreadable_nifti_reason(path, error)) from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadFileError(path, f"not a NIfTI image (read as {type(image).__name__})")
    if shape and min(shape) < 1:
        raise BadFileError(path, f"broken NIfTI header: dimension sizes must be positive, got {shape}")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise BadFileError(
            path, f"broken NIfTI header? it declares {' x '.join(map(str, shape))} voxels, more than 2**31"
        )
    notes = []
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
        notes.append("4D NIfTI with a 4th axis of length 1: read as the 3D volume it holds")
    _check_dimensionality(path, shape)
    pixdim = _stored_pixdim(path, type(header))
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise BadFileError(
            path,
            f"voxel sizes (pixdim) must be positive, got {pixdim.tolist()}: fix the header (nibabel: "
            "header.set_zooms)",
        )
    if abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise BadFileError(path, "degenerate affine (zero determinant): voxel geometry unknown")
    if not path.lower().endswith(".gz"):
        # Uncompressed: the file size tells whether all the data is there, without decoding it.
        # The proxy knows where the data starts (image.header was re-made on load: its offset reads 0).
        expected = int(image.dataobj.offset) + voxels * header.get_data_dtype().itemsize
        actual = os.path.getsize(path)
        if actual < expected:
            raise BadFileError(
                path, f"truncated: the header declares {expected} bytes (offset + data), the file has {actual}"
            )
    return notes


def _unreadable_nifti_reason(path: str, error: Exception) -> str:
    """Why nibabel could not read a NIfTI file: a broken header field when the header itself can be read
    (nibabel's own message then often names a consequence, e.g. "vox offset too low"), else nibabel's error."""
    fallback = f"not a readable NIfTI file ({type(error).__name__}: {' '.join(str(error).split())})"
    header_size = nib.Nifti1Header.template_dtype.itemsize  # 348
    try:
        with nib.openers.ImageOpener(path) as stream:
            block = stream.read(header_size)
    except EOFError:
        return "truncated: the compressed data ends inside the NIfTI header"
    except Exception:  # e.g. corrupt compressed data: nibabel's message says it best
        return fallback
    if len(block) < header_size:
        return f"not a readable NIfTI file: {len(block)} bytes of content, fewer than a {header_size}-byte header"
    # Byte order from sizeof_hdr, which must be 348: nibabel's guess uses dim[0], the very field that may be broken.
    sizes = {int.from_bytes(block[:4], "little"): "<", int.from_bytes(block[:4], "big"): ">"}
    if header_size not in sizes:
        # NIfTI-2 (540) headers nibabel reads itself; reaching here they are broken in ways it explains.
        return fallback if 540 in sizes else "not a readable NIfTI file: it does not start with a NIfTI header"
    raw = nib.Nifti1Header(binaryblock=block, endianness=sizes[header_size], check=False)
    if raw["magic"].item() not in (b"n+1", b"ni1"):
        return f"broken NIfTI header: magic is {raw['magic'].item()!r}, expected b'n+1' or b'ni1'"
    dims = int(raw["dim"][0])
    if not 1 <= dims <= 7:
        return f"broken NIfTI header: dim[0] (the number of dimensions) is {dims}, must be 1 to 7"
    code = int(raw["datatype"])
    if code not in nib.nifti1.data_type_codes.code:
        return f"broken NIfTI header: unknown datatype code {code}"
    message = " ".join(str(error).split())
    return f"truncated or corrupt NIfTI: the header is valid, the rest is not ({type(error).__name__}: {message})"


def _stored_pixdim(path: str, header_class: type) -> np.ndarray:
    """The voxel sizes as stored: nib.load silently replaces zero pixdims by 1, hiding a broken header."""
    with nib.openers.ImageOpener(path) as stream:
        stored = header_class.from_fileobj(stream, check=False)
    return np.asarray(stored["pixdim"][1:4], dtype=np.float64)


def _check_dimensionality(path: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 3:
        raise BadFileError(path, f"{len(shape)}D image of shape {shape}; a 3D volume is expected")
    if len(shape) > 3:
        raise BadFileError(
            path,
            f"{len(shape)}D image of shape {shape}; one 3D volume per file is expected (split time series)",
        )
    if min(shape) < 1:
        raise BadFileError(path, f"empty image of shape {shape}")


def _check_voxel_values(array: np.ndarray, path: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        nan_count = int(np.isnan(array).sum())
        inf_count = int(array.size - finite.sum()) - nan_count
        raise BadFileError(path, f"{nan_count} NaN and {inf_count} infinite voxel(s)")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise BadFileError(path, f"constant volume (every voxel is {low:g})")


def _check_slice_count(array: np.ndarray, path: str, min_slices: int) -> None:
    _check_slice_count_value(array.shape[0], path, min_slices)


def _check_slice_count_value(count: int, path: str, min_slices: int) -> None:
    if count < min_slices:
        raise BadFileError(
            path, f"only {count} slice(s) along the slice axis; at least {min_slices} required"
        )


def _check_dicom_series(folder: str, min_slices: int) -> Modality | None:
    """Check from the headers that a folder holds exactly one complete, regular series; return its modality.

    MONAI stacks whatever files a folder holds (it only warns about mismatched sizes), so a folder with two
    series, mixed orientations, or a missing or duplicated slice would otherwise load as a wrong volume.
    """
    files = dicom_files(folder)
    if not files:
        raise BadFileError(folder, "folder holds no DICOM files")
    headers = []
    for file in files:
        try:
            # PixelData is read as a deferred element: its presence is known without loading the pixels.
            headers.append(
                pydicom.dcmread(file, specific_tags=[*_DICOM_HEADER_TAGS, "PixelData"], defer_size=256)
            )
        except Exception as error:  # pydicom raises several types for broken files
            message = " ".join(str(error).split())
            raise BadFileError(folder, f"{file.name}: unreadable DICOM header ({message})") from error
    without_pixels = [f.name for f, ds in zip(files, headers) if "PixelData" not in ds]
    if without_pixels:
        raise BadFileError(
            folder,
            f"{len(without_pixels)} DICOM file(s) without pixel data (not an image slice), e.g. "
            f"{without_pixels[0]}: remove them from the series folder",
        )
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers})
    if len(series) > 1:
        raise BadFileError(
            folder, f"{len(series)} different series (SeriesInstanceUID) in one folder; one series per folder"
        )
    lacking = [f.name for f, ds in zip(files, headers) if not _has_geometry(ds)]
    if lacking:
        raise BadFileError(
            folder,
            f"{len(lacking)} slice(s) lack ImagePositionPatient/ImageOrientationPatient, e.g. {lacking[0]}",
        )
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        distinct = len({tuple(np.round(o, 4)) for o in orientations})
        raise BadFileError(folder, f"mixed slice orientations ({distinct} different ImageOrientationPatient)")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1:
        raise BadFileError(folder, f"slices of different sizes {sorted(sizes)}")
    if len(headers) < min_slices:
        raise BadFileError(folder, f"only {len(headers)} slice(s); at least {min_slices} required")
    positions = np.array([_position_along_normal(ds) for ds in headers])
    order = np.argsort(positions, kind="stable")
    gaps = np.diff(positions[order])
    duplicates = np.flatnonzero(gaps < _DUPLICATE_POSITION_MM)
    if duplicates.size:
        first = duplicates[0]
        names = (files[order[first]].name, files[order[first + 1]].name)
        raise BadFileError(
            folder,
            f"{duplicates.size} duplicated slice position(s), e.g. {names[0]} and {names[1]} both at "
            f"{positions[order[first]]:.2f} mm along the slice normal",
        )
    step = float(np.median(gaps))
    irregular = np.flatnonzero(np.abs(gaps - step) > _SLICE_GAP_TOLERANCE * step)
    if irregular.size:
        worst = float(gaps[irregular[np.argmax(np.abs(gaps[irregular] - step))]])
        what = "missing slice(s)" if worst > step else "irregular slice spacing"
        raise BadFileError(
            folder, f"{what}: a gap of {worst:.2f} mm between slices where the spacing is {step:.2f} mm"
        )
    modality = str(headers[0].get("Modality", "")).upper()
    return {"CT": "ct", "MR": "mr"}.get(modality)  # type: ignore[return-value]


def _has_geometry(ds: pydicom.Dataset) -> bool:
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _position_along_normal(ds: pydicom.Dataset) -> float:
    """Position of a slice along the normal of its plane (row direction x column direction), in mm."""
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files directly inside a folder (not its subfolders, not a DICOMDIR index), sorted by name.

    Raises :class:`BadFileError` naming the folder when it, or a file in it, cannot be read: a slice that
    cannot be read cannot be known not to belong to the series.
    """
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError as error:
        raise BadFileError(folder, f"cannot list the folder: {describe_os_error(folder, error)}") from None
    files = []
    for entry in entries:
        if entry.name in _NON_SLICE_DICOM_NAMES or not is_regular_file(entry):
            continue
        try:
            if pydicom.misc.is_dicom(entry):
                files.append(entry)
        except OSError as error:
            raise BadFileError(folder, f"{entry.name}: {describe_os_error(entry, error)}") from None
    return files


T = TypeVar("T", str, VolumeRecord)


@dataclass(frozen=True)
class VolumeCheck:
    """The outcome of loading one volume: its error (None when usable), its loaded shape and its notes."""

    path: str
    error: BadFileError | None
    shape: tuple[int, int, int] | None = None  # (slices, rows, columns) as loaded
    notes: tuple[str, ...] = ()


def check_volumes(
    items: Sequence[str | VolumeRecord], num_threads: int = 1, modality: ModalityChoice = "auto", **load_kwargs
) -> list[VolumeCheck]:
    """Load every volume once with :func:`load_volume` (a record's own modality overrides ``modality``) and
    return, in order, each one's error or shape and notes. Loading runs in ``num_threads`` threads (decoders
    release the GIL for much of their work; each thread holds one decoded volume at a time)."""

    def check(item: str | VolumeRecord) -> VolumeCheck:
        path = item.path if isinstance(item, VolumeRecord) else str(item)
        item_modality = item.modality if isinstance(item, VolumeRecord) and item.modality else modality
        try:
            volume = load_volume(path, modality=item_modality, **load_kwargs)
        except BadFileError as error:
            return VolumeCheck(path, error)
        return VolumeCheck(path, None, tuple(volume.array.shape), volume.notes)  # type: ignore[arg-type]

    if num_threads <= 1 or len(items) <= 1:
        return [check(item) for item in items]
    with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="jointssl-volumes") as pool:
        return list(pool.map(check, items))


def validate_volumes(
    items: Sequence[T],
    on_bad_file: OnBadFile = "error",
    modality: ModalityChoice = "auto",
    num_threads: int = 1,
    **load_kwargs,
) -> list[T]:
    """Load every volume once and return the usable ones, in order.

    Args:
        items: paths or :class:`VolumeRecord` s (a record's own modality overrides ``modality``).
        on_bad_file: "error" raises one DataValidationError listing every bad file; "skip" logs a warning per
            bad file on the "jointssl.data" logger and leaves it out.
        modality, load_kwargs: as for :func:`load_volume`, so that validation checks what training will load.
        num_threads: volumes loaded in parallel (see :func:`check_volumes`).

    This decodes every volume, which is the only way to find truncated data, NaNs or constant volumes.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    checks = check_volumes(items, num_threads=num_threads, modality=modality, **load_kwargs)
    bad = [check.error for check in checks if check.error is not None]
    if bad and on_bad_file == "error":
        raise DataValidationError(bad)
    for error in bad:
        logger.warning("skipping bad volume %s: %s", error.path, error.reason)
    return [item for item, check in zip(items, checks) if check.error is None]


# ----------------------------------------------------------------------------------------------------
# Discovery


@dataclass
class VolumeSourceScan:
    """What :func:`scan_volume_sources` found.

    ``records``: the volumes; ``problems``: manifest rows and source files that cannot be volumes (each a
    BadFileError naming the manifest and line, or the file); ``notes``: (path, text) on links not followed and
    empty manifests; ``ignored``: files in the folders that are not volumes (.json sidecars, notes, ...);
    ``origins``: for records listed in a manifest, "<manifest> line <n>".
    """

    records: list[VolumeRecord] = field(default_factory=list)
    problems: list[BadFileError] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)

    def extend(self, other: VolumeSourceScan) -> None:
        """Add what another scan found (e.g. of one more source)."""
        self.records += other.records
        self.problems += other.problems
        self.notes += other.notes
        self.ignored += other.ignored
        self.origins.update(other.origins)


def scan_volume_sources(sources: Iterable[str | os.PathLike]) -> VolumeSourceScan:
    """Find the volumes of every source (see :func:`discover_volumes`), keeping every problem found instead of
    raising the first. A source that does not exist raises :class:`BadFileError`: that is a mistake in the
    arguments, not in the data."""
    scan = VolumeSourceScan()
    for source in sources:
        path = Path(source)
        if path.is_dir() and not has_suffix(path.name, VOLUME_FILE_SUFFIXES):
            scan.records.extend(_discover_folder(path, scan.notes, scan.ignored))
        elif path.is_file() and path.suffix.lower() == ".csv":
            _read_manifest(path, scan)
        elif path.exists() or path.is_symlink():
            try:
                volume_kind(str(path))  # raises for unsupported files and folders named like volume files
            except BadFileError as error:
                scan.problems.append(error)
                continue
            scan.records.append(VolumeRecord(str(path), path.parent.name))
        else:
            raise BadFileError(path, "source does not exist")
    return scan


def discover_volumes(sources: Iterable[str | os.PathLike]) -> list[VolumeRecord]:
    """Find the volumes of every source, in a deterministic order.

    A source is a folder (searched recursively, following links to folders but never visiting a folder twice,
    hidden files and folders skipped, for .nii, .nii.gz and .npy files; every folder that directly holds DICOM
    files is one DICOM series), a CSV manifest (a ``path`` or ``image`` column, relative paths taken relative to
    the manifest; optional ``modality`` (CT/MR) and ``source`` columns), or a single volume file. The source
    name of a record is the manifest's ``source`` column, else the folder's or manifest's name.

    In folders, files in the 3D formats jointssl cannot read (.mha, .nrrd, .mgz, Analyze, ...), folders named
    like volume files, folders that cannot be listed and volume-named links that cannot be followed become
    records, so that validation reports them; other files (.json sidecars, notes) are ignored and logged.

    Raises :class:`BadFileError` for the first source that does not exist, manifest row that cannot be used
    (empty path, unknown modality) or source file that is not a volume (:func:`scan_volume_sources` keeps them
    all).
    """
    scan = scan_volume_sources(sources)
    for path, note in scan.notes:
        logger.info("%s: %s", path, note)
    for path in scan.ignored:
        logger.info("%s: not a volume file (.nii, .nii.gz, .npy or DICOM): ignored", path)
    if scan.problems:
        raise scan.problems[0]
    return scan.records


def _discover_folder(root: Path, notes: list[tuple[str, str]], ignored_files: list[str]) -> list[VolumeRecord]:
    records = []

    def unreadable(folder: str, reason: str) -> None:
        # Kept as a record: loading then reports the folder and why, instead of its volumes just missing.
        records.append(VolumeRecord(folder, root.name))

    def note(path: str, text: str) -> None:
        notes.append((path, text))

    for folder, subfolders, names in walk_tree(root, skip_hidden=True, note=note, unreadable=unreadable):
        named_like_volumes = [name for name in subfolders if has_suffix(name, VOLUME_FILE_SUFFIXES)]
        subfolders[:] = [name for name in subfolders if name not in named_like_volumes]
        holds_dicom = False
        ignored, unreadable_files = [], []
        for name in sorted([*names, *named_like_volumes]):
            file = os.path.join(folder, name)
            if has_suffix(name, VOLUME_FILE_SUFFIXES) or display_suffix(name) in UNSUPPORTED_VOLUME_FORMATS:
                records.append(VolumeRecord(file, root.name))
            elif name in _NON_SLICE_DICOM_NAMES or holds_dicom:
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


def _read_manifest(manifest: Path, scan: VolumeSourceScan) -> None:
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        scan.notes.append((str(manifest), "manifest lists no volumes"))
        return
    columns = {c.strip().lower(): c for c in rows[0] if c}
    path_column = columns.get("path") or columns.get("image")
    if path_column is None:
        scan.problems.append(
            BadFileError(manifest, f"manifest has no 'path' (or 'image') column; columns: {list(rows[0].keys())}")
        )
        return
    for line, row in enumerate(rows, start=2):
        value = (row.get(path_column) or "").strip()
        if not value:
            scan.problems.append(BadFileError(manifest, f"line {line}: empty path"))
            continue
        path = Path(value) if Path(value).is_absolute() else manifest.parent / value
        try:
            modality = parse_modality((row.get(columns.get("modality", ""), "") or "").strip(), manifest, line)
        except BadFileError as error:
            scan.problems.append(error)
            continue
        source = (row.get(columns.get("source", ""), "") or "").strip() or manifest.stem
        scan.records.append(VolumeRecord(str(path), source, modality))
        scan.origins.setdefault(str(path), f"{manifest} line {line}")


def parse_modality(value: str, manifest: str | os.PathLike, line: int) -> Modality | None:
    """A manifest's modality cell: "CT"/"MR" (any case) or None for an empty cell or "auto"; anything else is a
    BadFileError naming the manifest and its line."""
    lowered = value.lower()
    if lowered in ("", "auto"):
        return None
    if lowered in ("ct", "mr"):
        return lowered  # type: ignore[return-value]
    raise BadFileError(manifest, f"line {line}: modality must be CT, MR or empty, got {value!r}")
