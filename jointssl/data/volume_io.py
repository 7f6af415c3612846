"""Loading of 3D volumes: NIfTI, MGH/MGZ, NRRD, MetaImage, NumPy (.npy) and DICOM series folders.

Every volume comes out as a float32 stack of 2D slices ``[N, H, W]`` in one documented anatomical layout:

* Volumes with world geometry (every format but .npy) are read by their reader (:mod:`jointssl.data.volume_readers`:
  a MONAI ``MetaTensor`` with its voxel -> RAS affine), reoriented to the canonical RAS frame with MONAI
  ``Orientation`` (:mod:`jointssl.data.geometry`), optionally resampled (``Spacing``, ``Resize``)
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
:func:`jointssl.data.validation.validate_volumes` checks many files and reports every bad one at once (or logs and
skips them).
What is rejected: unreadable, empty, truncated or corrupt files, broken headers (NIfTI: dimension count outside
1-7, unknown data type; every format: non-positive sizes, more than 2**31 voxels, data shorter than the header
declares, a missing .raw / detached data file), 2D and 4D images (a 4th axis of length 1 is dropped), non-positive
voxel sizes, degenerate affines, NaN or infinite voxels, constant
volumes, fewer than ``min_slices`` slices, DICOM folders with several series, mixed orientations, missing or
duplicated slices, or slices without pixel data, and resampling to a ``target_spacing`` that would give more than
2**31 voxels. What is accepted with a note (:attr:`RawVolume.notes`, printed by ``jointssl check-data``): a
singleton 4th axis dropped, and strongly anisotropic voxels (largest side more than 20 times the smallest; slices
are used as stored).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom.misc
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirst, Orientation, Resize, Spacing
from monai.utils import convert_to_tensor

from jointssl.data.errors import BadFileError
from jointssl.data.file_checks import DEFAULT_MAX_DECODED_BYTES, display_suffix, has_suffix, require_regular_file
from jointssl.data.geometry import RAS_AXES_FOR_LAYOUT, RAS_LABELS, SliceAxis
from jointssl.data.intensity import (
    check_raw_intensities,
    check_unit_intensities,
    percentiles_to_unit,
    window_to_unit,
)
from jointssl.data.volume_readers import (
    DICOM_SERIES,
    FILE_READERS,
    MAX_VOXELS,
    MissingReaderError,
    Modality,
    VolumeHeader,
    VolumeReader,
    reader_for_suffix,
)

logger = logging.getLogger("jointssl.data")

ModalityChoice = Literal["ct", "mr", "auto"]
Interpolation = Literal["linear", "nearest"]

# Every volume file suffix a reader reads (discovery lists files with these; a DICOM series is a folder).
VOLUME_FILE_SUFFIXES = tuple(suffix for reader in FILE_READERS for suffix in reader.suffixes)
# Volume files whose header places them in world (scanner) space: world-mm candidate and annotation lists need it.
WORLD_GEOMETRY_SUFFIXES = tuple(suffix for reader in FILE_READERS if reader.world_geometry for suffix in reader.suffixes)
# 3D formats researchers hold that jointssl does not read: found in a folder, they are reported, not ignored.
UNSUPPORTED_VOLUME_FORMATS = {".hdr": "Analyze", ".img": "Analyze", ".vtk": "VTK"}
_EXPECTED_VOLUMES = "a volume file (.nii, .nii.gz, .mgh, .mgz, .nrrd, .nhdr, .mha, .mhd, .npy) or a DICOM series folder"
# Air is about -1000 HU; no MR scale puts 1% of a volume this far below zero.
_CT_AIR_THRESHOLD_HU = -500.0
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
    """One volume found by :func:`jointssl.data.discovery.discover_volumes`: a file or a DICOM series folder."""

    path: str
    source: str  # name of the folder or manifest it came from
    modality: Modality | None = None  # None: decided when loading ("auto")
    label: str | None = None  # a manifest's ``label`` cell (as ImageRecord.label); None for folder sources


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
    min_in_plane: int = 1,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> LoadedVolume:
    """Read, validate, reorient, resample and normalise one volume.

    Args:
        path: a volume file (NIfTI, MGH/MGZ, NRRD, MetaImage, .npy) or a folder holding one DICOM series.
        modality: "ct" (clip ``hu_window``, scale to [0, 1]), "mr" (clip ``mr_percentiles``, scale), or "auto"
            (see the module docstring for the rule).
        slice_axis: the anatomical axis the slices are taken along (layout in the module docstring).
        in_plane_size: resize every slice to this square size; None keeps the native in-plane size.
        target_spacing: resample to this spacing in mm, in (slice, row, column) order; None keeps it.
        hu_window: the Hounsfield window for CT.
        mr_percentiles: the lower and upper percentiles for MR.
        min_slices: fewer slices than this (before or after resampling) make the volume a bad file.
        min_in_plane: slices with a side under this many pixels (before resizing) make the volume a bad file
            (pretraining asks for the 2D images' minimum, :data:`~jointssl.data.image_io.MIN_IMAGE_SIDE`).
        max_decoded_bytes: a volume whose header declares more decoded voxel bytes than this is a bad file,
            refused before it is decoded (:func:`~jointssl.data.file_checks.check_decoded_size`); None: no bound.

    Raises:
        BadFileError: the file cannot be read or is not a usable 3D volume, or its normalised intensities are not
            (:func:`~jointssl.data.intensity.check_unit_intensities`).
    """
    if modality not in ("ct", "mr", "auto"):
        raise ValueError(f"modality must be 'ct', 'mr' or 'auto', got {modality!r}")
    raw = read_volume(
        path, slice_axis, in_plane_size, target_spacing, "linear", min_slices, min_in_plane, max_decoded_bytes
    )
    resolved = modality if modality != "auto" else infer_modality(raw)
    if resolved == "ct":
        normalised = window_to_unit(raw.array, *hu_window)
        normalisation = f"the CT window (hu_window {hu_window[0]:g}..{hu_window[1]:g})"
    else:
        normalised = percentiles_to_unit(raw.array, mr_percentiles)
        normalisation = f"the MR normalisation (mr_percentiles {mr_percentiles[0]:g}..{mr_percentiles[1]:g})"
    # What training is given, checked here where check-data and fit's setup both load it (and a cache is filled).
    check_unit_intensities(raw.path, normalised, normalisation, raw.array)
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
    min_in_plane: int = 1,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> RawVolume:
    """Read and validate one volume and bring it into the slice layout, keeping its original values.

    This is :func:`load_volume` without intensity normalisation; use ``interpolation="nearest"`` for label
    maps so that they land on exactly the grid of their image.
    """
    if slice_axis not in RAS_AXES_FOR_LAYOUT:
        raise ValueError(f"slice_axis must be one of {sorted(RAS_AXES_FOR_LAYOUT)}, got {slice_axis!r}")
    path_str = str(path)
    reader = volume_reader(path_str)
    header = reader.read_header(path_str)
    header.check_decoded_size(path_str, max_decoded_bytes)  # before decoding: a 3 MB .nii.gz can hold 3 GB
    notes = list(header.notes)
    image = _decode(path_str, reader, header)
    if reader.world_geometry:
        array, spacing = _to_slice_layout(
            image, path_str, slice_axis, target_spacing, interpolation, min_slices, notes
        )
    else:  # .npy: H x W x D as stored (module docstring)
        array, spacing = np.moveaxis(np.asarray(image), 2, 0), (1.0, 1.0, 1.0)
    _check_voxel_values(array, path_str)
    check_raw_intensities(path_str, array)  # before resizing: float32 sums of a -3e38 fill overflow
    _check_slice_count(array, path_str, min_slices)
    _check_in_plane_size(array, path_str, min_in_plane, in_plane_size)
    if in_plane_size is not None:
        rows, cols = array.shape[1:]
        array = _resize_in_plane(array, in_plane_size, interpolation)
        # The field of view is kept, so the pixel size grows by the shrink factor.
        spacing = (spacing[0], spacing[1] * rows / in_plane_size, spacing[2] * cols / in_plane_size)
    return RawVolume(
        np.ascontiguousarray(array, dtype=np.float32), spacing, path_str, header.dicom_modality, tuple(notes)
    )


def infer_modality(volume: RawVolume) -> Modality:
    """The "auto" rule: the DICOM Modality tag if it says CT or MR, else CT iff the 1st percentile is air in
    HU."""
    if volume.dicom_modality is not None:
        return volume.dicom_modality
    return "ct" if float(np.percentile(volume.array, 1.0)) <= _CT_AIR_THRESHOLD_HU else "mr"


def volume_kind(path: str) -> str:
    """Which reader a path needs (:attr:`VolumeReader.kind`: "nifti", "mgh", "nrrd", "metaimage", "npy" or
    "dicom"); raises BadFileError for anything that is not a volume (:func:`volume_reader`)."""
    return volume_reader(path).kind


def volume_reader(path: str) -> VolumeReader:
    """The reader of a volume file (by its suffix) or DICOM series folder; raises BadFileError for anything that is
    not a volume: a missing, unreadable or special file, a broken or looping link, a folder named like a volume
    file, a single DICOM slice, or an unsupported format."""
    if os.path.isdir(path):
        if has_suffix(path.rstrip(os.sep), VOLUME_FILE_SUFFIXES):
            raise BadFileError(
                path,
                f"not a regular file: it is a folder named like a {display_suffix(path.rstrip(os.sep))} file (a "
                "DICOM series folder must not be named like a volume file)",
            )
        return DICOM_SERIES
    require_regular_file(path, _EXPECTED_VOLUMES, missing="file does not exist")
    reader = reader_for_suffix(path)
    if reader is not None:
        return reader
    if pydicom.misc.is_dicom(path):
        raise BadFileError(
            path, "a single DICOM file is one slice; pass the folder that holds the whole series"
        )
    known = UNSUPPORTED_VOLUME_FORMATS.get(display_suffix(path))
    named = f" ({known} '{display_suffix(path)}': convert it to NIfTI)" if known else ""
    raise BadFileError(path, f"unsupported volume format{named}; expected {_EXPECTED_VOLUMES}")


def read_volume_header(path: str | os.PathLike) -> VolumeHeader:
    """What a volume's header says (shape, voxel -> RAS affine, notes), checked by its reader without decoding
    the data; BadFileError naming the file and the reason."""
    path_str = str(path)
    return volume_reader(path_str).read_header(path_str)


def declared_decoded_bytes(path: str | os.PathLike) -> int:
    """What decoding a volume makes, from its header alone (:attr:`VolumeHeader.decoded_bytes`): the cost by which
    validation admits volumes into its memory budget. Raises BadFileError as :func:`read_volume_header` does."""
    return read_volume_header(path).decoded_bytes


def _decode(path: str, reader: VolumeReader, header: VolumeHeader) -> MetaTensor:
    """Decode with the reader to float32, refusing values that float32 cannot hold (decoded as float64 first
    when the header's type is that wide); any other failure here means unreadable data (truncated gzip, broken
    codec stream, ...). A MemoryError is not the file's content: it is left to the caller (validation reports it
    for the file)."""
    wide = header.decoded_item_size > 4
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about optional GPU codecs on every call
            image = reader.decode(path, np.float64 if wide else np.float32)
    except (BadFileError, MissingReaderError, MemoryError):
        raise
    except Exception as error:  # readers raise many types; all mean "cannot decode this file"
        # One line: some readers put newlines in their messages, and reports list one problem per line.
        message = " ".join(str(error).split())
        raise BadFileError(path, f"cannot decode the image data ({type(error).__name__}: {message})") from error
    _check_float32_range(image, path)
    return image.to(torch.float32)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_float32_range(image: torch.Tensor, path: str) -> None:
    """Refuse finite values that float32, the type training reads, cannot hold: converted they would be
    infinite, and reported as infinite voxels the file does not have."""
    if image.dtype != torch.float64:  # every narrower type, integers included, fits in float32's range
        return
    values = image.as_tensor() if isinstance(image, MetaTensor) else image
    beyond = torch.isfinite(values) & (values.abs() > _FLOAT32_MAX)
    count = int(beyond.sum())
    if count:
        largest = float(values[beyond].abs().max())
        raise BadFileError(
            path,
            f"{count} voxel value(s) beyond float32 range (magnitude up to {largest:.3g}; float32 holds up to "
            f"{_FLOAT32_MAX:.3g}): the file stores float64, training reads float32, where they would be infinite",
        )


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


# ----------------------------------------------------------------------------------------------------
# Validation


def _check_voxel_values(array: np.ndarray, path: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        nan_count = int(np.isnan(array).sum())
        inf_count = int(array.size - finite.sum()) - nan_count
        raise BadFileError(path, f"{nan_count} NaN and {inf_count} infinite voxel(s)")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise BadFileError(path, f"constant volume (every voxel is {low:g})")


def _check_in_plane_size(array: np.ndarray, path: str, min_side: int, in_plane_size: int | None) -> None:
    """Refuse slices too small to learn from: 2 x 2 pixels resized to 256 x 256 are a smooth ramp, not anatomy
    (often a volume saved with its axes in the wrong order)."""
    rows, cols = array.shape[1:]
    if min(rows, cols) < min_side:
        target = f"{in_plane_size}x{in_plane_size}" if in_plane_size is not None else "the view size"
        raise BadFileError(
            path,
            f"slices are {rows}x{cols} pixels (rows x columns); the minimum side is {min_side} (they would be "
            f"upsampled to {target}: are the axes in the right order?)",
        )


def _check_slice_count(array: np.ndarray, path: str, min_slices: int) -> None:
    _check_slice_count_value(array.shape[0], path, min_slices)


def _check_slice_count_value(count: int, path: str, min_slices: int) -> None:
    if count < min_slices:
        raise BadFileError(
            path, f"only {count} slice(s) along the slice axis; at least {min_slices} required"
        )
