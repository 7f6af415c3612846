"""The bad-input corpus: one generator per kind of bad 2D/3D input or manifest, with the expected outcome of each.

Each generator writes its input into a given (empty) folder and returns a :class:`BadInputCase`: what to pass as
a data source, and the findings the public entry points must produce — an error naming the file and the reason,
or a warning describing a documented repair. The outcomes are those of ``JointDataModule.setup`` (errors: the
file is refused) and of ``jointssl check-data`` (``path: error: reason`` / ``path: warning: ...`` lines).

The expectations assume the data-module settings :data:`SETTINGS` (global crops of 32 px, slabs of 8 slices).
Run as ``python -m tests.bad_inputs CASES.json GOOD.json`` this module observes cases through the entry points and
prints the observations as JSON: tests/test_bad_inputs.py does that as an unprivileged user for the unreadable-file
cases (``chmod 000`` does not stop root).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

Kind = Literal["2D", "3D", "manifest"]
Stream = Literal["images", "volumes"]
Severity = Literal["error", "warning", "ignored"]

#: JointDataModule settings the expected outcomes assume (small, so that every case loads in milliseconds).
SETTINGS: dict[str, Any] = {
    "global_crop_size": 32,
    "local_crop_size": 16,
    "num_slices": 8,
    "volume_size": 16,
    "volume_in_plane_size": 24,
}


@dataclass(frozen=True)
class Expected:
    """One finding the entry points must report: the path it names, its severity and a substring of its text."""

    path: str
    severity: Severity
    reason: str


@dataclass(frozen=True)
class BadInputCase:
    """A bad input on disk and its expected outcome.

    ``source`` is what to give the data module (a folder or a manifest); ``expected`` the findings; ``trained``
    the files that must still be trained on after a repair; ``unprivileged``: the case needs a user that file
    permissions apply to (root reads everything), so it is observed in a subprocess run as such a user.
    """

    name: str
    kind: Kind
    stream: Stream
    source: str
    expected: tuple[Expected, ...]
    description: str
    trained: tuple[str, ...] = ()
    unprivileged: bool = False

    @property
    def errors(self) -> tuple[Expected, ...]:
        return tuple(e for e in self.expected if e.severity == "error")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BadInputCase:
        fields = dict(data)
        fields["expected"] = tuple(Expected(**e) for e in fields["expected"])
        fields["trained"] = tuple(fields["trained"])
        return cls(**fields)


@dataclass(frozen=True)
class Outcome:
    """What a generator returns: the source to pass and the expected behaviour (as in BadInputCase)."""

    source: Path
    description: str
    expected: tuple[tuple[str | Path, Severity, str], ...]
    trained: tuple[str | Path, ...] = ()
    unprivileged: bool = False


#: Every case generator, in report order (filled by @generator).
CASES: list[Callable[[Path], BadInputCase]] = []


def generator(kind: Kind, stream: Stream) -> Callable[[Callable[[Path], Outcome]], Callable[[Path], BadInputCase]]:
    """Register ``function(directory) -> Outcome`` as the case generator ``make(directory) -> BadInputCase``
    named after the function (``make.stream`` tells where it belongs before it runs)."""

    def register(function: Callable[[Path], Outcome]) -> Callable[[Path], BadInputCase]:
        @functools.wraps(function)
        def make(directory: Path) -> BadInputCase:
            directory.mkdir(parents=True, exist_ok=True)
            outcome = function(directory)
            return BadInputCase(
                name=function.__name__,
                kind=kind,
                stream=stream,
                source=str(outcome.source),
                expected=tuple(Expected(str(p), severity, reason) for p, severity, reason in outcome.expected),
                description=outcome.description,
                trained=tuple(str(path) for path in outcome.trained),
                unprivileged=outcome.unprivileged,
            )

        make.kind, make.stream = kind, stream  # type: ignore[attr-defined]
        CASES.append(make)
        return make

    return register


# ------------------------------------------------------------------------------------------------------------
# Writers of well-formed files (the cases then break them)
# ------------------------------------------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    """An 8-bit grey PNG of random content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(path)
    return path


def encoded_image(file_format: str, size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)).save(buffer, file_format)
    return buffer.getvalue()


def ct_like(shape: tuple[int, int, int] = (24, 24, 10), seed: int = 0) -> np.ndarray:
    """int16 Hounsfield-like volume (X, Y, Z): air around a noisy soft-tissue block."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[2:-2, 2:-2, :] = rng.integers(-100, 200, size=(shape[0] - 4, shape[1] - 4, shape[2]))
    return volume


def write_nifti(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    """NIfTI with RAS axes and the given voxel sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def patch_header(path: Path, offset: int, value: np.ndarray) -> Path:
    """Overwrite bytes of an uncompressed .nii header in place (nibabel repairs such fields when saving)."""
    raw = bytearray(path.read_bytes())
    data = value.tobytes()
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def write_dicom_series(
    folder: Path,
    z_positions: tuple[float, ...] = (0.0, 2.0, 4.0, 6.0, 8.0),
    orientations: list[tuple[float, ...]] | None = None,
    without_pixels: tuple[int, ...] = (),
    size: int = 12,
) -> Path:
    """A CT series, one uncompressed file per slice, slice i at z_positions[i]; the slices listed in
    ``without_pixels`` are saved without PixelData."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for i, z in enumerate(z_positions):
        ds = _dicom_dataset(CTImageStorage, size, size)
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.Modality = "CT"
        ds.ImageOrientationPatient = list(orientations[i] if orientations else (1, 0, 0, 0, 1, 0))
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.PixelSpacing = [0.7, 0.7]
        ds.InstanceNumber = i + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if i not in without_pixels:
            hu = 50 * i + np.arange(size * size).reshape(size, size) - 1000
            ds.PixelData = (hu + 1024).astype("<u2").tobytes()
        ds.save_as(folder / f"slice{i:03d}.dcm", enforce_file_format=True)
    return folder


def _dicom_dataset(sop_class: str, rows: int, columns: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def absolute(path: Path) -> str:
    """Image records hold absolute paths; volume records the paths as found."""
    return os.path.abspath(path)


# ------------------------------------------------------------------------------------------------------------
# 2D cases
# ------------------------------------------------------------------------------------------------------------


@generator("2D", "images")
def png_zero_bytes(directory: Path) -> Outcome:
    path = directory / "empty.png"
    path.write_bytes(b"")
    return Outcome(directory, "zero-byte PNG: error", ((absolute(path), "error", "empty file (0 bytes)"),))


@generator("2D", "images")
def png_truncated(directory: Path) -> Outcome:
    data = encoded_image("PNG")
    path = directory / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return Outcome(directory, "truncated PNG: error", ((absolute(path), "error", "cannot decode PNG"),))


@generator("2D", "images")
def jpeg_truncated(directory: Path) -> Outcome:
    data = encoded_image("JPEG")
    path = directory / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return Outcome(
        directory, "truncated JPEG: error", ((absolute(path), "error", "cannot decode JPEG: OSError: image file is"),)
    )


@generator("2D", "images")
def png_16bit(directory: Path) -> Outcome:
    path = directory / "sixteen.png"
    pixels = np.random.default_rng(3).integers(0, 4096, (40, 40), dtype=np.uint16)
    pixels[0, 0] = 4095  # 12-bit data, the usual content of a medical 16-bit PNG
    Image.fromarray(pixels).save(path)
    return Outcome(
        directory,
        "16-bit PNG: accepted, scaled to [0, 1] by 1/(2**bits - 1), bits from the sBIT chunk or (warned) inferred "
        "from the maximum",
        ((absolute(path), "warning", "16-bit grey PNG without an sBIT chunk: scaled to [0, 1] by 1/(2**12 - 1)"),),
        trained=(absolute(path),),
    )


@generator("2D", "images")
def png_rgba(directory: Path) -> Outcome:
    path = directory / "rgba.png"
    grey = np.random.default_rng(4).integers(0, 256, (40, 40), dtype=np.uint8)
    alpha = np.full((40, 40), 255, dtype=np.uint8)
    alpha[:10] = 0  # a transparent band: its grey values are kept, not composited
    Image.fromarray(np.dstack([grey, grey, grey, alpha]), mode="RGBA").save(path)
    return Outcome(
        directory,
        "RGBA PNG: accepted, converted to grey (luma), alpha dropped (warned when some pixels are not opaque)",
        ((absolute(path), "warning", "RGBA image with an alpha channel (25% of pixels not opaque): alpha ignored"),),
        trained=(absolute(path),),
    )


@generator("2D", "images")
def png_below_min_side(directory: Path) -> Outcome:
    path = write_png(directory / "tiny.png", size=(4, 6))
    return Outcome(
        directory,
        "image below the minimum side (8 px): error",
        ((absolute(path), "error", "image is 4x6 pixels (H x W); the minimum side is 8"),),
    )


@generator("2D", "images")
def png_below_crop_size(directory: Path) -> Outcome:
    path = write_png(directory / "small.png", size=(16, 20))
    return Outcome(
        directory,
        "image smaller than global_crop_size (>= 8 px): accepted, crops upsampled (warned)",
        ((absolute(path), "warning", "image is 16x20 pixels, smaller than global_crop_size 32"),),
        trained=(absolute(path),),
    )


@generator("2D", "images")
def jpeg_named_png(directory: Path) -> Outcome:
    path = directory / "really_a_jpeg.png"
    path.write_bytes(encoded_image("JPEG"))
    return Outcome(
        directory,
        "JPEG content named .png: accepted, decoded by content (warned)",
        ((absolute(path), "warning", "the content is JPEG although the extension is '.png'"),),
        trained=(absolute(path),),
    )


@generator("2D", "images")
def dicom_without_pixel_data(directory: Path) -> Outcome:
    path = directory / "no_pixels.dcm"
    _dicom_dataset(SecondaryCaptureImageStorage, 16, 16).save_as(path, enforce_file_format=True)
    return Outcome(
        directory, "DICOM without pixel data: error", ((absolute(path), "error", "DICOM file has no pixel data"),)
    )


@generator("2D", "images")
def unknown_extension_2d(directory: Path) -> Outcome:
    path = directory / "scan.tif"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(path, format="TIFF")
    return Outcome(
        directory,
        "unknown extension (.tif) in an image folder: error",
        ((absolute(path), "error", "unsupported file type ('.tif', no DICOM preamble)"),),
    )


@generator("2D", "images")
def png_symlink_loop(directory: Path) -> Outcome:
    path = directory / "loop.png"
    os.symlink("loop.png", path)
    return Outcome(
        directory, "symbolic link loop named .png: error", ((absolute(path), "error", "symbolic link loop"),)
    )


@generator("2D", "images")
def png_broken_symlink(directory: Path) -> Outcome:
    path = directory / "moved.png"
    os.symlink("/nonexistent/moved.png", path)
    return Outcome(
        directory,
        "broken symbolic link: error",
        ((absolute(path), "error", "broken symbolic link (points to '/nonexistent/moved.png'"),),
    )


@generator("2D", "images")
def folder_symlink_loop_2d(directory: Path) -> Outcome:
    image = write_png(directory / "sub" / "image.png")
    loop = directory / "sub" / "back_to_top"
    os.symlink("..", loop)
    return Outcome(
        directory,
        "folder symlink loop in an image tree: no hang, each real folder searched once (warned)",
        ((absolute(loop), "warning", "symbolic link to an already visited folder"),),
        trained=(absolute(image),),
    )


@generator("2D", "images")
def png_unreadable(directory: Path) -> Outcome:
    path = write_png(directory / "locked.png")
    path.chmod(0o000)
    return Outcome(
        directory,
        "unreadable PNG (mode 000, non-root user): error",
        ((absolute(path), "error", "permission denied"),),
        unprivileged=True,
    )


@generator("2D", "images")
def folder_unreadable_2d(directory: Path) -> Outcome:
    write_png(directory / "locked" / "inside.png")
    (directory / "locked").chmod(0o000)
    return Outcome(
        directory,
        "unreadable image folder (mode 000, non-root user): error naming the folder",
        ((absolute(directory / "locked"), "error", "folder whose images cannot be listed (permission denied"),),
        unprivileged=True,
    )


@generator("2D", "images")
def folder_named_png(directory: Path) -> Outcome:
    path = directory / "img.png"
    path.mkdir()
    return Outcome(
        directory,
        "folder named like an image (img.png/): error",
        ((absolute(path), "error", "not a regular file: it is a folder"),),
    )


@generator("2D", "images")
def png_named_pipe(directory: Path) -> Outcome:
    path = directory / "pipe.png"
    os.mkfifo(path)
    return Outcome(
        directory,
        "named pipe called .png: error, never opened (no hang)",
        ((absolute(path), "error", "not a regular file: it is a named pipe"),),
    )


@generator("manifest", "images")
def image_manifest_missing_paths(directory: Path) -> Outcome:
    write_png(directory / "present.png")
    (directory / "a_folder").mkdir()
    manifest = directory / "images.csv"
    manifest.write_text("path,label\npresent.png,normal\nmissing.png,normal\na_folder,abnormal\n")
    return Outcome(
        manifest,
        "image CSV manifest with missing paths: one error per row, naming the CSV, the row and the path",
        (
            (manifest, "error", "line 3: 'missing.png' does not exist"),
            (manifest, "error", "line 4: 'a_folder' is a folder, not a file"),
        ),
    )


# ------------------------------------------------------------------------------------------------------------
# 3D cases
# ------------------------------------------------------------------------------------------------------------


@generator("3D", "volumes")
def nifti_zero_bytes(directory: Path) -> Outcome:
    path = directory / "empty.nii.gz"
    path.write_bytes(b"")
    return Outcome(directory, "zero-byte .nii.gz: error", ((path, "error", "empty file (0 bytes)"),))


@generator("3D", "volumes")
def nifti_truncated_gz(directory: Path) -> Outcome:
    full = write_nifti(directory / "full.nii.gz", ct_like((48, 48, 24)))
    data = full.read_bytes()
    full.unlink()
    path = directory / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return Outcome(
        directory,
        "truncated .nii.gz: error",
        ((path, "error", "cannot decode the image data (EOFError: Compressed file ended"),),
    )


@generator("3D", "volumes")
def nifti_truncated_uncompressed(directory: Path) -> Outcome:
    path = write_nifti(directory / "truncated.nii", ct_like())
    path.write_bytes(path.read_bytes()[:-1000])
    return Outcome(
        directory,
        "truncated .nii: error from the header and the file size, without decoding",
        ((path, "error", "truncated: the header declares 11872 bytes (offset + data), the file has 10872"),),
    )


@generator("3D", "volumes")
def gzip_not_nifti(directory: Path) -> Outcome:
    path = directory / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"patient list, not an image\n" * 40))
    return Outcome(
        directory,
        "gzip that is not NIfTI: error",
        ((path, "error", "not a readable NIfTI file: it does not start with a NIfTI header"),),
    )


@generator("3D", "volumes")
def nifti_broken_header(directory: Path) -> Outcome:
    path = patch_header(write_nifti(directory / "broken_dim0.nii", ct_like()), 40, np.array([9], dtype="<i2"))
    return Outcome(
        directory,
        "NIfTI with a broken header (dim[0] = 9): error",
        ((path, "error", "broken NIfTI header: dim[0] (the number of dimensions) is 9, must be 1 to 7"),),
    )


@generator("3D", "volumes")
def nifti_unknown_datatype(directory: Path) -> Outcome:
    path = patch_header(write_nifti(directory / "bad_datatype.nii", ct_like()), 70, np.array([999], dtype="<i2"))
    return Outcome(
        directory,
        "NIfTI header with an unknown datatype code: error",
        ((path, "error", "broken NIfTI header: unknown datatype code 999"),),
    )


@generator("3D", "volumes")
def nifti_4d(directory: Path) -> Outcome:
    path = write_nifti(directory / "timeseries.nii.gz", np.stack([ct_like()] * 3, axis=-1))
    return Outcome(
        directory,
        "4D NIfTI (3 frames): error",
        ((path, "error", "4D image of shape (24, 24, 10, 3); one 3D volume per file is expected"),),
    )


@generator("3D", "volumes")
def nifti_2d(directory: Path) -> Outcome:
    path = write_nifti(directory / "flat.nii.gz", ct_like()[:, :, 0])
    return Outcome(
        directory, "2D NIfTI: error", ((path, "error", "2D image of shape (24, 24); a 3D volume is expected"),)
    )


@generator("3D", "volumes")
def nifti_singleton_4th_axis(directory: Path) -> Outcome:
    path = write_nifti(directory / "one_frame.nii.gz", ct_like()[..., None])
    return Outcome(
        directory,
        "4D NIfTI with one frame (X, Y, Z, 1): accepted as 3D (warned)",
        ((path, "warning", "4D NIfTI with a 4th axis of length 1: read as the 3D volume it holds"),),
        trained=(path,),
    )


@generator("3D", "volumes")
def nifti_nan_inf(directory: Path) -> Outcome:
    volume = ct_like().astype(np.float32)
    volume[5, 5, 5] = np.nan
    volume[6, 6, 6] = np.inf
    path = write_nifti(directory / "nan.nii.gz", volume)
    return Outcome(directory, "NaN/Inf voxels: error", ((path, "error", "1 NaN and 1 infinite voxel(s)"),))


@generator("3D", "volumes")
def nifti_constant(directory: Path) -> Outcome:
    path = write_nifti(directory / "constant.nii.gz", np.full((24, 24, 10), 40, dtype=np.int16))
    return Outcome(directory, "constant volume: error", ((path, "error", "constant volume (every voxel is 40)"),))


@generator("3D", "volumes")
def nifti_one_slice(directory: Path) -> Outcome:
    path = write_nifti(directory / "one_slice.nii.gz", ct_like()[:, :, :1])
    return Outcome(
        directory,
        "1-slice volume: error (min_slices 3)",
        ((path, "error", "only 1 slice(s) along the slice axis; at least 3 required"),),
    )


@generator("3D", "volumes")
def nifti_two_slices(directory: Path) -> Outcome:
    path = write_nifti(directory / "two_slices.nii.gz", ct_like()[:, :, :2])
    return Outcome(
        directory,
        "2-slice volume: error (min_slices 3)",
        ((path, "error", "only 2 slice(s) along the slice axis; at least 3 required"),),
    )


@generator("3D", "volumes")
def nifti_fewer_slices_than_slab(directory: Path) -> Outcome:
    path = write_nifti(directory / "short.nii.gz", ct_like()[:, :, :5])
    return Outcome(
        directory,
        "volume with 3 <= slices < num_slices: accepted, padded at the end with masked empty slices (warned)",
        ((path, "warning", "5 slices, fewer than num_slices 8: padded at the end with 3 empty slices"),),
        trained=(path,),
    )


@generator("3D", "volumes")
def nifti_anisotropic(directory: Path) -> Outcome:
    path = write_nifti(directory / "thick_slices.nii.gz", ct_like(), spacing=(0.5, 0.5, 50.0))
    return Outcome(
        directory,
        "huge anisotropic spacing (0.5 x 0.5 x 50 mm): accepted as stored, slices not resampled (warned)",
        ((path, "warning", "strongly anisotropic voxels: 50 x 0.5 x 0.5 mm (slice x row x column), 100:1"),),
        trained=(path,),
    )


def _pixdim_outcome(path: Path, value: float) -> Outcome:
    patch_header(write_nifti(path, ct_like()), 76 + 4 * 2, np.array([value], dtype="<f4"))  # pixdim[2]
    return Outcome(
        path.parent,
        f"pixdim {value:g} (even with a valid sform): error",
        ((path, "error", f"voxel sizes (pixdim) must be positive, got [1.0, {value:.1f}, 2.0]"),),
    )


@generator("3D", "volumes")
def nifti_zero_pixdim(directory: Path) -> Outcome:
    return _pixdim_outcome(directory / "zero_pixdim.nii", 0.0)


@generator("3D", "volumes")
def nifti_negative_pixdim(directory: Path) -> Outcome:
    return _pixdim_outcome(directory / "negative_pixdim.nii", -1.0)


@generator("3D", "volumes")
def npy_object_array(directory: Path) -> Outcome:
    path = directory / "pickled.npy"
    np.save(path, np.array([{"not": "a volume"}], dtype=object), allow_pickle=True)
    return Outcome(
        directory,
        ".npy holding pickled objects: error, never unpickled",
        ((path, "error", "Object arrays cannot be loaded when allow_pickle=False"),),
    )


@generator("3D", "volumes")
def dicom_series_missing_slice(directory: Path) -> Outcome:
    series = write_dicom_series(directory / "series", z_positions=(0, 2, 4, 8, 10, 12))
    return Outcome(
        directory,
        "DICOM series with a missing slice: error",
        ((series, "error", "missing slice(s): a gap of 4.00 mm between slices where the spacing is 2.00 mm"),),
    )


@generator("3D", "volumes")
def dicom_series_duplicated_slice(directory: Path) -> Outcome:
    series = write_dicom_series(directory / "series", z_positions=(0, 2, 4, 4, 6))
    return Outcome(
        directory,
        "DICOM series with a duplicated slice: error",
        ((series, "error", "1 duplicated slice position(s), e.g. slice002.dcm and slice003.dcm"),),
    )


@generator("3D", "volumes")
def dicom_series_mixed_orientations(directory: Path) -> Outcome:
    tilted = (1, 0, 0, 0, 0.98, 0.199)
    series = write_dicom_series(directory / "series", orientations=[(1, 0, 0, 0, 1, 0)] * 4 + [tilted])
    return Outcome(
        directory,
        "DICOM series with mixed orientations: error",
        ((series, "error", "mixed slice orientations (2 different ImageOrientationPatient)"),),
    )


@generator("3D", "volumes")
def dicom_series_slice_without_pixel_data(directory: Path) -> Outcome:
    series = write_dicom_series(directory / "series", without_pixels=(2,))
    return Outcome(
        directory,
        "DICOM series with a file without pixel data: error naming the file",
        ((series, "error", "1 DICOM file(s) without pixel data (not an image slice), e.g. slice002.dcm"),),
    )


@generator("3D", "volumes")
def unknown_extension_3d(directory: Path) -> Outcome:
    path = directory / "scan.vtk"
    path.write_text("# vtk DataFile Version 3.0\n")
    return Outcome(
        directory,
        "unsupported 3D format (.vtk) in a volume folder: error",
        ((path, "error", "unsupported volume format (VTK '.vtk': convert it to NIfTI)"),),
    )


@generator("3D", "volumes")
def metaimage_broken_header(directory: Path) -> Outcome:
    path = directory / "scan.mha"
    path.write_text("ObjectType = Image\nNDims = 3\n")
    return Outcome(
        directory,
        "MetaImage header without its fields: error",
        ((path, "error", "broken MetaImage header: no DimSize, ElementType, ElementDataFile"),),
    )


@generator("3D", "volumes")
def sidecar_ignored(directory: Path) -> Outcome:
    volume = write_nifti(directory / "scan.nii.gz", ct_like())
    sidecar = directory / "scan.json"
    sidecar.write_text('{"RepetitionTime": 2.0}')
    return Outcome(
        directory,
        "non-volume file (.json sidecar) in a volume folder: ignored (listed as ignored)",
        ((sidecar, "ignored", "not a volume file"),),
        trained=(volume,),
    )


@generator("3D", "volumes")
def nifti_symlink_loop(directory: Path) -> Outcome:
    path = directory / "loop.nii.gz"
    os.symlink("loop.nii.gz", path)
    return Outcome(directory, "symbolic link loop named .nii.gz: error", ((path, "error", "symbolic link loop"),))


@generator("3D", "volumes")
def folder_symlink_loop_3d(directory: Path) -> Outcome:
    volume = write_nifti(directory / "a" / "scan.nii.gz", ct_like())
    loop = directory / "a" / "again"
    os.symlink("..", loop)
    return Outcome(
        directory,
        "folder symlink loop in a volume tree: no hang, each real folder searched once (warned)",
        ((loop, "warning", "symbolic link to an already visited folder"),),
        trained=(volume,),
    )


@generator("3D", "volumes")
def nifti_unreadable(directory: Path) -> Outcome:
    path = write_nifti(directory / "locked.nii.gz", ct_like())
    path.chmod(0o000)
    return Outcome(
        directory,
        "unreadable .nii.gz (mode 000, non-root user): error",
        ((path, "error", "permission denied"),),
        unprivileged=True,
    )


@generator("3D", "volumes")
def dicom_folder_unreadable(directory: Path) -> Outcome:
    series = write_dicom_series(directory / "series")
    series.chmod(0o000)
    return Outcome(
        directory,
        "unreadable DICOM series folder (mode 000, non-root user): error naming the folder",
        ((series, "error", "cannot list the folder: permission denied"),),
        unprivileged=True,
    )


@generator("3D", "volumes")
def folder_named_nifti(directory: Path) -> Outcome:
    path = directory / "scan.nii.gz"
    path.mkdir()
    return Outcome(
        directory,
        "folder named like a volume (scan.nii.gz/): error",
        ((path, "error", "not a regular file: it is a folder named like a .nii.gz file"),),
    )


@generator("manifest", "volumes")
def volume_manifest_missing_paths(directory: Path) -> Outcome:
    write_nifti(directory / "present.nii.gz", ct_like())
    manifest = directory / "volumes.csv"
    manifest.write_text("path,modality\npresent.nii.gz,CT\nmissing.nii.gz,CT\n")
    return Outcome(
        manifest,
        "volume CSV manifest with a missing path: error naming the file (check-data adds the manifest and line)",
        ((directory / "missing.nii.gz", "error", "file does not exist"),),
    )


# ------------------------------------------------------------------------------------------------------------
# Good data, the whole corpus as one tree
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoodData:
    """A folder of good images and one of good volumes: one batch of each under :data:`SETTINGS`, no finding."""

    images: str
    volumes: str
    image_files: tuple[str, ...]
    volume_files: tuple[str, ...]


def write_good_data(root: Path) -> GoodData:
    images = tuple(absolute(write_png(root / "good_images" / f"good{i}.png", seed=10 + i)) for i in range(2))
    volumes = tuple(str(write_nifti(root / "good_volumes" / f"good{i}.nii.gz", ct_like(seed=i))) for i in range(2))
    return GoodData(str(root / "good_images"), str(root / "good_volumes"), images, volumes)


@dataclass
class Corpus:
    """Every case in one tree: 2D cases under ``images/<case>/``, 3D cases under ``volumes/<case>/``, manifests
    under ``manifests/<case>/``, and the good data. ``image_sources`` / ``volume_sources`` check all of it."""

    root: Path
    cases: list[BadInputCase]
    good: GoodData
    image_sources: list[str]
    volume_sources: list[str]


def build_corpus(root: Path, include_unprivileged: bool = True) -> Corpus:
    """Write every case (optionally without the unreadable-file ones) and the good data under ``root``."""
    good = write_good_data(root)
    corpus = Corpus(root, [], good, [str(root / "images"), good.images], [str(root / "volumes"), good.volumes])
    for make in CASES:
        if make.kind == "manifest":  # type: ignore[attr-defined]
            case = make(root / "manifests" / make.__name__)
            (corpus.image_sources if case.stream == "images" else corpus.volume_sources).append(case.source)
        else:
            if not include_unprivileged and make.__name__ in UNPRIVILEGED_CASES:
                continue
            case = make(root / make.stream / make.__name__)  # type: ignore[attr-defined]
        corpus.cases.append(case)
    return corpus


#: The cases that need a user whom file permissions stop.
UNPRIVILEGED_CASES = frozenset(
    {"png_unreadable", "folder_unreadable_2d", "nifti_unreadable", "dicom_folder_unreadable"}
)


def make_readable(root: Path) -> None:
    """Undo the cases' ``chmod 000`` so that a non-root user can delete the tree."""
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(0o755)
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink() and path.is_file():
                path.chmod(0o644)


# ------------------------------------------------------------------------------------------------------------
# Observing a case through the public entry points
# ------------------------------------------------------------------------------------------------------------


def observe(case: BadInputCase, good: GoodData) -> dict[str, Any]:
    """Run a case through ``JointDataModule.setup`` (with the good data of the same stream, so that a batch
    exists) and through :func:`jointssl.check_data.check_data`; return what each did, as plain JSON data:
    ``setup_errors`` ([path, reason] pairs of the DataValidationError, or None when setup succeeded),
    ``setup_other`` (any other exception, which is a failure), ``trained`` (the files in the training set) and
    ``findings`` ([path, severity, message] of check_data)."""
    from jointssl.check_data import check_data, settings_from_datamodule
    from jointssl.data import DataValidationError, JointDataModule

    sources = {"images": [], "volumes": []}
    sources[case.stream] = [case.source, good.images if case.stream == "images" else good.volumes]
    datamodule = JointDataModule(
        images=sources["images"],
        volumes=sources["volumes"],
        batch_size=2,
        volume_batch_size=2,
        num_workers=0,
        validation_threads=2,
        persistent_workers=False,
        **SETTINGS,
    )
    result: dict[str, Any] = {"setup_errors": None, "setup_other": None, "trained": [], "findings": []}
    try:
        datamodule.setup("fit")
    except DataValidationError as error:
        result["setup_errors"] = [[e.path, e.reason] for e in error.errors]
    except Exception as error:  # anything else is a bug the test reports
        result["setup_other"] = f"{type(error).__name__}: {error}"
    else:
        result["trained"] = [r.path for r in datamodule.image_records] + [r.path for r in datamodule.volume_records]
    report = check_data(sources["images"], sources["volumes"], settings_from_datamodule(datamodule, threads=2))
    result["findings"] = [[f.path, f.severity, f.message] for f in report.findings]
    return result


def main(argv: list[str]) -> None:
    """``python -m tests.bad_inputs CASES.json GOOD.json``: observe each case, print {name: observation} as JSON."""
    logging.disable(logging.CRITICAL)  # the observations are the output; reader log lines are noise here
    cases = [BadInputCase.from_json(c) for c in json.loads(Path(argv[0]).read_text())]
    good = GoodData(**json.loads(Path(argv[1]).read_text()))
    print(json.dumps({case.name: observe(case, good) for case in cases}))


if __name__ == "__main__":
    main(sys.argv[1:])
